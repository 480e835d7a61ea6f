import numpy as np
import pytest
from hypothesis import settings

# Gradient checks do real work per example: few examples, no per-example deadline.
settings.register_profile("minidit", max_examples=8, deadline=None, derandomize=False)
settings.load_profile("minidit")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- array backends
# numpy (CPU), strict (minidit.dev.strict: a CPU emulation of a device that fails where CuPy would), cupy (CUDA).
ALL_BACKENDS = ("numpy", "strict", "cupy")
DEVICE_BACKENDS = ("strict", "cupy")


def require_backend(name):
    """Skip the test cleanly when the backend is not available here (cupy without CuPy or a CUDA device)."""
    from minidit.backend import get_backend

    try:
        return get_backend(name)
    except Exception as e:  # RuntimeError from get_backend, or whatever a broken CuPy install raises on import
        pytest.skip(f"backend {name!r} unavailable: {e}")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """The name of each array backend in turn: numpy, strict, cupy (skipped without CuPy and a GPU)."""
    require_backend(request.param)
    return request.param


@pytest.fixture(params=DEVICE_BACKENDS)
def device_backend(request):
    """The name of each device-like backend in turn (strict, cupy), for comparisons against numpy."""
    require_backend(request.param)
    return request.param
