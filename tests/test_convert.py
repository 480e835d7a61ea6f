"""Official DiT .pt checkpoints -> minidit: the pretrained layout and train.py's, read safely, same outputs."""
import argparse

import numpy as np
import pytest

from minidit.checkpoint import load_model
from minidit.convert import infer_model
from minidit.convert import main as convert_main
from minidit.model import DiT, get_config, param_shapes


def random_official_state(seed=0):
    """A mini/4 (6 blocks, D 192, patch 4) at input 8, 4 channels, 10 classes, learned sigma, random weights."""
    model = DiT("mini/4", input_size=8, in_channels=4, num_classes=10, seed=seed)
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if k != "pos_embed" else v
            for k, v in model.params.items()}


def test_infer_model_reads_the_shapes():
    meta = infer_model(random_official_state())
    assert meta == dict(variant="mini/4", input_size=8, in_channels=4, num_classes=10, learn_sigma=True,
                        class_dropout_prob=0.1)
    xl = {k: np.empty(s, np.float32) for k, s in param_shapes(get_config("XL/2"), input_size=64).items()}
    assert infer_model(xl)["variant"] == "XL/2" and infer_model(xl)["input_size"] == 64  # DiT-XL-2-512x512.pt
    with pytest.raises(ValueError, match="no DiT variant has depth 6, hidden size 192 and patch size 3"):
        infer_model(dict(random_official_state(), **{"x_embedder.proj.weight": np.empty((192, 4, 3, 3))}))
    with pytest.raises(ValueError, match="not a DiT state dict: missing pos_embed"):
        infer_model({"weight": np.zeros(3)})


def test_without_pytorch_the_message_names_the_extra(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(SystemExit, match=r'needs PyTorch: pip install -e "\.\[torch\]"'):
        convert_main([str(tmp_path / "DiT-XL-2-256x256.pt"), str(tmp_path / "out.npz")])


torch = pytest.importorskip("torch")


def test_convert_pretrained_and_train_py_checkpoints(tmp_path, capsys):
    state = random_official_state()
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    pretrained = tmp_path / "DiT-mini-4.pt"
    torch.save(tensors, pretrained)
    ema = {k: v + 1 for k, v in tensors.items()}  # train.py: 'ema' is what sample.py uses
    trained = tmp_path / "0001000.pt"
    torch.save({"model": tensors, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-XL/2")},
               trained)
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t, y = np.array([3, 900]), np.array([1, 10])
    for src, want, entry in [(pretrained, state, "state dict"), (trained, {k: v + 1 for k, v in state.items()}, "ema")]:
        dst = tmp_path / (src.stem + ".npz")
        convert_main([str(src), str(dst)])
        assert f"(weights: {entry})" in capsys.readouterr().out
        model = load_model(str(dst))
        for k, v in want.items():
            np.testing.assert_array_equal(model.params[k], v, err_msg=k)
        ref = DiT("mini/4", input_size=8, in_channels=4, num_classes=10)
        ref.load_state_dict(want)
        np.testing.assert_array_equal(model.forward(x, t, y)[0], ref.forward(x, t, y)[0])


def test_convert_errors(tmp_path):
    notdit = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, notdit)
    with pytest.raises(SystemExit, match="not a DiT state dict"):
        convert_main([str(notdit), str(tmp_path / "o.npz")])
    state = random_official_state()
    del state["blocks.2.mlp.fc1.bias"]
    broken = tmp_path / "broken.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, broken)
    with pytest.raises(SystemExit, match="does not match DiT mini/4.*blocks.2.mlp.fc1.bias"):
        convert_main([str(broken), str(tmp_path / "o.npz")])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "o.npz")])
    class Evil:  # pickled code is refused: weights_only
        def __reduce__(self):
            return (print, ("ran code",))
    evil = tmp_path / "evil.pt"
    torch.save({"ema": Evil()}, evil)
    with pytest.raises(SystemExit, match="cannot be read safely|weights_only"):
        convert_main([str(evil), str(tmp_path / "o.npz")])
    with pytest.raises(SystemExit, match=r"must be an \.npz file.*o\.npz'"):  # writes what the name says, or refuses
        convert_main([str(broken), str(tmp_path / "o.safetensors")])
    assert not (tmp_path / "o.safetensors").exists()


def latte_state(num_classes, seed=0):
    """A Latte-format state dict (maxin-cn/Latte's names and shapes, float32 tables as it stores them) of a mini/4
    video DiT at 4 frames of 8 x 8 x 4, random weights: minidit's own, written the way Latte writes them."""
    from minidit.video import VideoDiT, frame_code, grid_code

    model = VideoDiT("mini/4", num_frames=4, input_size=8, in_channels=4, num_classes=num_classes, seed=seed)
    rng = np.random.default_rng(seed)
    state = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.params.items()}
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]  # Latte's per-frame Conv2d
    return {"pos_embed": grid_code(192, 2, 2)[None].astype(np.float32),
            "temp_embed": frame_code(192, 4)[:, 0][None].astype(np.float32), **state}


@pytest.mark.parametrize("num_classes, layout", [(10, "ema"), (0, "ema"), (10, "bare"), (0, "bare")])
def test_convert_latte_checkpoints(tmp_path, capsys, num_classes, layout):
    """Latte's published layout ({"ema": state dict}) and a bare state dict, class-conditional (UCF101-like) and
    unconditional (FaceForensics-like): the converted model is the video DiT with Latte's frame code, the same
    weights, and samples through minidit.sample."""
    from minidit.sample import main as sample_main

    state = latte_state(num_classes)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    src = tmp_path / "latte.pt"
    torch.save({"ema": tensors} if layout == "ema" else tensors, src)
    dst = tmp_path / "latte.npz"
    convert_main([str(src), str(dst)])
    assert "video DiT (Latte) mini/4 at input 4 frames of 8" in capsys.readouterr().out
    model = load_model(str(dst))
    assert model.spec.frame_code == "after-block-0" and model.spec.num_classes == num_classes
    assert model.spec.learn_sigma and model.spec.temporal_patch == 1
    np.testing.assert_array_equal(model.params["x_embedder.proj.weight"][:, :, 0], state["x_embedder.proj.weight"])
    assert ("y_embedder.embedding_table.weight" in model.params) == bool(num_classes)
    from minidit.vae import random_weights
    from test_vae import write_safetensors

    vae = tmp_path / "vae.safetensors"  # a 2-level toy VAE with 4 latent channels: 8 x 8 latents -> 16 x 16 px
    write_safetensors(vae, random_weights(channels=(32, 32)))
    out, npz = tmp_path / "clips.gif", tmp_path / "clips.npz"
    conditions = ["--class-labels", "3", "7"] if num_classes else ["--per-class", "2", "--cfg-scale", "1"]
    sample_main(["--ckpt", str(dst), *conditions, "--frames", "4", "--num-sampling-steps", "2", "--vae", str(vae),
                 "--out", str(out), "--npz", str(npz)])
    with np.load(npz) as f:  # every frame decoded to RGB; the classes asked for (none: unconditional)
        assert out.exists() and f["arr_0"].shape == (2, 4, 16, 16, 3)
        assert f["labels"].tolist() == [3, 7] if num_classes else "labels" not in f.files
    if not num_classes:
        with pytest.raises(SystemExit, match="unconditional.*use --cfg-scale 1"):
            sample_main(["--ckpt", str(dst), "--num-sampling-steps", "2", "--out", str(out)])
        with pytest.raises(SystemExit, match="unconditional.*takes no class labels"):
            sample_main(["--ckpt", str(dst), "--class-labels", "1", "--cfg-scale", "1", "--out", str(out)])


def test_convert_latte_errors(tmp_path):
    state = latte_state(10)
    bad = dict(state, temp_embed=state["temp_embed"] * 2)  # trained positions: not what minidit computes
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in bad.items()}}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="temp_embed is not the sin-cos table"):
        convert_main([str(tmp_path / "bad.pt"), str(tmp_path / "o.npz")])
    del state["blocks.5.attn.proj.weight"]
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "short.pt")
    with pytest.raises(SystemExit, match="does not match Latte mini/4.*blocks.5.attn.proj.weight"):
        convert_main([str(tmp_path / "short.pt"), str(tmp_path / "o.npz")])
