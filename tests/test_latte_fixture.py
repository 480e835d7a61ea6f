"""The official Latte fixture is what it says it is (it does not test minidit yet): NumPy only, no torch.

tests/fixtures/tiny_latte_f64.npz was written by the official Latte code (github.com/maxin-cn/Latte,
models/latte.py) in float64, forward and backward:

    python -m minidit.dev.latte_reference --latte-src /path/to/Latte --out tests/fixtures/tiny_latte_f64.npz

Modes "cond" (extras=2, class labels) and "uncond" (extras=1); see minidit/dev/latte_reference.py for the keys.
"""
import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_latte_f64.npz"
FROZEN = ("pos_embed", "temp_embed")


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def config(ref):
    return json.loads(str(ref["config"]))


def sincos_1d(dim, pos):
    """MAE's 1-D table: [sin(pos * w), cos(pos * w)], w = 10000 ** (-arange(dim/2) / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.asarray(pos, dtype=np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_config(config):
    assert config["extras"] == {"cond": 2, "uncond": 1}
    assert (config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"]) == (4, 32, 2, 2)
    assert (config["num_frames"], config["input_size"], config["in_channels"], config["num_classes"]) == (4, 8, 3, 5)
    assert len(config["latte_commit"]) == 40


@pytest.mark.parametrize("mode", ["cond", "uncond"])
def test_shapes_and_every_gradient_is_there_and_nonzero(ref, config, mode):
    n, f, c, s = 2, config["num_frames"], config["in_channels"], config["input_size"]
    assert ref[f"{mode}/x"].shape == ref[f"{mode}/dx"].shape == (n, f, c, s, s)
    assert ref[f"{mode}/out"].shape == ref[f"{mode}/dout"].shape == (n, f, 2 * c, s, s)
    assert ref[f"{mode}/t"].tolist() == [17, 600]
    assert (f"{mode}/y" in ref) == (mode == "cond")
    names = [k[len(f"{mode}/param/"):] for k in ref if k.startswith(f"{mode}/param/")]
    grads = [k[len(f"{mode}/grad/"):] for k in ref if k.startswith(f"{mode}/grad/")]
    assert sorted(grads) == sorted(set(names) - set(FROZEN))
    assert ("y_embedder.embedding_table.weight" in names) == (mode == "cond")
    for name in grads:
        g = ref[f"{mode}/grad/{name}"]
        assert g.dtype == np.float64 and g.shape == ref[f"{mode}/param/{name}"].shape, name
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3, name
    assert np.abs(ref[f"{mode}/dx"]).min() > 0
    if mode == "cond":  # only the rows of the labels given (3 and the null label 5) get a gradient
        table = ref["cond/grad/y_embedder.embedding_table.weight"]
        assert table.shape == (config["num_classes"] + 1, config["hidden_size"])
        assert [bool(np.any(row)) for row in table] == [False, False, False, True, False, True]


@pytest.mark.parametrize("mode", ["cond", "uncond"])
def test_position_tables_are_float64_mae_sincos(ref, config, mode):
    d, f = config["hidden_size"], config["num_frames"]
    g = config["input_size"] // config["patch_size"]
    cols, rows = np.meshgrid(np.arange(g), np.arange(g))  # tokens row-major; MAE's first half encodes the column
    pos = np.concatenate([sincos_1d(d // 2, cols), sincos_1d(d // 2, rows)], axis=1)
    np.testing.assert_allclose(ref[f"{mode}/param/pos_embed"], pos[None], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ref[f"{mode}/param/temp_embed"], sincos_1d(d, np.arange(f))[None], rtol=0, atol=1e-15)
