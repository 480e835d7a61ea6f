"""minidit's MMDiT vs diffusers' SD3Transformer2DModel, with diffusers' own (randomised) weights loaded by name.

What was checked in the diffusers source (0.42) and pinned here: the time embedding is Timesteps(256,
flip_sin_to_cos=True, downscale_freq_shift=0), i.e. minidit's sinusoid (cos first, frequencies divided by half); the
pooled projection is PixArtAlphaTextProjection with act_fn="silu"; AdaLayerNormZero chunks (shift_msa, scale_msa,
gate_msa, shift_mlp, scale_mlp, gate_mlp); AdaLayerNormContinuous (norm_out and the last block's norm1_context)
chunks (scale, shift); every LayerNorm has no affine and eps 1e-6, the qk RMSNorm eps 1e-6; pos_embed is a persistent
float32 buffer built with base_size = sample_size // patch_size and cropped at the centre; unpatchify is "nhwpqc ->
nchpwq" and works for H != W.

Two details differ in float64 only, and the float64 comparison replaces them by minidit's (the float32 one does not):

  1. diffusers' RMSNorm computes mean(x^2) in float32 whatever the input dtype (`hidden_states.to(torch.float32)`),
     so a float64 diffusers model with qk_norm="rms_norm" is only float32-accurate there; minidit computes it in the
     input dtype. In float32 the two are the same formula.
  2. The sinusoid: both compute it in float32 and cast it to the model's dtype, but numpy's and torch's float32 exp
     (the frequency table already differs in some entries), sin and cos may differ in the last place (~6e-5 at
     t = 999). Not a difference in the function: test_timestep_sinusoid_is_diffusers_sd3s bounds it.

Layout (not a difference in the function): minidit stores each stream's q, k, v fused (attn.qkv, attn.add_qkv);
to_diffusers_state_dict / from_diffusers_state_dict split and stack them. Skipped without torch and diffusers.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.models import embeddings, normalization  # noqa: E402

from minidit.gradcheck import rel_error  # noqa: E402
from minidit.layers import timestep_embedding  # noqa: E402
from minidit.mmdit import MMDiT, MMDiTSpec, from_diffusers_state_dict, to_diffusers_state_dict  # noqa: E402

CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
           pos_embed_max_size=8)
QK_NORMS = [None, "rms_norm"]


def diffusers_model(qk_norm, seed=0, **overrides):
    """A float64 SD3Transformer2DModel whose every parameter is random N(0, 0.3^2) (nothing zero, nothing one)."""
    torch.manual_seed(seed)
    dm = diffusers.SD3Transformer2DModel(**{**CFG, **overrides}, qk_norm=qk_norm).double().eval()
    with torch.no_grad():
        for p in dm.parameters():
            p.normal_(0.0, 0.3)
    return dm


def minidit_model(dm, dtype=np.float64):
    model = MMDiT(MMDiTSpec.of(dict(dm.config)), dtype=dtype)
    model.load_state_dict(from_diffusers_state_dict(dm.state_dict()))
    return model


def inputs(seed=0, N=3, H=8, W=8, L=5):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((N, 4, H, W)), t=np.array([0.5, 250.0, 999.0])[:N],
                context=rng.standard_normal((N, L, 12)), pooled=rng.standard_normal((N, 10)))


def run_diffusers(dm, inp, dtype=torch.float64, requires_grad=False):
    ts = {k: torch.tensor(v, dtype=dtype if k != "t" else torch.float64, requires_grad=requires_grad and k != "t")
          for k, v in inp.items()}
    out = dm(hidden_states=ts["x"], encoder_hidden_states=ts["context"], pooled_projections=ts["pooled"],
             timestep=ts["t"], return_dict=False)[0]
    return out, ts


def rel(a, b):
    """max |a - b| / max |b|: the worst entry, relative to the output's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _rms_norm_in_input_dtype(self, h):
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return h * self.weight if self.weight is not None else h


@pytest.fixture
def float64_details(monkeypatch):
    """The two float64-only details of the module docstring, replaced by minidit's."""
    monkeypatch.setattr(embeddings.Timesteps, "forward",
                        lambda self, ts: torch.from_numpy(timestep_embedding(ts.detach().numpy(), 256)))
    monkeypatch.setattr(normalization.RMSNorm, "forward", _rms_norm_in_input_dtype)


def test_the_modules_are_the_ones_minidit_implements():
    dm = diffusers_model("rms_norm")
    tp = dm.time_text_embed.time_proj
    assert (tp.num_channels, tp.flip_sin_to_cos, tp.downscale_freq_shift, tp.scale) == (256, True, 0, 1)
    assert isinstance(dm.time_text_embed.text_embedder.act_1, torch.nn.SiLU)
    assert isinstance(dm.time_text_embed.timestep_embedder.act, torch.nn.SiLU)
    last = dm.transformer_blocks[-1]
    assert last.context_pre_only and isinstance(last.norm1_context, normalization.AdaLayerNormContinuous)
    assert last.ff_context is None and last.attn.to_add_out is None and last.norm2_context is None
    assert dm.norm_out.norm.eps == 1e-6 and dm.transformer_blocks[0].norm2.eps == 1e-6
    assert dm.transformer_blocks[0].attn.norm_q.eps == 1e-6
    assert "pos_embed.pos_embed" in dm.state_dict() and not dm.pos_embed.pos_embed.requires_grad


def test_timestep_sinusoid_is_diffusers_sd3s():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.r_[0.5, 250.0, 999.0, np.arange(1000.0), np.random.default_rng(0).uniform(0, 1000, 2000)]
    ours = timestep_embedding(t, 256)
    theirs = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    d = np.abs(ours - theirs).max()
    print(f"\nsinusoid, t in [0, 1000): max |minidit - diffusers SD3| = {d:.2e} (float32 ulps of t * freq)")
    assert ours.dtype == theirs.dtype == np.float32 and d < 3e-4


def test_fresh_pos_embed_is_diffusers_buffer():
    """The same construction (base_size = sample_size // patch_size scales the grid), bit for bit in float32."""
    for sample_size, patch_size, M, heads in ((8, 2, 8, 2), (8, 2, 12, 2), (16, 2, 6, 3), (8, 1, 24, 2)):
        cfg = dict(CFG, sample_size=sample_size, patch_size=patch_size, pos_embed_max_size=M,
                   num_attention_heads=heads, caption_projection_dim=8 * heads)
        theirs = diffusers.SD3Transformer2DModel(**cfg).pos_embed.pos_embed.numpy()
        ours = MMDiT(MMDiTSpec(**cfg)).params["pos_embed.pos_embed"]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_forward_and_every_gradient_match_in_float64(qk_norm, float64_details):
    dm = diffusers_model(qk_norm)
    model = minidit_model(dm)
    inp = inputs()
    ours, cache = model.forward(**inp)
    out, ts = run_diffusers(dm, inp, requires_grad=True)
    r_out = rel(ours, out.detach().numpy())
    dout = np.random.default_rng(1).standard_normal(ours.shape)
    out.backward(torch.from_numpy(dout))
    grads, d = model.backward(dout, cache, return_dx=True)
    ours_by_diffusers_name = to_diffusers_state_dict(grads)  # the fused q, k, v gradients split like the weights
    theirs = {k: p.grad.numpy() for k, p in dm.named_parameters()}
    assert set(ours_by_diffusers_name) == set(theirs)
    rows = [(k, ours_by_diffusers_name[k], theirs[k]) for k in theirs]
    rows += [(name, d[name], ts[name].grad.numpy()) for name in ("x", "context", "pooled")]
    print(f"\nqk_norm={qk_norm}, float64: output max rel diff {r_out:.2e}")
    print(f"{'gradient':60s} {'||grad||':>10s} {'rel diff':>9s}")
    worst = 0.0
    for name, a, b in rows:
        assert a.shape == b.shape, name
        err = rel_error(a, b)
        print(f"{name:60s} {np.linalg.norm(b):10.3e} {err:9.1e}")
        if not np.any(b):  # the last block's text queries, which attend to nothing: exactly zero in both
            assert ".1.attn.add_q_proj." in name or ".1.attn.norm_added_q." in name, name
            assert not np.any(a), name
        assert err <= 1e-10, f"{name}: rel diff {err:.2e}"
        worst = max(worst, err)
    print(f"worst gradient rel diff {worst:.2e}")
    assert r_out <= 1e-10


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_non_square_input_and_another_context_length(qk_norm, float64_details):
    dm = diffusers_model(qk_norm, seed=1)
    model = minidit_model(dm)
    inp = inputs(seed=2, N=2, H=6, W=10, L=1)  # a 3 x 5 grid of patches, cropped from the 8 x 8 table
    ours, _ = model.forward(**inp)
    with torch.no_grad():
        theirs = run_diffusers(dm, inp)[0].numpy()
    assert ours.shape == theirs.shape == (2, 4, 6, 10)
    assert rel(ours, theirs) <= 1e-10


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_float64_as_published(qk_norm, monkeypatch):
    """Without replacing the two float64-only details: the difference they make, float32-sized (measured: ~2.5e-5
    as published, the sinusoid's ulps; with only the sinusoid replaced, 0 without qk_norm and ~4e-9 with it: the
    float32 mean of squares in diffusers' RMSNorm)."""
    dm = diffusers_model(qk_norm)
    model = minidit_model(dm)
    inp = inputs()
    ours = model.forward(**inp)[0]
    with torch.no_grad():
        r = rel(ours, run_diffusers(dm, inp)[0].numpy())
        monkeypatch.setattr(embeddings.Timesteps, "forward",
                            lambda self, ts: torch.from_numpy(timestep_embedding(ts.detach().numpy(), 256)))
        r_rms = rel(ours, run_diffusers(dm, inp)[0].numpy())
    print(f"\nqk_norm={qk_norm}, float64 as published: output max rel diff {r:.2e}; "
          f"with minidit's sinusoid {r_rms:.2e}")
    assert r < 1e-4 and r_rms < (1e-10 if qk_norm is None else 1e-6)


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_forward_matches_in_float32(qk_norm):
    dm = diffusers_model(qk_norm).float()
    model = minidit_model(dm, dtype=np.float32)
    assert all(v.dtype == np.float32 for v in model.params.values())
    inp = inputs()
    ours = model.forward(**{k: v.astype(np.float32) if k != "t" else v for k, v in inp.items()})[0]
    with torch.no_grad():
        theirs = run_diffusers(dm, inp, dtype=torch.float32)[0].numpy()
    r = rel(ours, theirs)
    print(f"\nqk_norm={qk_norm}, float32: output max rel diff {r:.2e}")
    assert ours.dtype == np.float32 and r <= 1e-4


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_state_dict_round_trip_into_a_fresh_diffusers_model(qk_norm):
    dm = diffusers_model(qk_norm)
    model = minidit_model(dm)
    sd = to_diffusers_state_dict(model.state_dict())
    assert list(sd) == list(dm.state_dict()), "the same names in the same order"
    fresh = diffusers.SD3Transformer2DModel(**CFG, qk_norm=qk_norm).double().eval()
    fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    for k, v in dm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    inp = inputs()
    with torch.no_grad():
        assert torch.equal(run_diffusers(fresh, inp)[0], run_diffusers(dm, inp)[0])


def test_dual_attention_is_refused():
    dm = diffusers.SD3Transformer2DModel(**CFG, dual_attention_layers=(0,))
    with pytest.raises(ValueError, match="MMDiT-X"):
        MMDiTSpec.of(dict(dm.config))
    with pytest.raises(ValueError, match="MMDiT-X"):
        from_diffusers_state_dict(dm.state_dict())


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_convert_a_saved_diffusers_folder(qk_norm, tmp_path):
    """python -m minidit.convert reads a folder written by save_pretrained (config.json + safetensors) without torch's
    help, and the converted checkpoint loads as an MM-DiT with the scheduler's shift and diffusers' output."""
    import json

    from minidit.checkpoint import load
    from minidit.convert import main as convert_main

    dm = diffusers_model(qk_norm).float()
    dm.save_pretrained(tmp_path / "transformer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    convert_main([str(tmp_path / "transformer"), str(tmp_path / "sd3.npz")])
    model, objective, meta = load(tmp_path / "sd3.npz")
    assert isinstance(model, MMDiT) and objective.kind == "flow" and objective.shift == 3.0
    inp = inputs()
    ours, _ = model.forward(*(inp[k].astype(np.float32) for k in ("x", "t", "context", "pooled")), cache=False)
    ref, _ = run_diffusers(dm, inp, dtype=torch.float32)
    assert rel(ours, ref.detach().numpy()) < 1e-4
    with pytest.raises(SystemExit, match="has no config.json"):
        convert_main([str(tmp_path / "scheduler"), str(tmp_path / "x.npz")])
