"""Choosing an array backend by name: "numpy" (CPU), "cupy" (CUDA), or "strict" (minidit.dev.strict: a CPU
emulation of a device for tests, whose arrays refuse to meet NumPy as CuPy's do and count every host sync).

Choosing "cupy" also registers the fused CUDA kernels (minidit.cuda_kernels), and "numpy" keeps freed host memory
for reuse (minidit.threads.keep_freed_host_memory). The array helpers themselves are in minidit.xp.
"""
from __future__ import annotations

import numpy as np

from .threads import keep_freed_host_memory

BACKENDS = ("numpy", "cupy", "strict")


def _cupy():
    """Import CuPy lazily, with a message that names the fix, and register the fused kernels."""
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
    from . import cuda_kernels  # noqa: F401  (importing it registers the kernels in xp.KERNELS)

    return cupy


def get_backend(name: str):
    """Array module for a backend name: 'numpy', 'cupy' or 'strict'."""
    if name == "numpy":
        keep_freed_host_memory()
        return np
    if name == "cupy":
        return _cupy()
    if name == "strict":
        from .dev import strict  # the one place the mainline reaches into dev/: a test backend chosen by name

        return strict
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def memory_report(xp):
    """One line on device memory for the log ("" on the host): CuPy's memory pool, used / held bytes."""
    if getattr(xp, "__name__", "") != "cupy":
        return ""
    pool = xp.get_default_memory_pool()
    return f"GPU memory pool: {pool.used_bytes() / 2**30:.2f} GiB used / {pool.total_bytes() / 2**30:.2f} GiB held"


def is_out_of_memory(exc):
    """Whether an exception is a device (CuPy) or host (NumPy) out-of-memory error."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
