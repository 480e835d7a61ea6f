"""Numerical gradients by central differences, for tests and notebooks.

    df/dx_i  ~=  (f(x + h e_i) - f(x - h e_i)) / (2h)

Use float64 and h ~ 1e-6: the truncation error is O(h^2) and the rounding error O(eps/h), so the
estimate is good to about 1e-9 relative; in float32 neither term is small enough to mean anything.
"""
from __future__ import annotations

import numpy as np


def numerical_grad(f, x, h=1e-6, indices=None):
    """Gradient of the scalar ``f()`` with respect to the array ``x``, by central differences.

    ``x`` is perturbed in place (one element at a time) and restored, so ``f`` must read ``x`` each
    call. ``indices`` (a list of index tuples) limits the check to some elements; the others stay 0.
    """
    grad = np.zeros_like(x)
    if indices is None:
        indices = list(np.ndindex(x.shape))
    for i in indices:
        old = x[i]
        x[i] = old + h
        fp = float(f())
        x[i] = old - h
        fm = float(f())
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def random_indices(shape, k, rng):
    """Up to k distinct random index tuples of an array of this shape (all of them if it has <= k elements)."""
    n = int(np.prod(shape))
    flat = np.arange(n) if n <= k else rng.choice(n, size=k, replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def rel_error(a, b, floor=1e-30):
    """Relative error ||a - b|| / max(||a|| + ||b||, floor) over whole arrays.

    A whole-array norm rather than an elementwise max: an entry that is 1e-12 in both arrays has a
    huge elementwise relative error yet is correct to all the digits that matter. `floor` turns the
    comparison absolute for gradients so small that the numerical estimate's own error dominates.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), floor))


def check_backward(forward, backward, inputs, names=None, dout=None, rng=None, h=1e-6, max_elems=None):
    """Compare a hand-written backward against central differences.

    forward(**inputs) -> (out, cache); backward(dout, cache) -> the gradients of some inputs: a tuple (or one array)
    in the order of `names`, e.g. check_backward(linear_forward, linear_backward, dict(x=x, w=w, b=b), "x w b"),
    or a dict name -> gradient (names=None).
    The scalar checked is L = sum(out * dout) with a random dout, so dL/dinput = backward(dout).
    Returns dict name -> relative error for every gradient backward returned. Gradients with norm
    below 1e-3 are compared absolutely (error / 1e-3): in float64 with h = 1e-6 the numerical estimate
    itself is only good to about 1e-10 per entry, so a relative error of a tiny gradient measures noise.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    out, cache = forward(**inputs)
    if dout is None:
        dout = rng.standard_normal(out.shape)
    grads = backward(dout, cache)
    if names is not None:
        names = names.split() if isinstance(names, str) else list(names)
        grads = dict(zip(names, grads if isinstance(grads, tuple) else (grads,), strict=True))
    errors = {}
    for name, g in grads.items():
        x = inputs[name]
        assert g.shape == x.shape, f"gradient of {name} has shape {g.shape}, input has {x.shape}"
        idx = None if max_elems is None else random_indices(x.shape, max_elems, rng)
        num = numerical_grad(lambda: np.sum(forward(**inputs)[0] * dout), x, h=h, indices=idx)
        if idx is not None:  # compare only the sampled entries
            sel = tuple(np.array(ix) for ix in zip(*idx))
            g, num = g[sel], num[sel]
        errors[name] = rel_error(g, num, floor=1e-3)
    return errors


def sampled_errors(loss, grads, arrays, k, rng, floor=1e-3):
    """A model's whole backward against central differences, k sampled entries per tensor: for every name of
    `grads` (name -> the hand-written gradient of the scalar loss() w.r.t. arrays[name], which loss must read),
    returns name -> (relative error of the sampled entries (rel_error with `floor`), their norm). A norm of 0 means
    the check of that tensor says nothing (e.g. at DiT's init, where adaLN-Zero zeroes most gradients)."""
    out = {}
    for name, g in grads.items():
        idx = random_indices(g.shape, k, rng)
        num = numerical_grad(loss, arrays[name], indices=idx)
        sel = tuple(np.array(i) for i in zip(*idx))
        out[name] = (rel_error(g[sel], num[sel], floor=floor), float(np.linalg.norm(g[sel])))
    return out


def model_errors(model, x, t, y, k, rng):
    """A model's forward(x, t, y) / backward at its current parameters, loss = sum(out * dout) with dout random:
    sampled_errors of every parameter's gradient and of x's (k entries each). -> name -> (relative error, norm)."""
    out, cache = model.forward(x, t, y)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache, return_dx=True)
    return sampled_errors(lambda: np.sum(model.forward(x, t, y)[0] * dout), {**grads, "x": dx},
                          {**model.params, "x": x}, k, rng)
