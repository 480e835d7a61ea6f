"""The one place that knows about NumPy vs CuPy.

Rules the rest of minidit follows:
  * a function takes its array module from its inputs: ``xp = get_xp(x)``; there is no global switch;
  * data crosses host <-> device only at the edges (data loading, logging, checkpoints, image files),
    through ``to_device`` and ``to_numpy``;
  * random numbers for the device path come from ``make_rng(xp, seed)`` so they are drawn where they are used.

Backends: "numpy" (CPU), "cupy" (CUDA), and "strict" (minidit.strict: a CPU emulation of a device for tests, whose
arrays refuse to meet NumPy as CuPy's do and count every host sync).
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

BACKENDS = ("numpy", "cupy", "strict")


def _cupy():
    """Import CuPy lazily, with a message that names the fix."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the cupy backend needs CuPy: install it with `pip install -e \".[cuda12]\"` "
            "(or \".[cuda13]\" for CUDA 13)"
        ) from e
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover
        raise RuntimeError(f"the cupy backend needs a CUDA device, and none was found ({e})") from e
    return cupy


@functools.lru_cache(maxsize=None)
def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS. Returns whether it could.

    A training step allocates and frees the same large temporaries every step. By default glibc serves blocks over
    128 KiB with mmap and returns them on free, so every step page-faults its temporaries in again: measured here,
    a mini/4 step at batch 64 took 240-260 ms that way and 155-180 ms with this setting. Threads other than the
    main one get arenas of their own, whose heaps (at most 64 MiB each) are unmapped when they empty, so the
    threads of minidit.threads page-faulted ~8000 times per shard forward (mini/4, 32x32, 16 images: 98 ms instead
    of 83): one arena for all threads keeps their memory too. Process-wide; a no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library to open, or not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30)  # 32 MiB, 1 GiB
                and mallopt(M_ARENA_MAX, 1))


def get_backend(name: str):
    """Array module for a backend name: 'numpy', 'cupy' or 'strict'. (numpy also calls keep_freed_host_memory.)"""
    if name == "numpy":
        keep_freed_host_memory()
        return np
    if name == "cupy":
        return _cupy()
    if name == "strict":
        from . import strict

        return strict
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def get_xp(*arrays):
    """Array module (numpy, cupy, strict) of the given arrays; numpy if none is a device array.

    An array type may name its module with a ``__minidit_xp__`` class attribute (minidit.strict does).
    """
    for a in arrays:
        xp = getattr(type(a), "__minidit_xp__", None)
        if xp is not None:
            return xp
        mod = type(a).__module__
        if mod.startswith("cupy"):
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


# ----------------------------------------------------------------------------------------------
# fused CUDA kernels (minidit.cuda_kernels) for CuPy arrays; everything else runs the array code
# ----------------------------------------------------------------------------------------------
_fused_kernels = os.environ.get("MINIDIT_FUSED_KERNELS", "1") != "0"


def set_fused_kernels(enabled: bool) -> bool:
    """Switch CuPy's fused kernels on or off (for benchmarks and equivalence tests); returns the previous setting."""
    global _fused_kernels
    previous, _fused_kernels = _fused_kernels, bool(enabled)
    return previous


def fused(reference):
    """Decorator: on CuPy arrays, call the kernel of the same name in minidit.cuda_kernels instead of `reference`.

    The decorated function IS the reference (NumPy and the strict backend always run it, CuPy runs it when fused
    kernels are off); it stays reachable as ``f.reference`` for the equivalence tests. Dispatch looks at the
    first argument only; the kernel takes exactly the reference's arguments.
    """
    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if _fused_kernels and type(first).__module__.startswith("cupy"):
            from . import cuda_kernels

            return getattr(cuda_kernels, reference.__name__)(*args, **kwargs)
        return reference(*args, **kwargs)

    dispatch.reference = reference
    return dispatch


def make_rng(xp, seed):
    """A random Generator living on the same side as xp's arrays."""
    return xp.random.default_rng(seed)


def memory_report(xp):
    """One line on device memory for the log ("" on the host): CuPy's memory pool, used / held bytes."""
    if getattr(xp, "__name__", "") != "cupy":
        return ""
    pool = xp.get_default_memory_pool()
    return f"GPU memory pool: {pool.used_bytes() / 2**30:.2f} GiB used / {pool.total_bytes() / 2**30:.2f} GiB held"


def is_out_of_memory(exc):
    """Whether an exception is a device (CuPy) or host (NumPy) out-of-memory error."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
