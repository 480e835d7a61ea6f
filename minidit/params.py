"""Parameters as one flat dict named like the official checkpoint (picoGPT's trick), and what every model does with it.

    P["blocks.3.attn.qkv.weight"]                       # Linear weights stored (out, in), as PyTorch does
    w, b = take(P, "blocks.3.attn.qkv.", "weight bias")
    grads.update(named("blocks.3.attn.qkv.", "weight bias", (dw, db)))

Loading an official checkpoint, comparing against a reference and naming a gradient in an error message are all
dictionary operations. `Model` is the protocol the commands (train, sample, bench, checkpoint) rely on: a model has
`spec` (every constructor argument, stored in checkpoints), `params`, `forward(x, t, ..., train) -> (out, cache)`,
`backward(dout, cache) -> grads`, `state_dict` / `load_state_dict` (strict), and a parameter count.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .xp import to_backend, to_device


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


class Model:
    """What every minidit model shares: a flat parameter dict on one backend, strict state loading, views on other
    weights. A subclass sets `spec`, `dtype`, `xp` and `params` in its constructor and defines `param_shapes()`,
    `forward` and `backward`; FROZEN names parameters that are stored but never trained."""

    FROZEN: tuple = ()

    def param_shapes(self):  # pragma: no cover - every model defines it
        raise NotImplementedError

    def using(self, params):
        """This model reading another parameter dict (shared, not copied), e.g. the EMA weights."""
        view = copy.copy(self)
        view.params = params
        return view

    def trainable(self):
        """Names of the parameters that receive gradients, in the official order."""
        return [k for k in self.params if k not in self.FROZEN]

    def num_params(self, trainable_only=False):
        return sum(math.prod(s) for k, s in self.param_shapes().items()
                   if not (trainable_only and k in self.FROZEN))

    def state_dict(self):
        """name -> array (the model's own arrays, not copies), official names and shapes."""
        return dict(self.params)

    def load_state_dict(self, state):
        """Strict load: every key present, none extra, every shape equal; values copied in place (cast to the model's
        dtype and backend), so arrays held by an optimizer stay valid."""
        shapes = self.param_shapes()
        check_keys(state, shapes, f"state dict does not match {self.describe()} (build the model with the spec the "
                                  f"checkpoint was trained with)", shapes)
        for k, v in state.items():
            self.params[k][...] = to_backend(v, self.xp, self.dtype)

    def describe(self):
        """One line naming the model and its spec, for messages."""
        return f"{type(self).__name__}({self.spec})"

    def place(self, host_params):
        """Host float64 initial values -> self.params in the model's dtype, on its backend."""
        self.params = {k: to_device(v.astype(self.dtype), self.xp) for k, v in host_params.items()}

