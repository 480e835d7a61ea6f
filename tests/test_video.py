"""The spatio-temporal DiT (minidit.video): the 3-D patches and the token reshuffles as adjoint permutations, the
whole model's float64 gradient check at random parameters for hypothesis-drawn clip shapes, one set of weights on
every shape, positions, and the checkpoint round trip."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidit.checkpoint import build_model
from minidit.gradcheck import model_errors, sampled_errors
from minidit.layers import get_1d_sincos_pos_embed
from minidit.model import DiTConfig
from minidit.video import (
    FRAME_CODES, VideoDiT, frame_code, from_positions, grid_code, patchify3d, patchify3d_backward, to_positions,
    unpatchify3d, unpatchify3d_backward,
)

TINY = DiTConfig(depth=2, hidden_size=8, num_heads=2, patch_size=2)


def tiny_video(pt=1, attention="factorised", seed=0, frames=2, frame_code="after-block-0"):
    model = VideoDiT(TINY, num_frames=frames * pt, input_size=4, in_channels=2, num_classes=3, temporal_patch=pt,
                     attention=attention, frame_code=frame_code, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for v in model.params.values():
        v[...] = 0.3 * rng.standard_normal(v.shape)
    return model


@given(pt=st.sampled_from([1, 2]), f=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_patches_and_reshuffles_are_adjoint_permutations(pt, f, h, w):
    """<patchify(x), d> = <x, patchify_backward(d)> and the same for the other three: each moves every element once."""
    rng = np.random.default_rng(f * 100 + h * 10 + w)
    p, C, N = 2, 3, 2
    x = rng.standard_normal((N, C, f * pt, h * p, w * p))
    tokens = patchify3d(x, pt, p)
    assert tokens.shape == (N, f, h * w, C * pt * p * p)
    d = rng.standard_normal(tokens.shape)
    assert np.isclose(np.sum(tokens * d), np.sum(x * patchify3d_backward(d, x.shape, pt, p)))
    y = rng.standard_normal((N, f * h * w, pt * p * p * C))
    out = unpatchify3d(y, pt, p, C, f, h, w)
    assert out.shape == x.shape
    d = rng.standard_normal(out.shape)
    assert np.isclose(np.sum(out * d), np.sum(y * unpatchify3d_backward(d, pt, p)))
    np.testing.assert_array_equal(unpatchify3d_backward(out, pt, p), y)  # a permutation: its own inverse's adjoint
    seq = tokens.reshape(N, f, h * w, -1)
    np.testing.assert_array_equal(from_positions(to_positions(seq), N), seq)
    # the first temporal sequence is token 0 of every frame of clip 0
    np.testing.assert_array_equal(to_positions(seq)[0], seq[0, :, 0])


@given(pt=st.sampled_from([1, 2]), frames=st.integers(1, 3), size=st.sampled_from([(2, 4), (4, 4), (4, 6)]),
       attention=st.sampled_from(["factorised", "full"]))
@settings(max_examples=8, deadline=None)
def test_backward_matches_finite_differences(pt, frames, size, attention):
    model = tiny_video(pt, attention)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, frames * pt, *size))
    t, y = np.array([3, 800]), np.array([1, 3])  # 3 = the null class
    out, cache = model.forward(x, t, y)
    assert out.shape == (2, 4, frames * pt, *size)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache, return_dx=True)
    assert set(grads) == set(model.params)

    def loss():
        return np.sum(model.forward(x, t, y)[0] * dout)

    for name, (err, norm) in sampled_errors(loss, {**grads, "x": dx}, {**model.params, "x": x}, 10, rng).items():
        assert norm > 0 or name.endswith("embedding_table.weight"), f"{name}: vacuous check"
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_an_unconditional_video_model(tmp_path):
    """num_classes = 0, Latte's extras=1: no label table, y None; float64 gradients at random parameters."""
    model = VideoDiT(TINY, num_frames=2, input_size=4, in_channels=2, num_classes=0, dtype=np.float64, seed=1)
    assert not any(k.startswith("y_embedder") for k in model.params)
    rng = np.random.default_rng(2)
    for v in model.params.values():
        v[...] = 0.3 * rng.standard_normal(v.shape)
    errors = model_errors(model, rng.standard_normal((2, 2, 2, 4, 4)), np.array([3, 800]), None, 10, rng)
    assert all(norm > 0 and err < 1e-6 for err, norm in errors.values()), errors


def test_one_set_of_weights_takes_every_shape_and_frames_interact():
    model = tiny_video()
    rng = np.random.default_rng(0)
    t, y = np.array([10, 500]), np.array([0, 2])
    for frames, size in ((1, 4), (2, 4), (5, 6), (3, 2)):
        x = rng.standard_normal((2, 2, frames, size, size))
        assert model.forward(x, t, y, cache=False)[0].shape == (2, 4, frames, size, size)
    # temporal attention: changing frame 0 changes frame 1's output (independent frames would not)
    x = rng.standard_normal((2, 2, 3, 4, 4))
    x2 = x.copy()
    x2[:, :, 0] += 1.0
    a, b = model.forward(x, t, y)[0], model.forward(x2, t, y)[0]
    assert np.abs(a[:, :, 1] - b[:, :, 1]).max() > 1e-3
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_video(pt=2).forward(rng.standard_normal((2, 2, 3, 4, 4)), t, y)
    with pytest.raises(ValueError, match=r"\(N, 2, F, H, W\)"):
        model.forward(rng.standard_normal((2, 2, 4, 4)), t, y)


def test_the_position_codes_are_an_image_table_and_a_frame_index():
    grid, frames = grid_code(8, 2, 2), frame_code(8, 3)
    assert grid.shape == (4, 8) and frames.shape == (3, 1, 8)
    np.testing.assert_array_equal(frames[0], get_1d_sincos_pos_embed(8, [0]))  # frame 0: sin 0 = 0, cos 0 = 1
    assert not np.allclose(frames[1], frames[0]) and not np.allclose(grid[1], grid[0])


@pytest.mark.parametrize("frame_code", ["after-block-0", "input"])
def test_where_the_frame_code_enters(frame_code):
    """Latte ("after-block-0") adds the frame code to the residual stream between block 0 (spatial) and block 1
    (temporal), once; "input" adds it with the 2-D table. Checked by a model whose block 0 is the identity (its
    adaLN modulation zero, as at DiT's init): then both places give the same output, and with block 0 random they
    differ. A constant added: the backward is unchanged, which the gradient checks above cover for both places."""
    rng = np.random.default_rng(4)
    x, t, y = rng.standard_normal((2, 2, 4, 4, 4)), np.array([3, 700]), np.array([1, 2])
    models = {code: tiny_video(frames=4, frame_code=code) for code in FRAME_CODES}  # the same weights (one seed)
    P = models["input"].params
    models["after-block-0"] = models["after-block-0"].using(P)  # one dict: zeroing block 0 below reaches both
    out = {code: m.forward(x, t, y)[0] for code, m in models.items()}
    assert not np.allclose(out["input"], out["after-block-0"])
    for name in ("blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias"):
        P[name][...] = 0  # block 0 = the identity: adding before or after it is the same
    out = {code: m.forward(x, t, y)[0] for code, m in models.items()}
    np.testing.assert_allclose(out["input"], out["after-block-0"], rtol=1e-12, atol=1e-12)


def test_spec_round_trip_and_macs():
    model = tiny_video(pt=2)
    again = build_model(model.spec.to_dict(), dtype=np.float64)
    assert type(again) is VideoDiT and again.spec == model.spec
    assert again.params["x_embedder.proj.weight"].shape == (8, 2, 2, 2, 2)
    full = tiny_video(attention="full", frames=8)
    factorised = tiny_video(frames=8)
    # attention pairs: factorised f S^2 + S f^2 against (f S)^2 -> fewer MACs for 8 frames of 4 tokens
    assert factorised.gmacs(8, 8) < full.gmacs(8, 8)


# ---------------------------------------------------------------- the built-in clips, training, sampling, scoring
def test_clips_move_bounce_and_are_bucketed(tmp_path):
    from minidit.data import DigitClips
    from minidit.digits import MOTIONS, clip_motion

    m = clip_motion(5, 40, seed=3)
    assert m["shift"].shape == (50, 40, 2) and np.abs(m["shift"]).max() <= 1  # bounced back inside
    assert np.all(m["rotation"][m["motion"] != MOTIONS.index("rotating")] == 0)
    assert np.all(m["height"][m["motion"] != MOTIONS.index("growing")] == m["height"][m["motion"] != 2][:, :1])
    ds = DigitClips(n_per_class=2, cache_dir=tmp_path, frames=(4, 6))
    assert ds.data.shape == (20, 1, 16, 16, 16) and ds.data.dtype == np.uint8
    shapes = set()
    for step in range(12):
        x, y = ds.batch(step, 4, seed=1)
        assert x.dtype == np.float32 and x.shape[:2] == (4, 1) and x.shape[3:] == (16, 16)
        shapes.add(x.shape[2])
        # each clip of the batch is a window of consecutive frames of one stored clip
        idx = ds.batch_indices(step, 4, seed=1)
        full = ds.data[idx].astype(np.float32) / 127.5 - 1
        for b in range(4):
            starts = [s for s in range(16 - x.shape[2] + 1) if np.array_equal(full[b, :, s:s + x.shape[2]], x[b])]
            assert starts, "not a window of its clip"
        np.testing.assert_array_equal(ds.batch(step, 4, seed=1)[0], x)  # a pure function of (step, seed)
    assert shapes == {4, 6}
    with pytest.raises(ValueError, match="16 frames"):
        DigitClips(n_per_class=2, cache_dir=tmp_path, frames=(20,))


def test_size_buckets_hold_the_same_clips_at_each_size(tmp_path):
    from minidit.data import DigitClips, load_dataset

    ds = DigitClips(image_size=(16, 8), n_per_class=2, cache_dir=tmp_path, frames=(3, 5))
    assert ds.sizes == (8, 16) and ds.image_size == 16 and len(ds.cache_paths) == 2
    assert sorted(ds.shapes) == [(3, 8), (3, 16), (5, 8), (5, 16)]
    one = DigitClips(image_size=16, n_per_class=2, cache_dir=tmp_path, frames=(3, 5))
    np.testing.assert_array_equal(one.data, ds.data)  # the 16 px clips, from the cache
    # the 8 px clips are the same digits moving the same way: their centres of mass agree (in units of the side)
    from minidit.dev.evaluate import centres_of_mass
    small, large = (centres_of_mass(ds.by_size[s][:, 0, ..., None]) / s for s in (8, 16))
    assert np.abs(small - large).mean() < 0.05
    seen = set()
    for step in range(16):
        x, y = ds.batch(step, 4, seed=2)
        f, size = x.shape[2], x.shape[3]
        seen.add((f, size))
        assert x.shape == (4, 1, f, size, size) and (f, size) in ds.shapes
        np.testing.assert_array_equal(y, ds.labels[ds.batch_indices(step, 4, seed=2)])
    assert seen == set(ds.shapes)
    # one size draws the batches it drew before sizes were buckets: the same frame counts and windows
    for step in range(4):
        x1, _ = one.batch(step, 4, seed=2)
        rng = np.random.default_rng([2, step, 7])
        f = one.frames[rng.integers(2)]
        start = rng.integers(0, 16 - f + 1, size=4)
        idx = one.batch_indices(step, 4, seed=2)
        expect = np.stack([one.data[i, :, s:s + f] for i, s in zip(idx, start)]).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(x1, expect)
    with pytest.raises(ValueError, match="digits-clips"):
        load_dataset("digits", image_size=[16, 24])
    with pytest.raises(ValueError, match="out of range"):
        load_dataset("digits-clips", image_size=[16, 4], cache_dir=tmp_path)


def test_evaluate_clips_tells_motion_from_flicker_and_stills():
    from minidit.dev.evaluate import evaluate_clips, format_clip_table
    from minidit.digits import render_clips

    clips, labels, _ = render_clips(2, 6, 16, seed=4, progress=False)
    clips = clips[..., None]
    real = evaluate_clips(clips, labels)
    assert real["n"] == 120 and real["frames"] == 6 and 0 <= real["accuracy"] <= 1
    shuffled = clips[np.random.default_rng(0).integers(0, 20, size=(20, 6)), np.arange(6)]  # frames of other clips
    still = np.repeat(clips[:, :1], 6, axis=1)
    assert evaluate_clips(shuffled, labels)["motion"]["mean_jump"] > 3 * real["motion"]["mean_jump"]
    frozen = evaluate_clips(still, labels)
    assert frozen["motion"]["mean_jump"] == 0
    assert frozen["clip_accuracy"] == frozen["accuracy"]  # every frame the same: a clip is right iff its frame is
    assert real["clip_accuracy"] <= real["accuracy"] and 0 <= real["reference_clip_accuracy"] <= 1
    assert 0.5 < real["motion"]["mean_jump"] / real["reference_motion"]["mean_jump"] < 2
    assert "real clips" in format_clip_table(real) and "in every frame" in format_clip_table(real)


def test_train_sample_and_score_a_video_model(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from minidit import train as train_mod
    from minidit.checkpoint import load_model
    from minidit.dev.evaluate import main as evaluate_main
    from minidit.sample import main as sample_main

    monkeypatch.setattr("minidit.data.CLIPS_PER_CLASS", 1)  # 10 clips: enough to run, quick to render
    monkeypatch.setattr("minidit.data.default_cache_dir", lambda: tmp_path)  # not the repository's data/
    run = str(tmp_path / "video")
    train_mod.main(["--model", "video", "--data", "digits-clips", "--variant", "mini/8", "--frames", "4", "6",
                    "--image-size", "8", "16", "--batch-size", "2", "--steps", "3", "--log-every", "1",
                    "--sample-steps", "2", "--out", run])
    model = load_model(run)
    assert isinstance(model, VideoDiT) and model.spec.num_frames == 6 and model.spec.attention == "factorised"
    assert model.spec.input_size == 16  # the largest size bucket: the default sample size
    assert Image.open(os.path.join(run, "samples.gif")).n_frames == 6
    gif, npz = str(tmp_path / "c.gif"), str(tmp_path / "c.npz")
    sample_main(["--ckpt", run, "--class-labels", "3", "7", "--frames", "8", "--num-sampling-steps", "2",
                 "--out", gif, "--npz", npz])
    z = np.load(npz)
    assert z["arr_0"].shape == (2, 8, 16, 16, 1) and z["arr_0"].dtype == np.uint8 and z["labels"].tolist() == [3, 7]
    assert Image.open(gif).n_frames == 8  # a frame count it was not trained on
    evaluate_main([npz])
    sample_main(["--ckpt", run, "--class-labels", "1", "--size", "24", "--num-sampling-steps", "2", "--out", gif,
                 "--npz", npz])
    assert np.load(npz)["arr_0"].shape == (1, 6, 24, 24, 1)  # a size it was not trained on
    train_mod.main(["--resume", run, "--steps", "4", "--image-size", "8", "16"])
    with pytest.raises(SystemExit, match="--image-size"):
        train_mod.main(["--resume", run, "--steps", "5", "--image-size", "16"])
    with pytest.raises(SystemExit, match="patch 8 does not divide the frame size 12"):
        train_mod.main(["--model", "video", "--data", "digits-clips", "--image-size", "12", "16", "--steps", "1",
                        "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="digits-clips"):
        train_mod.main(["--model", "video", "--steps", "1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--out"):
        sample_main(["--ckpt", run, "--out", str(tmp_path / "c.png")])


def test_strict_backend_runs_the_video_model_like_numpy():
    """The device code path (minidit.dev.strict refuses host arrays in device math, as CuPy does)."""
    from minidit.backend import get_backend
    from minidit.xp import to_device, to_numpy

    ref = VideoDiT(TINY, num_frames=4, input_size=4, in_channels=2, num_classes=3, seed=1)
    dev = VideoDiT(TINY, num_frames=4, input_size=4, in_channels=2, num_classes=3, seed=1, backend="strict")
    rng = np.random.default_rng(0)
    state = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.params.items()}
    ref.load_state_dict(state)
    dev.load_state_dict(state)
    xp = get_backend("strict")
    x = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([0, 3])
    out, cache = dev.forward(*(to_device(a, xp) for a in (x, t, y)))
    ref_out, ref_cache = ref.forward(x, t, y)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-5, atol=1e-6)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads, ref_grads = dev.backward(to_device(dout, xp), cache), ref.backward(dout, ref_cache)
    for k in ref_grads:
        np.testing.assert_allclose(to_numpy(grads[k]), ref_grads[k], rtol=1e-4, atol=1e-5, err_msg=k)
