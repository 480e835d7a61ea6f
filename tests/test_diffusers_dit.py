"""minidit vs a third-party PyTorch DiT: diffusers' DiTTransformer2DModel, with minidit's weights.

diffusers' DiT is a re-implementation with its own layout, and it differs from the official DiT (and minidit) in
two details, both pinned here:

  1. The timestep sinusoid. diffusers builds it with Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1),
     i.e. frequencies exp(-ln(10000) i / (half - 1)); the official code divides by half (models.py:
     TimestepEmbedder.timestep_embedding). At t = 999 that changes the embedding by O(1), so the same weights give a
     different network.
  2. The LayerNorm eps: diffusers' default norm_eps is 1e-5, the official DiT uses 1e-6.

Layout (not a difference in the function): every diffusers block holds its own copy of the timestep and label
embedders (norm1.emb), q, k, v are separate Linear layers instead of the fused qkv, and the final layer is
proj_out_1 (its adaLN) and proj_out_2.

With those two details set to the official values (norm_eps=1e-6, and the sinusoid replaced by minidit's), the
output matches minidit's to float64 precision at random parameters. Skipped without torch and diffusers.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from minidit import DiT, DiTConfig  # noqa: E402
from minidit.layers import timestep_embedding  # noqa: E402

CFG = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2)


def diffusers_dit(model, norm_eps):
    """A float64 diffusers DiTTransformer2DModel holding minidit `model`'s weights."""
    c = model.config
    dm = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=model.in_channels, out_channels=model.out_channels, num_layers=c.depth,
        sample_size=model.spec.input_size, patch_size=c.patch_size, num_embeds_ada_norm=model.spec.num_classes,
        norm_eps=norm_eps).double().eval()
    P, D = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in model.params.items()}, c.hidden_size
    sd = {"pos_embed.proj.weight": P["x_embedder.proj.weight"], "pos_embed.proj.bias": P["x_embedder.proj.bias"],
          "proj_out_1.weight": P["final_layer.adaLN_modulation.1.weight"],
          "proj_out_1.bias": P["final_layer.adaLN_modulation.1.bias"],
          "proj_out_2.weight": P["final_layer.linear.weight"], "proj_out_2.bias": P["final_layer.linear.bias"]}
    for i in range(c.depth):
        d, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = d + "norm1.emb."
        for ours, theirs in (("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                             ("t_embedder.mlp.2", "timestep_embedder.linear_2")):
            sd[f"{emb}{theirs}.weight"], sd[f"{emb}{theirs}.bias"] = P[ours + ".weight"], P[ours + ".bias"]
        sd[emb + "class_embedder.embedding_table.weight"] = P["y_embedder.embedding_table.weight"]
        for ours, theirs in (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
                             ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")):
            sd[f"{d}{theirs}.weight"], sd[f"{d}{theirs}.bias"] = P[f"{b}{ours}.weight"], P[f"{b}{ours}.bias"]
        for j, name in enumerate("qkv"):  # the fused [q | k | v] rows, split
            sd[f"{d}attn1.to_{name}.weight"] = P[b + "attn.qkv.weight"][j * D:(j + 1) * D]
            sd[f"{d}attn1.to_{name}.bias"] = P[b + "attn.qkv.bias"][j * D:(j + 1) * D]
    missing, unexpected = dm.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"pos_embed.pos_embed"}, (missing, unexpected)
    return dm


def random_model(rng):
    model = DiT(CFG, input_size=8, in_channels=4, num_classes=10, dtype=np.float64, seed=0)
    for name, p in model.params.items():  # random: at the adaLN-Zero init the output is exactly zero
        if name != "pos_embed":
            p[...] = rng.normal(0.0, 0.3, size=p.shape)
    return model


def test_timestep_sinusoid_is_the_one_difference_in_the_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.arange(1000)
    ours = timestep_embedding(t, 256)
    theirs = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=1).numpy()
    official = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    d_theirs, d_official = np.abs(ours - theirs).max(), np.abs(ours - official).max()
    print(f"\nsinusoid, t = 0..999: max |minidit - diffusers DiT (shift 1)| = {d_theirs:.3f}; "
          f"with downscale_freq_shift=0: {d_official:.2e}")
    assert d_theirs > 0.5  # a different embedding, not rounding
    assert d_official < 3e-4  # float32 ulps of t * freq, as between minidit and torch (test_torch_reference)


def test_pos_embed_is_the_same():
    model = random_model(np.random.default_rng(0))
    dm = diffusers_dit(model, norm_eps=1e-6)
    np.testing.assert_allclose(dm.pos_embed.pos_embed[0].double().numpy(), model.params["pos_embed"][0], atol=1e-6)


def test_forward_matches_once_the_details_are_official(monkeypatch):
    rng = np.random.default_rng(0)
    model = random_model(rng)
    x = rng.standard_normal((4, 4, 8, 8))
    t, y = np.array([0, 1, 500, 999]), np.array([3, 9, 0, 10])  # 10 = the null class
    ours, _ = model.forward(x, t, y)
    inputs = dict(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y))

    with torch.no_grad():
        as_published = diffusers_dit(model, norm_eps=1e-5)(**inputs).sample.numpy()
        from diffusers.models import embeddings
        monkeypatch.setattr(embeddings.Timesteps, "forward",
                            lambda self, ts: torch.from_numpy(timestep_embedding(ts.numpy(), 256)))
        dm = diffusers_dit(model, norm_eps=1e-6)
        dm.pos_embed.pos_embed.copy_(torch.from_numpy(model.params["pos_embed"]))  # float64, as minidit's
        official = dm(**inputs).sample.numpy()

    scale = np.abs(ours).max()
    rel_published, rel_official = np.abs(as_published - ours).max() / scale, np.abs(official - ours).max() / scale
    print(f"\nDiT output, float64, random parameters: max rel diff minidit vs diffusers as published "
          f"{rel_published:.2e}; with the official sinusoid and eps {rel_official:.2e}")
    assert rel_published > 1e-3
    assert rel_official < 1e-10
