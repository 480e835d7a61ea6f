"""minidit's video DiT equals the official Latte (github.com/maxin-cn/Latte, models/latte.py, class Latte), in
float64, for the forward and every gradient, class-conditional (extras=2) and unconditional (extras=1), through the
converter (minidit.convert.from_latte_state_dict) that reads Latte's state dicts. NumPy only: the reference numbers are
tests/fixtures/tiny_latte_f64.npz, written by the official code itself:

    python -m minidit.dev.latte_reference --latte-src /path/to/Latte --out tests/fixtures/tiny_latte_f64.npz

(minidit/dev/latte_reference.py says which commit, and what it needs). Latte's layout is (N, F, C, H, W), minidit's
(N, C, F, H, W): the test moves the frame axis at the boundary, as a user of both would.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from minidit.convert import from_latte_state_dict
from minidit.gradcheck import rel_error
from minidit.model import DiTConfig
from minidit.video import VideoDiT, frame_code, grid_code

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_latte_f64.npz"
TOL = 1e-10  # float64 rounding, relative to each tensor's largest entry (the values reach the hundreds)
TINY = DiTConfig(depth=4, hidden_size=16, num_heads=2, patch_size=2)  # the fixture's size: no named variant


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def latte(ref, mode):
    """The official model's state dict, inputs and results of one mode."""
    part = {k[len(mode) + 1:]: v for k, v in ref.items() if k.startswith(mode + "/")}
    state = {k[len("param/"):]: v for k, v in part.items() if k.startswith("param/")}
    grads = {k[len("grad/"):]: v for k, v in part.items() if k.startswith("grad/")}
    return state, grads, part


def to_minidit(a):
    """(N, F, C, H, W) -> (N, C, F, H, W), and back: swap the frame and channel axes."""
    return np.ascontiguousarray(a.swapaxes(1, 2))


def close(got, want):
    return rel_error(got, want, floor=np.abs(want).max()) < TOL


def test_the_fixture_is_the_official_code_s(ref):
    config = json.loads(str(ref["config"]))
    assert len(config["latte_commit"]) == 40 and config["extras"] == {"cond": 2, "uncond": 1}
    assert (config["depth"], config["num_frames"], config["num_classes"]) == (4, 4, 5)


@pytest.mark.parametrize("mode", ["cond", "uncond"])
def test_forward_and_every_gradient_equal_latte(ref, mode):
    state, grads, io = latte(ref, mode)
    spec, params = from_latte_state_dict(state, TINY)
    assert spec.num_frames == 4 and spec.input_size == 8 and spec.temporal_patch == 1
    assert spec.num_classes == (5 if mode == "cond" else 0) and spec.frame_code == "after-block-0"
    model = VideoDiT(spec, dtype=np.float64)
    model.load_state_dict(params)
    y = io["y"] if mode == "cond" else None
    out, cache = model.forward(to_minidit(io["x"]), io["t"], y)
    assert close(to_minidit(out), io["out"]), rel_error(to_minidit(out), io["out"])
    mine, dx = model.backward(to_minidit(io["dout"]), cache, return_dx=True)
    assert close(to_minidit(dx), io["dx"])
    assert set(mine) == set(grads)  # every trainable parameter, no more (Latte's tables are frozen, ours computed)
    for name, g in grads.items():
        got = mine[name].reshape(g.shape)  # the patch weight: minidit's (D, C, 1, p, p), Latte's (D, C, p, p)
        assert close(got, g), f"{name}: {rel_error(got, g):.2e}"
        assert np.abs(g).max() > 1e-3, f"{name}: a vacuous check"


def test_without_the_latte_placement_of_the_frame_code_it_differs(ref):
    """Not vacuous: the frame code added at the input (minidit's first video layout) gives other numbers."""
    state, _, io = latte(ref, "cond")
    spec, params = from_latte_state_dict(state, TINY)
    model = VideoDiT(spec, frame_code="input", dtype=np.float64)
    model.load_state_dict(params)
    out, _ = model.forward(to_minidit(io["x"]), io["t"], io["y"])
    assert rel_error(to_minidit(out), io["out"], floor=np.abs(io["out"]).max()) > 1e-3


def test_latte_tables_are_minidit_s_and_a_wrong_state_dict_is_named(ref):
    state, _, _ = latte(ref, "cond")
    assert np.array_equal(state["pos_embed"][0], grid_code(16, 4, 4))
    assert np.array_equal(state["temp_embed"][0], frame_code(16, 4)[:, 0])
    with pytest.raises(ValueError, match="not a Latte state dict: missing temp_embed"):
        from_latte_state_dict({k: v for k, v in state.items() if k != "temp_embed"}, TINY)
    with pytest.raises(ValueError, match="temp_embed is not the sin-cos table"):
        from_latte_state_dict({**state, "temp_embed": state["temp_embed"] + 0.1}, TINY)
    with pytest.raises(ValueError, match="does not match Latte.*missing keys.*blocks.3.mlp.fc1.weight"):
        from_latte_state_dict({k: v for k, v in state.items() if k != "blocks.3.mlp.fc1.weight"}, TINY)
