"""Checkpoint files: round trip, atomic writes, clear errors, no pickles; the format: specs, versions, old files."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from minidit import checkpoint as ckpt
from minidit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    split_prefix,
    split_state,
)
from minidit.model import DiTConfig
from minidit.optim import EMA, AdamW


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "model.blocks.0.attn.qkv.weight": rng.standard_normal((6, 2)).astype(np.float32),
        "model.pos_embed": rng.standard_normal((1, 4, 2)).astype(np.float32),
        "ema.params.pos_embed": np.zeros((1, 4, 2), np.float32),
        "data.indices": np.arange(10, dtype=np.int64) * 2**40,
        "scalar": np.float64(3.5),
    }


META = {"config": {"model": "DiT-S/2", "image_size": 256, "betas": [0.9, 0.999]}, "step": 1234,
        "note": "ünïcødé", "none": None, "flag": True, "loss": 0.1234}


def test_round_trip(tmp_path):
    path = tmp_path / "0001234.npz"
    arrays = sample_arrays()
    save_checkpoint(path, arrays, META)
    got, meta = load_checkpoint(path)
    assert meta == META
    assert list(got) == list(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v), k
        np.testing.assert_array_equal(got[k], v)
    assert split_prefix(got, "model.").keys() == {"blocks.0.attn.qkv.weight", "pos_embed"}
    assert split_prefix(got, "ema.params.") == {"pos_embed": got["ema.params.pos_embed"]}
    assert os.listdir(tmp_path) == ["0001234.npz"]  # exactly that name, no ".npz" appended, no leftovers


def test_reserved_keys_and_bad_meta(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.npz", {"__meta__": np.zeros(1)}, {})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.npz", {"file": np.zeros(1)}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "a.npz", {}, {"x": np.zeros(2)})
    with pytest.raises(TypeError, match="dtype object"):
        save_checkpoint(tmp_path / "a.npz", {"o": np.array([{"a": 1}], dtype=object)}, {})
    assert os.listdir(tmp_path) == []


def _failing_savez(file, *args, **kwds):
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("disk full (simulated)")


def test_atomic_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"model.w": np.ones(3, np.float32)}, {"step": 1})
    monkeypatch.setattr(np, "savez", _failing_savez)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"model.w": np.full(3, 2, np.float32)}, {"step": 2})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(arrays["model.w"], np.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temp file left behind


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "savez", _failing_savez)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.npz", {"model.w": np.ones(3)}, {})
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.npz")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "c.npz"
    save_checkpoint(path, sample_arrays(), META)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_bytes_in_array_data(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"model.w": np.zeros(1000, np.float32)}, META)
    data = bytearray(path.read_bytes())
    i = data.index(b"\x00" * 64)  # inside the zeros of the array data
    data[i + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_not_an_npz(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not an .npz"):
        load_checkpoint(path)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an .npz"):
        load_checkpoint(empty)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy"):
        load_checkpoint(npy)


def test_torch_files_are_recognised(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(CheckpointError, match="(?s)pickle.*never unpickles.*minidit.convert") as e:
        load_checkpoint(legacy)
    assert "python -m minidit.convert IN.pt OUT.npz" in str(e.value)
    # torch.save's zip format (torch >= 1.6): archive/data.pkl, archive/version, archive/data/0 ...
    modern = tmp_path / "DiT-XL-2-256x256.pt"
    with zipfile.ZipFile(modern, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", b"\x00" * 16)
    with pytest.raises(CheckpointError, match="(?s)PyTorch checkpoint.*convert"):
        load_checkpoint(modern)


def test_plain_npz_without_meta(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(2))
    with pytest.raises(CheckpointError, match="no '__meta__'"):
        load_checkpoint(path)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    meta = np.frombuffer(json.dumps({}).encode(), np.uint8)
    np.savez(path, __meta__=meta, payload=np.array([{"a": 1}, None], dtype=object))  # np.savez pickles these
    with pytest.raises(CheckpointError, match="'payload' is a pickled object array"):
        load_checkpoint(path)


def test_split_state():
    params = {"w": np.ones(3), "pos_embed": np.zeros(2)}
    opt = AdamW(params, lr=1e-3)
    opt.step(params, {"w": np.ones(3)})
    arrays, scalars = split_state(opt.state_dict())
    assert set(arrays) == {"m.w", "v.w"}
    assert scalars == {"step": 1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                       "weight_decay": 0.0, "t.w": 1}
    json.dumps(scalars)


def test_training_state_through_a_checkpoint(tmp_path):
    """model + EMA + AdamW saved mid-run and resumed gives bit-identical continuation."""
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "pos_embed": np.ones((1, 2), np.float32)}
    opt = AdamW(params, lr=1e-2, weight_decay=0.01)
    ema = EMA(params, decay=0.9, warmup=True)

    def train_step(params, opt, ema, step):  # stateless randomness, as minidit.train's: step k draws from (0, k)
        opt.step(params, {"w": np.random.default_rng([0, step]).standard_normal((3, 4)).astype(np.float32)})
        ema.update(params)

    for step in range(3):
        train_step(params, opt, ema, step)
    opt_arrays, opt_scalars = split_state(opt.state_dict())
    ema_arrays, ema_scalars = split_state(ema.state_dict())
    arrays = {
        **ckpt.add_prefix(params, "model."),
        **ckpt.add_prefix(ema_arrays, "ema."),
        **ckpt.add_prefix(opt_arrays, "opt."),
    }
    meta = {"step": 3, "opt": opt_scalars, "ema": ema_scalars}
    save_checkpoint(tmp_path / "0000003.npz", arrays, meta)

    for step in range(3, 5):
        train_step(params, opt, ema, step)

    arrays, meta = load_checkpoint(tmp_path / "0000003.npz")
    params2 = split_prefix(arrays, "model.")
    opt2, ema2 = AdamW(params2), EMA(params2)
    opt2.load_state_dict({**split_prefix(arrays, "opt."), **meta["opt"]})
    ema2.load_state_dict({**split_prefix(arrays, "ema."), **meta["ema"]})
    for step in range(meta["step"], 5):
        train_step(params2, opt2, ema2, step)
    for k in params:
        np.testing.assert_array_equal(params2[k], params[k])
        np.testing.assert_array_equal(ema2.params[k], ema.params[k])
        assert params2[k].dtype == np.float32


# ---------------------------------------------------------------- the format: specs and versions
def tiny_spec(block="adaln-zero", **kw):
    """DiT's spec, or the paper's other designs' (ConditioningDiTSpec) for another block."""
    from minidit.conditioning import ConditioningDiTSpec
    from minidit.model import DiTSpec

    fields = dict(input_size=4, in_channels=1, num_classes=3, **kw)
    if block == "adaln-zero":
        return DiTSpec(DiTConfig(2, 16, 2, 2), **fields)
    return ConditioningDiTSpec(DiTConfig(2, 16, 2, 2), block=block, **fields)


@pytest.mark.parametrize("block", ["adaln-zero", "in-context"])
def test_training_checkpoint_rebuilds_the_model_from_its_spec(tmp_path, block):
    """save_training stores the spec; load() rebuilds the same class with the same weights, and the objective."""
    from minidit.diffusion import Diffusion

    spec = tiny_spec(block=block, learn_sigma=False)
    model = ckpt.build_model(spec.to_dict(), seed=1)
    objective = Diffusion("", learn_sigma=False)
    opt, ema = AdamW(model.params), EMA(model.params)
    ckpt.save_training(tmp_path / "c.npz", model=model, objective=objective, opt=opt, ema=ema, step=7,
                       args={"seed": 1}, class_names=["a", "b", "c"])
    loaded, obj, meta = ckpt.load(tmp_path / "c.npz", ema=False)
    assert type(loaded) is type(model) and loaded.spec == spec and meta["step"] == 7
    assert obj.spec() == objective.spec() and obj.learn_sigma is False
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])
    states, meta = ckpt.read_training(tmp_path / "c.npz")
    assert set(states) == {"model", "ema", "opt"} and meta["class_names"] == ["a", "b", "c"]


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """A "minidit-train-1" file (no model kind, no objective, maybe no block) loads as the DiT it describes."""
    model = ckpt.build_model(tiny_spec().to_dict(), seed=2)
    old_model_meta = {k: v for k, v in model.spec.to_dict().items() if k not in ("kind", "block")}
    save_checkpoint(tmp_path / "old.npz", ckpt.add_prefix(model.params, "ema.params."),
                    {"format": "minidit-train-1", "model": old_model_meta, "step": 3})
    loaded, objective, _ = ckpt.load(tmp_path / "old.npz")
    assert loaded.spec == model.spec and objective.kind == "ddpm" and objective.learn_sigma
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])


def test_a_minidit_2_video_checkpoint_keeps_its_frame_code_at_the_input(tmp_path):
    """Video DiTs written before the Latte layout added the frames' code at the input: they load with frame_code
    "input", computing what they were trained to compute."""
    from minidit.video import VideoDiTSpec

    spec = VideoDiTSpec(DiTConfig(2, 16, 2, 2), num_frames=2, input_size=4, in_channels=1, num_classes=3)
    model = ckpt.build_model({**spec.to_dict(), "frame_code": "input"}, seed=2)
    written = {k: v for k, v in spec.to_dict().items() if k != "frame_code"}  # as minidit-2 wrote it
    save_checkpoint(tmp_path / "v2.npz", ckpt.add_prefix(model.params, "ema.params."),
                    {"format": "minidit-2", "model": written, "objective": {"kind": "ddpm", "learn_sigma": True}})
    loaded = ckpt.load_model(tmp_path / "v2.npz")
    assert loaded.spec.frame_code == "input" and loaded.spec == model.spec
    assert VideoDiTSpec.of(written).frame_code == "after-block-0"  # a new spec: Latte's place


@pytest.mark.parametrize("kind, block", [("dit", "adaln-zero"), ("dit", "cross-attention"), ("dydit", "adaln-zero")])
def test_minidit_2_checkpoints_load_with_the_design_in_its_own_spec(tmp_path, kind, block):
    """minidit-2 stored the conditioning design as DiTSpec's "block" (and in DynamicDiTSpec's): upgrade() moves a
    design other than adaLN-Zero into ConditioningDiTSpec (kind "dit-conditioning") and drops adaLN-Zero's."""
    spec = tiny_spec(block)
    if kind == "dydit":
        from minidit.dynamic import DynamicDiTSpec

        spec = DynamicDiTSpec.of(spec.to_dict(), dynamic="depth")
    model = ckpt.build_model(spec.to_dict(), seed=2)
    written = {**spec.to_dict(), "kind": kind, "block": block}  # as minidit-2 wrote it
    save_checkpoint(tmp_path / "v2.npz", ckpt.add_prefix(model.params, "ema.params."),
                    {"format": "minidit-2", "model": written, "objective": {"kind": "ddpm", "learn_sigma": True},
                     "args": {"seed": 2}})
    loaded, _, meta = ckpt.load(tmp_path / "v2.npz")
    assert type(loaded) is type(model) and loaded.spec == spec and meta["format"] == ckpt.FORMAT
    assert meta["args"]["dynamic"] is None and meta["args"]["seed"] == 2  # options added later: their defaults
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])


def test_unknown_format_and_kind_are_named(tmp_path):
    save_checkpoint(tmp_path / "v9.npz", {}, {"format": "minidit-9"})
    with pytest.raises(CheckpointError, match="format 'minidit-9'.*reads 'minidit-3'"):
        ckpt.load(tmp_path / "v9.npz")
    save_checkpoint(tmp_path / "k.npz", {"ema.params.x": np.zeros(1)},
                    {"format": ckpt.FORMAT, "model": {"kind": "unet"}, "objective": {"kind": "ddpm"}})
    with pytest.raises(CheckpointError, match="unknown model kind 'unet'"):
        ckpt.load(tmp_path / "k.npz")
    save_checkpoint(tmp_path / "w.npz", {"ema.params.x": np.zeros(1)},
                    {"format": ckpt.FORMAT, "model": tiny_spec().to_dict(), "objective": {"kind": "ddpm"}})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        ckpt.read_training(tmp_path / "w.npz")


def test_an_mmdit_checkpoint_rebuilds_from_its_spec(tmp_path):
    """The loader is not DiT's alone: an MM-DiT's spec ("kind": "mmdit") rebuilds it, with a rectified-flow objective."""
    from minidit.flow import RectifiedFlow
    from minidit.mmdit import MMDiT, MMDiTSpec

    spec = MMDiTSpec(sample_size=4, patch_size=2, in_channels=2, num_layers=2, attention_head_dim=4,
                     num_attention_heads=2, joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=5,
                     out_channels=2, pos_embed_max_size=4)
    model = MMDiT(spec, seed=3)
    ckpt.save_weights(tmp_path / "m.npz", spec.to_dict(), RectifiedFlow(shift=3.0).spec(), model.params)
    loaded, objective, _ = ckpt.load(tmp_path / "m.npz")
    assert isinstance(loaded, MMDiT) and loaded.spec == spec and objective.shift == 3.0
    for k in model.params:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])
