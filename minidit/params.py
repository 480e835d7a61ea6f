"""Parameters as one flat dict named like the official checkpoint (picoGPT's trick).

    P["blocks.3.attn.qkv.weight"]                       # Linear weights stored (out, in), as PyTorch does
    w, b = take(P, "blocks.3.attn.qkv.", "weight bias")
    grads.update(named("blocks.3.attn.qkv.", "weight bias", (dw, db)))

Loading an official checkpoint, comparing against a reference and naming a gradient in an error message are all
dictionary operations. What a model does with its dict (state_dict, load_state_dict, counts) is minidit.contract.
"""
from __future__ import annotations

import math

import numpy as np


def take(P, prefix, names):
    """The arrays P[prefix + name] for each space-separated name, as a tuple in that order."""
    return tuple(P[prefix + n] for n in names.split())


def named(prefix, names, values):
    """{prefix + name: value} for the space-separated names and the values in the same order."""
    names = names.split()
    assert len(names) == len(values), (names, len(values))
    return {prefix + n: v for n, v in zip(names, values)}


LINEAR = "weight bias"  # the parameters of a Linear, as take and named read them


def linear_shapes(prefix, n_out, n_in):
    """The shapes of a Linear(n_in -> n_out) named prefix: weight (n_out, n_in), as PyTorch stores it, and bias."""
    return {prefix + "weight": (n_out, n_in), prefix + "bias": (n_out,)}


def check_keys(d, expected, what, shapes=None):
    """Strict key (and optionally shape) check: a ValueError starting with `what` that names the missing, unexpected
    and mis-shaped entries. `shapes`: name -> expected shape, checked against d[name].shape."""
    keys = set(d)
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    misshaped = [f"{k}: got {tuple(d[k].shape)}, expected {tuple(shapes[k])}" for k in (shapes or {})
                 if k in d and tuple(d[k].shape) != tuple(shapes[k])]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
        raise ValueError(f"{what}: " + "; ".join(parts))


def xavier_uniform(rng, shape):
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)); fan_in counts every axis after the first (a conv's C*p*p)."""
    fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)

