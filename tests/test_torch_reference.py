"""minidit vs an independent PyTorch eager DiT (minidit/dev/torch_reference.py, from docs/dit-facts.md), llm.c-style.

At random (non-zero) parameters: the forward output, EVERY parameter gradient and the input gradient for the same
random dout, tensor by tensor; the training loss and d loss / d output; a few whole training steps (AdamW + EMA).
The video model likewise against TorchLatte (the official Latte, written from its forward), which is itself checked
first against the numbers of the official Latte code (tests/fixtures/tiny_latte_f64.npz).
Each comparison prints one line (run `pytest -s tests/test_torch_reference.py` to see the table):

    name  shape  max|torch|  maxdiff  rel = maxdiff / max|torch|

Tolerances: float64 rel <= 1e-10, float32 rel <= 1e-4. Skipped when torch is not installed (pip install -e ".[torch]").
"""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minidit import DiT, DiTConfig, param_shapes  # noqa: E402
from minidit.dev import torch_reference as tr  # noqa: E402
from minidit.diffusion import Diffusion, cfg_model_fn  # noqa: E402
from minidit.layers import timestep_embedding  # noqa: E402
from minidit.optim import EMA, AdamW  # noqa: E402
from minidit.video import VideoDiT, frame_code, grid_code  # noqa: E402

TINY = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2)
TOL = {np.float64: 1e-10, np.float32: 1e-4}


class Table:
    """Collects max differences, prints one line per tensor, fails at the end listing every tensor over tolerance."""

    def __init__(self, title, tol):
        self.tol, self.bad = tol, []
        print(f"\n== {title} (tolerance rel <= {tol:g}) ==")
        print(f"{'tensor':44s} {'shape':>18s} {'max|torch|':>11s} {'maxdiff':>10s} {'rel':>9s}")

    def check(self, name, ours, ref, tol=None):
        ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs torch {ref.shape}"
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        diff = float(np.abs(ours - ref).max()) if ref.size else 0.0
        rel = diff / scale if scale > 0 else diff
        print(f"{name:44s} {str(ref.shape):>18s} {scale:11.3e} {diff:10.3e} {rel:9.1e}")
        if not rel <= (self.tol if tol is None else tol):
            self.bad.append(f"{name}: rel {rel:.2e}")

    def done(self):
        assert not self.bad, "over tolerance: " + "; ".join(self.bad)


@pytest.fixture
def shared_sinusoid(monkeypatch):
    """Both models compute the timestep sinusoid in float32 (as official), but numpy's and torch's float32 exp/cos
    differ by an ulp, i.e. up to ~6e-5 at t ~ 1000 (see test_timestep_sinusoid). For tight comparisons the torch
    model is given minidit's sinusoid, so what is compared is everything after it."""
    def emb(t, dim, max_period=10000):
        return torch.from_numpy(timestep_embedding(t.numpy(), dim, max_period))
    monkeypatch.setattr(tr.TimestepEmbedder, "timestep_embedding", staticmethod(emb))


def randomize(model, rng, scaled):
    """Every parameter but the fixed pos_embed -> random. scaled=False: N(0, 0.3). scaled=True: weights
    N(0, 1/fan_in) and biases N(0, 0.1^2), so a 12-block model keeps O(1) activations and an unsaturated softmax."""
    for name, p in model.params.items():
        if name == "pos_embed":
            continue
        if not scaled:
            std = 0.3
        elif p.ndim >= 2 and "embedding_table" not in name:
            std = 1.0 / math.sqrt(math.prod(p.shape[1:]))
        else:
            std = 0.1 if p.ndim == 1 else 1.0
        p[...] = rng.normal(0.0, std, size=p.shape).astype(p.dtype)


def swap_frames(a):
    """minidit's clips (N, C, F, H, W) <-> Latte's (N, F, C, H, W): swap the channel and frame axes."""
    return np.ascontiguousarray(a.swapaxes(1, 2))


def compare_forward_backward(model, tm, table, x, t, y, force_drop_ids=None, rng=None, video=False):
    """Same inputs and dout through both; checks output, every parameter gradient, dx. video: tm is a TorchLatte, whose
    inputs and outputs are (N, F, C, H, W) where minidit's are (N, C, F, H, W), and whose patch weight is the Conv2d
    (D, C, p, p) where minidit's is the Conv3d (D, C, 1, p, p)."""
    layout = swap_frames if video else (lambda a: a)
    out, cache = model.forward(x, t, y, force_drop_ids=force_drop_ids)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads, dx = model.backward(dout, cache, return_dx=True)

    xt = torch.from_numpy(layout(x)).requires_grad_(True)
    fd = None if force_drop_ids is None else torch.from_numpy(force_drop_ids)
    tout = tm(xt, torch.from_numpy(t), None if y is None else torch.from_numpy(y), force_drop_ids=fd)
    tout.backward(torch.from_numpy(layout(dout)))

    table.check("output", out, layout(tout.detach().numpy()))
    tgrads = {k: p.grad for k, p in tm.named_parameters() if p.requires_grad}
    assert list(grads) == list(tgrads), "gradient names/order differ from the official trainable parameters"
    for name, g in grads.items():
        ref = tgrads[name].numpy()
        table.check("d " + name, g.reshape(ref.shape) if video else g, ref)
    table.check("d x", dx, layout(xt.grad.numpy()))
    assert tm.pos_embed.grad is None and "pos_embed" not in grads  # frozen on both sides
    return out


# ----------------------------------------------------------------------------------------------------
# the model


def test_reference_model_is_the_official_layout():
    """Names, order, shapes of the official state_dict (docs/dit-facts.md); 0 buffers; pos_embed and zero output at
    init as minidit."""
    ref = tr.TorchDiT("S/2")
    sd = ref.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == list(param_shapes(DiT("S/2").config).items())
    assert len(sd) == 132 and len(list(ref.buffers())) == 0
    assert sum(p.numel() for p in ref.parameters()) == 32_963_360
    assert not ref.pos_embed.requires_grad
    np.testing.assert_array_equal(ref.pos_embed.numpy(), DiT("S/2").params["pos_embed"])
    ref.eval()
    out = ref(torch.randn(2, 4, 32, 32), torch.tensor([0, 999]), torch.tensor([3, 1000]))
    assert out.shape == (2, 8, 32, 32) and bool((out == 0).all())


def test_timestep_sinusoid():
    """The float32 sinusoid: equal at t = 0, within a few float32 ulps of the argument (~1e-4 at t ~ 1000) elsewhere."""
    t = np.arange(1000)
    ours = timestep_embedding(t, 256)
    ref = tr.TimestepEmbedder.timestep_embedding(torch.from_numpy(t), 256).numpy()
    assert ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours[0], ref[0])
    diff = np.abs(ours - ref).max()
    print(f"\ntimestep sinusoid (float32, t = 0..999): max |numpy - torch| = {diff:.2e}")
    assert diff < 3e-4


@pytest.mark.parametrize("drop", [False, True], ids=["labels", "force_drop_ids"])
def test_tiny_float64_every_gradient(shared_sinusoid, drop):
    rng = np.random.default_rng(0)
    model = DiT(TINY, input_size=8, in_channels=4, num_classes=10, dtype=np.float64, seed=0)
    randomize(model, rng, scaled=False)
    tm = tr.build_torch_dit(model, torch.float64).eval()
    x = rng.standard_normal((4, 4, 8, 8))
    t, y = np.array([0, 1, 500, 999]), np.array([3, 9, 0, 10])  # 10 = the null class
    force = np.array([1, 0, 1, 0]) if drop else None
    table = Table(f"tiny DiT float64, batch 4, {'force_drop_ids ' + str(force) if drop else 'no label drop'}",
                  TOL[np.float64])
    out = compare_forward_backward(model, tm, table, x, t, y, force, rng)
    table.done()
    if drop:  # a dropped label is exactly the null class
        out_null, _ = model.forward(x, t, np.where(force == 1, 10, y))
        np.testing.assert_array_equal(out, out_null)


def test_s2_float32_every_gradient(shared_sinusoid):
    rng = np.random.default_rng(1)
    model = DiT("S/2", input_size=32, in_channels=4, num_classes=1000, seed=0)  # official init, then randomized
    randomize(model, rng, scaled=True)
    tm = tr.build_torch_dit(model, torch.float32).eval()
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    table = Table("DiT-S/2 float32, batch 2", TOL[np.float32])
    compare_forward_backward(model, tm, table, x, np.array([3, 871]), np.array([207, 1000]), None, rng)
    table.done()


def test_forward_with_cfg(shared_sinusoid):
    """Official forward_with_cfg (3 guided channels) == minidit's cfg_model_fn(guide_channels=3) on the kept half."""
    rng = np.random.default_rng(2)
    model = DiT(TINY, input_size=8, in_channels=4, num_classes=10, dtype=np.float64)
    randomize(model, rng, scaled=False)
    tm = tr.build_torch_dit(model, torch.float64).eval()
    x, t, y = rng.standard_normal((3, 4, 8, 8)), np.array([5, 500, 999]), np.array([1, 2, 3])
    fn = cfg_model_fn(lambda a, b, c: model.forward(a, b, c)[0], y, 10, 4.0, guide_channels=3)
    ours = fn(x, t)
    ref = tm.forward_with_cfg(torch.from_numpy(np.concatenate([x, x])), torch.from_numpy(np.concatenate([t, t])),
                              torch.from_numpy(np.concatenate([y, [10, 10, 10]])), 4.0)[:3]
    table = Table("forward_with_cfg, scale 4, float64", TOL[np.float64])
    table.check("guided output (conditional half)", ours, ref.detach().numpy())
    table.done()


# ----------------------------------------------------------------------------------------------------
# the loss and whole training steps


def loss_both_sides(dtype, rng, t):
    """minidit's and the official loss and d loss / d output, for one random draw at timesteps t."""
    N = len(t)
    x_start = rng.uniform(-1.1, 1.1, size=(N, 4, 8, 8))  # at t = 0 this hits both open edge bins too
    noise = rng.standard_normal(x_start.shape)
    out = np.concatenate([rng.standard_normal((N, 4, 8, 8)), rng.uniform(-1.5, 1.5, (N, 4, 8, 8))], axis=1)
    x_start, noise, out = (a.astype(dtype) for a in (x_start, noise, out))

    loss, terms, dout = Diffusion("").training_loss(out, x_start, t, noise)
    tout = torch.from_numpy(out).requires_grad_(True)
    tterms = tr.TorchDiffusion().training_losses(lambda x_t, t_: tout, torch.from_numpy(x_start),
                                                 torch.from_numpy(t), noise=torch.from_numpy(noise))
    tloss = tterms["loss"].mean()
    tloss.backward()
    ours = dict(terms, total=loss, dout=dout)
    ref = dict({k: v.detach().numpy() for k, v in tterms.items()}, total=tloss.item(), dout=tout.grad.numpy())
    return ours, ref


LOSS_ROWS = [("mse", "terms['mse'] per sample"), ("vb", "terms['vb'] per sample"),
             ("loss", "terms['loss'] per sample"), ("total", "loss"), ("dout", "d loss / d output")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_training_loss_and_dout(dtype):
    """MSE + VLB (frozen mean, learned range, discretized Gaussian at t = 0) and d loss / d output, vs autograd.

    float32 skips t = 0: there the official formula subtracts two CDFs that are both near 0 or 1, and the float32
    result (either side's) is off from the float64 one by up to 100% in d loss / d output (the 1e-12 clamp acts),
    so float32 differences at t = 0 measure rounding luck, not correctness. t = 0 is checked in float64."""
    t = np.array([0, 0, 1, 2, 10, 500, 998, 999]) if dtype == np.float64 else np.array([1, 2, 10, 500, 998, 999])
    ours, ref = loss_both_sides(dtype, np.random.default_rng(3), t)
    table = Table(f"training loss, t = {t.tolist()}, {np.dtype(dtype).name}", TOL[dtype])
    for key, label in LOSS_ROWS:
        table.check(label, ours[key], ref[key])
    table.done()


def test_training_steps_float64(shared_sinusoid):
    """Four whole steps (q_sample, forward, loss, backward, AdamW, EMA): the loss each step, then every parameter
    and every EMA parameter, minidit vs torch.optim.AdamW + the official update_ema (label dropout forced).
    No t = 0 here: with a random model the t = 0 term sits in the far tail of the discretized Gaussian, where
    even float64 loses digits to cancellation (both sides alike); the t = 0 loss is checked above."""
    rng = np.random.default_rng(4)
    model = DiT(TINY, input_size=8, in_channels=4, num_classes=10, dtype=np.float64)
    # O(1) activations: the k part of attn.qkv.bias has an exactly zero gradient (softmax ignores a per-row
    # shift), so its computed gradient is pure rounding, which Adam divides by sqrt(v) + eps. With N(0, 0.3)
    # weights the gradients reach ~1e6 and that rounding (~1e-10) becomes visible steps; here it stays ~1e-17.
    randomize(model, rng, scaled=True)
    tm = tr.build_torch_dit(model, torch.float64).train()
    opt, ema = AdamW(model.params, lr=1e-3), EMA(model.params, decay=0.9)
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-3, weight_decay=0.0)
    tema = copy.deepcopy(tm).requires_grad_(False)
    diffusion, tdiffusion = Diffusion(""), tr.TorchDiffusion()

    table = Table("4 training steps, tiny DiT float64, AdamW lr 1e-3, EMA 0.9", TOL[np.float64])
    for step in range(4):
        x0 = rng.uniform(-1, 1, size=(4, 4, 8, 8))
        y = rng.integers(0, 10, size=4)
        t = np.array([1, 2, 999, rng.integers(1, 1000)])
        noise, force = rng.standard_normal(x0.shape), rng.integers(0, 2, size=4)

        out, cache = model.forward(diffusion.q_sample(x0, t, noise), t, y, train=True, force_drop_ids=force)
        loss, _, dout = diffusion.training_loss(out, x0, t, noise)
        opt.step(model.params, model.backward(dout, cache))
        ema.update(model.params)

        tterms = tdiffusion.training_losses(tm, torch.from_numpy(x0), torch.from_numpy(t),
                                            dict(y=torch.from_numpy(y), force_drop_ids=torch.from_numpy(force)),
                                            noise=torch.from_numpy(noise))
        tloss = tterms["loss"].mean()
        topt.zero_grad()
        tloss.backward()
        topt.step()
        tr.update_ema(tema, tm, decay=0.9)
        table.check(f"step {step} loss", loss, tloss.item())
    for prefix, ours, ref in (("", model.params, tm), ("ema ", ema.params, tema)):
        for name, p in ref.named_parameters():
            a, b = ours[name], p.detach().numpy()
            if name.endswith("attn.qkv.bias"):  # [q | k | v]: the k part's true gradient is exactly 0, so Adam
                D = a.shape[0] // 3  # steps it by lr * rounding / (|rounding| + eps): compared at 1e-8
                table.check(prefix + name + " q,v", np.r_[a[:D], a[2 * D:]], np.r_[b[:D], b[2 * D:]])
                table.check(prefix + name + " k", a[D:2 * D], b[D:2 * D], tol=1e-8)
            else:
                table.check(prefix + name, a, b)
    table.done()


# ----------------------------------------------------------------------------------------------------
# the video model: TorchLatte against the official Latte's numbers, then minidit's VideoDiT against TorchLatte

LATTE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_latte_f64.npz"
VIDEO_TINY = DiTConfig(depth=4, hidden_size=32, num_heads=4, patch_size=2)  # two spatial-temporal pairs


@pytest.fixture(scope="module")
def latte_fixture():
    with np.load(LATTE_FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("mode", ["cond", "uncond"])
def test_torch_latte_is_the_official_latte(latte_fixture, monkeypatch, mode):
    """TorchLatte with the fixture's parameters (the official Latte's state dict, loaded strictly) reproduces what the
    official code computed: the output, dx and every parameter gradient, float64. The fixture's sinusoid is NumPy's
    float32 one (numpy_sinusoid), so this reference uses it too. Also: the state dict's names, order and shapes are
    Latte's, and TorchLatte's own init tables are the official float64 ones up to Latte's float32 storage."""
    monkeypatch.setattr(tr.TimestepEmbedder, "timestep_embedding", staticmethod(tr.numpy_sinusoid))
    c = json.loads(str(latte_fixture["config"]))
    io = {k[len(mode) + 1:]: v for k, v in latte_fixture.items() if k.startswith(mode + "/")}
    state = {k[len("param/"):]: torch.from_numpy(v) for k, v in io.items() if k.startswith("param/")}
    cfg = DiTConfig(c["depth"], c["hidden_size"], c["num_heads"], c["patch_size"], c["mlp_ratio"])
    tm = tr.TorchLatte(cfg, input_size=c["input_size"], num_frames=c["num_frames"], in_channels=c["in_channels"],
                       num_classes=c["num_classes"] if mode == "cond" else 0, learn_sigma=c["learn_sigma"],
                       class_dropout_prob=c["class_dropout_prob"]).double().eval()
    assert [(k, tuple(v.shape)) for k, v in tm.state_dict().items()] == [(k, tuple(v.shape)) for k, v in state.items()]
    for name in ("pos_embed", "temp_embed"):
        np.testing.assert_allclose(getattr(tm, name).detach().numpy(), state[name].numpy(), rtol=0, atol=1e-7)
    tm.load_state_dict(state, strict=True)

    x = torch.from_numpy(io["x"]).requires_grad_(True)  # (N, F, C, H, W)
    out = tm(x, torch.from_numpy(io["t"]), torch.from_numpy(io["y"]) if mode == "cond" else None)
    out.backward(torch.from_numpy(io["dout"]))
    table = Table(f"TorchLatte vs the official Latte ({mode}), float64", TOL[np.float64])
    table.check("output", out.detach().numpy(), io["out"])
    table.check("d x", x.grad.numpy(), io["dx"])
    grads = {k: p.grad.numpy() for k, p in tm.named_parameters() if p.requires_grad}
    assert set(grads) == {k[len("grad/"):] for k in io if k.startswith("grad/")}
    for name, g in grads.items():
        table.check("d " + name, g, io["grad/" + name])
    table.done()


@pytest.mark.parametrize("mode", ["cond", "uncond"])
def test_video_tiny_float64_every_gradient(shared_sinusoid, mode):
    """minidit's VideoDiT and TorchLatte, the same N(0, 0.3^2) weights: output, every parameter gradient and dx.
    3 frames of 8 x 8 (16 positions), so frames and positions cannot be confused; the conditional batch forces one
    label to the null class."""
    rng = np.random.default_rng(5)
    cond = mode == "cond"
    model = VideoDiT(VIDEO_TINY, num_frames=3, input_size=8, in_channels=4, num_classes=10 if cond else 0,
                     class_dropout_prob=0.1 if cond else 0.0, dtype=np.float64)
    randomize(model, rng, scaled=False)
    tm = tr.build_torch_latte(model, torch.float64).eval()
    x = rng.standard_normal((3, 4, 3, 8, 8))  # (N, C, F, H, W)
    t = np.array([0, 17, 999])
    y, force = (np.array([3, 9, 10]), np.array([0, 1, 0])) if cond else (None, None)
    table = Table(f"tiny VideoDiT vs TorchLatte, float64, {mode}", TOL[np.float64])
    compare_forward_backward(model, tm, table, x, t, y, force, rng, video=True)
    table.done()


def test_video_s2_float32_every_gradient(shared_sinusoid):
    rng = np.random.default_rng(6)
    model = VideoDiT("S/2", num_frames=4, input_size=16, in_channels=4, num_classes=101, seed=0)
    randomize(model, rng, scaled=True)
    tm = tr.build_torch_latte(model, torch.float32).eval()
    x = rng.standard_normal((2, 4, 4, 16, 16)).astype(np.float32)
    table = Table("VideoDiT-S/2 vs TorchLatte, float32, 4 frames of 16 x 16, batch 2", TOL[np.float32])
    compare_forward_backward(model, tm, table, x, np.array([3, 871]), np.array([7, 101]), None, rng, video=True)
    table.done()


def test_build_torch_latte_takes_only_latte_s_layout():
    """The tables build_torch_latte loads are minidit's; the options Latte does not have are refused by name."""
    model = VideoDiT(VIDEO_TINY, num_frames=3, input_size=8, in_channels=4, num_classes=0)
    tm = tr.build_torch_latte(model)
    np.testing.assert_array_equal(tm.pos_embed.numpy()[0], grid_code(32, 4, 4).astype(np.float32))
    np.testing.assert_array_equal(tm.temp_embed.numpy()[0], frame_code(32, 3)[:, 0].astype(np.float32))
    assert tm.y_embedder is None and tm.x_embedder.proj.weight.shape == (32, 4, 2, 2)
    for option, match in ((dict(temporal_patch=3), "temporal_patch 3"), (dict(attention="full"), "attention 'full'"),
                          (dict(frame_code="input"), "frame_code 'input'")):
        other = VideoDiT(VIDEO_TINY, num_frames=3, input_size=8, in_channels=4, num_classes=0, **option)
        with pytest.raises(ValueError, match=f"not Latte's layout, it has {match}"):
            tr.build_torch_latte(other)
    with pytest.raises(ValueError, match="depth 3 is odd"):
        tr.build_torch_latte(VideoDiT(DiTConfig(3, 32, 4, 2), num_frames=3, input_size=8, num_classes=0))


def test_latte_training_loss_on_frames_first_clips():
    """TorchDiffusion(channel_dim=2), the loss on Latte's (N, F, 2C, H, W) output, equals minidit's loss on the same
    clips as (N, 2C, F, H, W), and so does d loss / d output (the bench's torch side trains with it)."""
    rng = np.random.default_rng(7)
    x0, noise = rng.uniform(-1, 1, (2, 3, 4, 4, 4)), rng.standard_normal((2, 3, 4, 4, 4))  # (N, C, F, H, W)
    out = np.concatenate([rng.standard_normal((2, 3, 4, 4, 4)), rng.uniform(-1, 1, (2, 3, 4, 4, 4))], axis=1)
    t = np.array([1, 600])
    loss, _, dout = Diffusion("").training_loss(out, x0, t, noise)
    tout = torch.from_numpy(swap_frames(out)).requires_grad_(True)
    tx0, tnoise, tt = torch.from_numpy(swap_frames(x0)), torch.from_numpy(swap_frames(noise)), torch.from_numpy(t)
    diffusion = tr.TorchDiffusion(channel_dim=2)
    tloss = diffusion.losses_from_output(tout, tx0, diffusion.q_sample(tx0, tt, tnoise), tt, tnoise)["loss"].mean()
    tloss.backward()
    table = Table("the loss on (N, F, C, H, W) clips, channel_dim 2, float64", TOL[np.float64])
    table.check("loss", loss, tloss.item())
    table.check("d loss / d output", dout, swap_frames(tout.grad.numpy()))
    table.done()
