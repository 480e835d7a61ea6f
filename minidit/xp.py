"""The ground floor: which array module an array belongs to, moves between host and device, and the fused-kernel
table. Imports nothing of minidit, so every other module may import it.

Rules the rest of minidit follows:
  * a function takes its array module from its inputs: ``xp = get_xp(x)``; there is no global switch;
  * data crosses host <-> device only at the edges (data loading, logging, checkpoints, image files),
    through ``to_device`` and ``to_numpy``;
  * random numbers for the device path come from ``make_rng(xp, seed)`` so they are drawn where they are used.

Choosing a backend by name ("numpy", "cupy", "strict") is ``minidit.backend.get_backend``.
"""
from __future__ import annotations

import functools
import os

import numpy as np


def get_xp(*arrays):
    """Array module (numpy, cupy, strict) of the given arrays; numpy if none is a device array.

    An array type may name its module with a ``__minidit_xp__`` class attribute (minidit.dev.strict does).
    """
    for a in arrays:
        xp = getattr(type(a), "__minidit_xp__", None)
        if xp is not None:
            return xp
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_device(x, xp):
    """Host array -> array of module xp (a no-op for numpy)."""
    return x if xp is np else xp.asarray(x)


def to_numpy(x):
    """Any array -> host numpy array (a no-op for numpy)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def to_backend(x, xp, dtype=None):
    """x (host or device) as an array of module xp, cast to dtype if given; no copy where none is needed."""
    if get_xp(x) is not xp:
        x = to_device(to_numpy(x), xp)
    return x if dtype is None else x.astype(dtype, copy=False)


def make_rng(xp, seed):
    """A random Generator living on the same side as xp's arrays."""
    return xp.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Fused kernels: a function marked @fused is the readable reference; on CuPy arrays the kernel registered
# under its name runs instead. minidit.cuda_kernels registers its kernels when it is imported, which
# backend.get_backend("cupy") does; until then (and on NumPy and strict arrays) the reference runs.
# ----------------------------------------------------------------------------------------------
KERNELS: dict = {}  # reference name -> kernel with the same signature
_fused_kernels = os.environ.get("MINIDIT_FUSED_KERNELS", "1") != "0"


def set_fused_kernels(enabled: bool) -> bool:
    """Switch CuPy's fused kernels on or off (for benchmarks and equivalence tests); returns the previous setting."""
    global _fused_kernels
    previous, _fused_kernels = _fused_kernels, bool(enabled)
    return previous


def fused(reference):
    """Decorator: on CuPy arrays, call the kernel registered in KERNELS under this function's name instead.

    The decorated function IS the reference (NumPy and the strict backend always run it, CuPy runs it when fused
    kernels are off); it stays reachable as ``f.reference`` for the equivalence tests. Dispatch looks at the
    first argument only; the kernel takes exactly the reference's arguments.
    """
    name = reference.__name__

    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if _fused_kernels and name in KERNELS and type(first).__module__.startswith("cupy"):
            return KERNELS[name](*args, **kwargs)
        return reference(*args, **kwargs)

    dispatch.reference = reference
    return dispatch
