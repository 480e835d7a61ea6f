import numpy as np
import pytest
from hypothesis import settings

# Gradient checks do real work per example: few examples, no per-example deadline.
settings.register_profile("minidit", max_examples=8, deadline=None, derandomize=False)
settings.load_profile("minidit")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
