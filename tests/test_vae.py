"""The Stable Diffusion VAE port: its layers against their definitions, the safetensors reader, clear errors, the
latent pipeline end to end (encode a folder, train on the latents, sample and decode), and - when PyTorch and
diffusers are installed - encoder and decoder against diffusers' AutoencoderKL with the same random weights."""
import json
import struct

import numpy as np
import pytest
from PIL import Image

from minidit import train as train_mod
from minidit.encode import main as encode_main
from minidit.sample import main as sample_main
from minidit.vae import VAE, conv2d, group_norm, random_weights, read_safetensors

GROUPS = 4


def write_safetensors(path, tensors, dtype="F32"):
    """A minimal writer of the format (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        if dtype == "BF16":
            raw = (np.ascontiguousarray(a, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(a, dtype={"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# ---------------------------------------------------------------- layers against their definitions
@pytest.mark.parametrize("stride, padding, k", [(1, 1, 3), (2, 0, 3), (1, 0, 1)])
def test_conv2d_matches_the_definition(stride, padding, k):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, k, k)), rng.standard_normal(4)
    out = conv2d(x, w, b, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (xp.shape[2] - k) // stride + 1, (xp.shape[3] - k) // stride + 1
    ref = np.zeros((2, 4, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]  # (N, C, k, k)
            ref[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w) + b
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_group_norm_matches_the_definition():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 6, 3, 3)), rng.standard_normal(6), rng.standard_normal(6)
    out = group_norm(x, 3, w, b)
    for g in range(3):
        part = x[:, 2 * g:2 * g + 2]
        mu, var = part.mean(axis=(1, 2, 3), keepdims=True), part.var(axis=(1, 2, 3), keepdims=True)
        ref = (part - mu) / np.sqrt(var + 1e-6) * w[2 * g:2 * g + 2, None, None] + b[2 * g:2 * g + 2, None, None]
        np.testing.assert_allclose(out[:, 2 * g:2 * g + 2], ref, rtol=1e-12, atol=1e-12)


def test_vae_runs_on_device_backends(device_backend):
    """The same code on the strict device emulation (and CuPy with a GPU): no NumPy array leaks into device math,
    and encode / decode match NumPy."""
    from minidit.dev import strict
    from minidit.xp import get_xp, to_device, to_numpy

    weights = random_weights(channels=(8, 16))
    ref, dev = VAE(weights, norm_groups=GROUPS), VAE(weights, norm_groups=GROUPS, backend=device_backend)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    with strict.no_syncs():
        z = dev.encode(to_device(x, dev.xp))
        out = dev.decode(z)
    assert get_xp(z, out) is dev.xp and out.dtype == np.float32
    np.testing.assert_allclose(to_numpy(z), ref.encode(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(out), ref.decode(ref.encode(x)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- safetensors
@pytest.mark.parametrize("dtype, tol", [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2)])
def test_read_safetensors(tmp_path, dtype, tol):
    rng = np.random.default_rng(2)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.float32)}
    write_safetensors(tmp_path / "w.safetensors", tensors, dtype)
    got = read_safetensors(tmp_path / "w.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == np.float32 and got[k].shape == v.shape
        np.testing.assert_allclose(got[k], v, rtol=tol, atol=tol)


def test_vae_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE weights at"):
        VAE.from_file(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        VAE.from_file(str(junk))
    other = tmp_path / "other.safetensors"
    write_safetensors(other, {"model.layer.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not a Stable Diffusion VAE.*missing encoder.conv_in.weight"):
        VAE.from_file(str(other))
    with pytest.raises(ValueError, match="CompVis/ldm names"):
        VAE({"encoder.down.0.block.0.norm1.weight": np.ones(4)})
    with pytest.raises(ValueError, match="GroupNorm with 32 groups does not divide"):
        VAE(random_weights(channels=(8, 16)), norm_groups=32)


# ---------------------------------------------------------------- the latent pipeline end to end
def test_encode_train_sample_decode(tmp_path):
    """A folder of 16 px images -> latents (4 x 8 x 8 with this 2-level VAE) -> 2 DiT steps -> samples decoded."""
    vae_path = tmp_path / "vae.safetensors"
    weights = random_weights(channels=(32, 32))  # 32 channels: the SD VAE's 32 GroupNorm groups fit
    write_safetensors(vae_path, weights)
    rng = np.random.default_rng(3)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    z_path = str(tmp_path / "z.npz")
    encode_main(["--data", str(tmp_path / "imgs"), "--vae", str(vae_path), "--out", z_path, "--image-size", "16",
                 "--batch-size", "4", "--no-flip"])
    z = np.load(z_path)
    assert z["latents"].shape == (6, 4, 8, 8) and z["latents"].dtype == np.float32
    assert z["labels"].tolist() == [0, 0, 0, 1, 1, 1] and int(z["num_classes"]) == 2
    # 0.18215 x a sample of the posterior: near the scaled mean, not equal to it
    vae = VAE(weights)
    first = np.asarray(Image.open(tmp_path / "imgs" / "cats" / "0.png").convert("RGB"))[2:18, 1:17]  # center crop
    mean = vae.encode(first.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)[0]
    assert 0 < np.abs(z["latents"][0] - mean).max() < 0.18215 * 10
    run = str(tmp_path / "run")
    train_mod.main(["--variant", "mini/4", "--data", z_path, "--batch-size", "2", "--steps", "2", "--out", run,
                    "--no-final-samples"])
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "g.npz")
    sample_main(["--ckpt", run, "--class-labels", "0", "1", "--num-sampling-steps", "2", "--vae", str(vae_path),
                 "--out", grid, "--npz", npz])
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)  # decoded pixels, 8 x 8 latents -> 16 x 16 here
    write_safetensors(vae_path, random_weights(channels=(32, 32), latent=8))
    with pytest.raises(SystemExit, match="makes 4-channel samples but the VAE's latents have 8"):
        sample_main(["--ckpt", run, "--class-labels", "0", "--num-sampling-steps", "2", "--vae", str(vae_path),
                     "--out", grid])
    with pytest.raises(SystemExit, match="makes 4-channel samples"):  # refused before sampling, not after
        sample_main(["--ckpt", run, "--class-labels", "0", "--num-sampling-steps", "1000", "--vae", str(vae_path),
                     "--out", grid])


# ---------------------------------------------------------------- against diffusers
def test_against_diffusers_autoencoderkl():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                                  layers_per_block=2, latent_channels=4, norm_num_groups=GROUPS).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the default init: biases and norms away from 0 and 1
    weights = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    vae = VAE(weights, norm_groups=GROUPS)
    x = np.random.default_rng(4).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        z = 0.18215 * post.mean
        decoded = ref.decode(z / 0.18215).sample.numpy()
    mean, logvar = vae.encode_moments(x)
    diffs = {"encoder mean": np.abs(mean - post.mean.numpy()).max(),
             "encoder logvar": np.abs(logvar - post.logvar.numpy()).max(),
             "encode (scaled mean)": np.abs(vae.encode(x) - z.numpy()).max(),
             "decoder": np.abs(vae.decode(z.numpy()) - decoded).max()}
    print("max abs difference vs diffusers AutoencoderKL:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v < 1e-4 for v in diffs.values()), diffs
    # older diffusers files name the attention query/key/value/proj_attn
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0",
                                                                                                 "proj_attn"): v
              for k, v in weights.items()}
    np.testing.assert_array_equal(VAE(legacy, norm_groups=GROUPS).decode(z.numpy()), vae.decode(z.numpy()))
