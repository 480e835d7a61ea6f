"""SD3's MM-DiT (minidit.mmdit): every gradient against central differences in float64, shapes, names, the
pre-only last block, the pos_embed crop, errors, the spec. No torch needed (tests/test_sd3_diffusers.py compares
against diffusers)."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidit.gradcheck import numerical_grad, random_indices, rel_error
from minidit.layers import get_2d_sincos_pos_embed
from minidit.mmdit import (
    MMDiT, MMDiTSpec, from_diffusers_state_dict, param_shapes, sd3_pos_embed, to_diffusers_state_dict,
)

TINY = dict(sample_size=8, patch_size=2, in_channels=3, num_layers=2, attention_head_dim=4, num_attention_heads=2,
            joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=5, out_channels=3,
            pos_embed_max_size=6)
LAST = "transformer_blocks.1."
# Parameters N(0, 0.3^2) keep the output O(1) (median max |out| ~3; at 0.5 it is ~20 and the loss ~1e2, whose
# rounding over 2h swamps small sampled gradients). h = 1e-5: rounding ~1e-10, truncation O(h^2) still ~1e-11;
# measured over 200 drawn models, the worst sampled relative error is 4e-8 (6e-8 over 60 at h = 1e-6).
H = 1e-5


def tiny_model(qk_norm=None, seed=0, scale=0.3, **overrides):
    """A float64 MM-DiT with every trainable parameter random (not the init)."""
    model = MMDiT(MMDiTSpec(**{**TINY, **overrides}, qk_norm=qk_norm), seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for name in model.trainable():
        v = model.params[name]
        v[...] = rng.standard_normal(v.shape) * scale
    return model


def tiny_inputs(rng, N=2, H=8, W=8, L=3):
    return dict(x=rng.standard_normal((N, 3, H, W)), t=np.array([0.5, 700.0, 999.0, 3.0])[:N],
                context=rng.standard_normal((N, L, 6)), pooled=rng.standard_normal((N, 5)))


def check_gradients(model, inp, rng, names, k):
    """Central differences of L = sum(out * dout) for up to k entries of each named tensor (parameters, or
    "x" / "context" / "pooled"); returns the worst relative error. A zero gradient fails the check, except the last
    block's norm_added_q: its text queries attend to nothing (the text output is discarded), so its gradient must be
    exactly zero and the numerical estimate ~0."""
    zero = f"transformer_blocks.{model.spec.num_layers - 1}.attn.norm_added_q.weight"
    out, cache = model.forward(**inp)
    dout = rng.standard_normal(out.shape)
    grads, d = model.backward(dout, cache, return_dx=True)
    assert list(grads) == model.trainable()

    def loss():
        return np.sum(model.forward(**inp, cache=False)[0] * dout)

    worst = 0.0
    for name in names:
        g, arr = (d[name], inp[name]) if name in d else (grads[name], model.params[name])
        assert g.shape == arr.shape and g.dtype == np.float64, name
        idx = random_indices(arr.shape, k, rng)
        num = numerical_grad(loss, arr, h=H, indices=idx)
        sel = tuple(np.array(i) for i in zip(*idx))
        if name == zero:
            assert not np.any(g) and np.abs(num[sel]).max() < 1e-8, name
            continue
        assert np.linalg.norm(g) > 0 and np.linalg.norm(g[sel]) > 0, f"{name}: vacuous check (zero gradient)"
        err = rel_error(g[sel], num[sel], floor=1e-3)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_every_gradient_matches_finite_differences(qk_norm):
    model = tiny_model(qk_norm)
    rng = np.random.default_rng(7)
    inp = tiny_inputs(rng)
    names = model.trainable() + ["x", "context", "pooled"]
    worst = check_gradients(model, inp, rng, names, k=30)
    print(f"\nqk_norm={qk_norm}: worst relative error over {len(names)} tensors: {worst:.2e}")


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 2), gh=st.integers(1, 3), gw=st.integers(1, 3),
       L=st.integers(1, 4), qk_norm=st.sampled_from([None, "rms_norm"]), layers=st.integers(1, 2))
def test_gradients_at_drawn_token_counts(seed, N, gh, gw, L, qk_norm, layers):
    """Non-square grids (each cropped from the 6 x 6 table), any context length, one or two blocks."""
    rng = np.random.default_rng(seed)
    model = tiny_model(qk_norm, seed=seed % 1000, num_layers=layers)
    inp = tiny_inputs(rng, N=N, H=2 * gh, W=2 * gw, L=L)
    some = [str(n) for n in rng.choice(model.trainable(), size=6, replace=False)]
    check_gradients(model, inp, rng, ["x", "context", "pooled"] + some, k=8)


def test_the_last_blocks_text_queries_get_exactly_zero_gradient():
    model = tiny_model("rms_norm")
    rng = np.random.default_rng(0)
    out, cache = model.forward(**tiny_inputs(rng))
    grads = model.backward(rng.standard_normal(out.shape), cache)
    D = 8
    assert not np.any(grads[LAST + "attn.add_qkv.weight"][:D]) and not np.any(grads[LAST + "attn.add_qkv.bias"][:D])
    assert np.all(np.abs(grads[LAST + "attn.add_qkv.weight"][D:]).sum(1) > 0)  # keys and values do count
    assert not np.any(grads[LAST + "attn.norm_added_q.weight"])
    assert np.any(grads["transformer_blocks.0.attn.norm_added_q.weight"])


def test_shapes_names_and_counts():
    model = MMDiT(MMDiTSpec(**TINY, qk_norm="rms_norm"), seed=0)
    shapes = model.param_shapes()
    assert list(model.params) == list(shapes) and all(model.params[k].shape == s for k, s in shapes.items())
    assert model.num_params() == sum(math.prod(s) for s in shapes.values())
    assert model.num_params(trainable_only=True) == model.num_params() - 36 * 8
    assert model.trainable() == [k for k in shapes if k != "pos_embed.pos_embed"]
    assert list(shapes)[:3] == ["pos_embed.pos_embed", "pos_embed.proj.weight", "pos_embed.proj.bias"]
    assert shapes["pos_embed.pos_embed"] == (1, 36, 8) and shapes["pos_embed.proj.weight"] == (8, 3, 2, 2)
    assert shapes["transformer_blocks.0.attn.qkv.weight"] == (24, 8)
    assert shapes["transformer_blocks.0.attn.add_qkv.bias"] == (24,)
    assert shapes["transformer_blocks.0.attn.norm_q.weight"] == (4,)
    assert shapes["context_embedder.weight"] == (8, 6) and shapes["proj_out.weight"] == (12, 8)
    assert shapes["time_text_embed.timestep_embedder.linear_1.weight"] == (8, 256)
    assert shapes["time_text_embed.text_embedder.linear_1.weight"] == (8, 5)
    rng = np.random.default_rng(0)
    inp = {k: v.astype(np.float32) if k != "t" else v for k, v in tiny_inputs(rng, H=8, W=6).items()}
    out, _ = model.forward(**inp)
    assert out.shape == (2, 3, 8, 6) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.any(out != 0)  # not adaLN-Zero: the init output is not 0
    no_norm = param_shapes(MMDiTSpec(**TINY))
    assert not any("norm_q" in k or "norm_added" in k for k in no_norm)
    assert len(shapes) - len(no_norm) == 8  # four RMSNorm weights per block


def test_the_pre_only_last_block_has_no_text_output_parameters():
    shapes = param_shapes(MMDiTSpec(**TINY), num_layers=3)
    for i in (0, 1):
        b = f"transformer_blocks.{i}."
        assert shapes[b + "norm1_context.linear.weight"] == (48, 8)
        assert b + "attn.to_add_out.weight" in shapes and b + "ff_context.net.0.proj.weight" in shapes
    last = "transformer_blocks.2."
    assert shapes[last + "norm1_context.linear.weight"] == (16, 8)  # AdaLayerNormContinuous: [scale | shift]
    assert last + "attn.add_qkv.weight" in shapes  # its keys and values (and unused queries, as diffusers)
    assert not [k for k in shapes if k.startswith(last) and ("to_add_out" in k or "ff_context" in k
                                                            or "norm2_context" in k)]
    assert not any("norm2" in k for k in shapes)  # LayerNorms without affine have no parameters


def test_init():
    model = MMDiT(MMDiTSpec(**TINY, qk_norm="rms_norm"), seed=3, dtype=np.float64)
    P = model.params
    for name, v in P.items():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            assert np.all(v == 1), name
        elif name != "pos_embed.pos_embed":
            fan_in = math.prod(param_shapes(model.spec)[name[:-4] + "weight" if name.endswith("bias") else name][1:])
            assert 0 < np.abs(v).max() <= 1 / math.sqrt(fan_in), name  # PyTorch's default U(+-1/sqrt(fan_in))
    again = MMDiT(model.spec, seed=3, dtype=np.float64)
    for k in P:
        np.testing.assert_array_equal(again.params[k], P[k])
    assert any(np.any(MMDiT(model.spec, seed=4).params[k] != P[k]) for k in model.trainable())


def test_pos_embed_table_and_centre_crop():
    model = tiny_model()
    table = model.params["pos_embed.pos_embed"]
    M, D = 6, 8
    np.testing.assert_array_equal(table[0], sd3_pos_embed(D, M, base_size=8 // 2))
    # base_size = M: the integer grid of minidit's (MAE) table; otherwise positions are scaled by base_size / M
    np.testing.assert_allclose(sd3_pos_embed(D, M, base_size=M), get_2d_sincos_pos_embed(D, M), atol=1e-7)
    pe = sd3_pos_embed(D, M, base_size=3)  # position of grid index i: i / (M / base_size) = i / 2
    omega = 1 / 10000 ** (np.arange(D // 4) / (D // 4))
    n = 1 * M + 2  # row 1, column 2: positions 0.5 and 1.0; the column first
    np.testing.assert_allclose(pe[n], np.r_[np.sin(1.0 * omega), np.cos(1.0 * omega),
                                            np.sin(0.5 * omega), np.cos(0.5 * omega)], atol=1e-7)
    for h, w in ((4, 4), (3, 5), (1, 6), (6, 1), (6, 6)):
        top, left = (M - h) // 2, (M - w) // 2
        crop = model.pos_embed_crop(h, w)
        want = np.stack([table[0, (top + r) * M + left + c] for r in range(h) for c in range(w)])[None]
        np.testing.assert_array_equal(crop, want)
    # the forward reads exactly the crop: a table row outside it changes nothing, one inside does
    rng = np.random.default_rng(0)
    inp = tiny_inputs(rng, H=8, W=8)  # 4 x 4 patches: rows and columns 1..4 of the 6 x 6 table
    ref = model.forward(**inp)[0]
    table[0, 0] += 1.0  # (0, 0): outside
    np.testing.assert_array_equal(model.forward(**inp)[0], ref)
    table[0, 1 * M + 1] += 1.0  # (1, 1): the crop's first token
    assert np.any(model.forward(**inp)[0] != ref)


def test_cache_free_forward_and_independent_backwards():
    model = tiny_model("rms_norm")
    rng = np.random.default_rng(3)
    a, b = tiny_inputs(rng), tiny_inputs(rng)
    out_a, cache_a = model.forward(**a)
    out, none = model.forward(**a, cache=False)
    assert none is None
    np.testing.assert_array_equal(out, out_a)
    dout = rng.standard_normal(out_a.shape)
    ref = model.backward(dout, cache_a)
    model.forward(**b)
    again = model.backward(dout, cache_a)
    for k in ref:
        np.testing.assert_array_equal(ref[k], again[k])
    ints = dict(a, t=np.array([1, 700]))
    np.testing.assert_array_equal(model.forward(**ints)[0], model.forward(**dict(a, t=np.array([1.0, 700.0])))[0])


def test_float32_matches_float64():
    m64 = tiny_model("rms_norm")
    m32 = MMDiT(m64.spec, dtype=np.float32)
    m32.load_state_dict(m64.state_dict())
    rng = np.random.default_rng(0)
    inp = tiny_inputs(rng)
    inp32 = {k: v.astype(np.float32) if k != "t" else v for k, v in inp.items()}
    o64, c64 = m64.forward(**inp)
    o32, c32 = m32.forward(**inp32)
    assert rel_error(o32, o64) < 1e-5
    dout = rng.standard_normal(o64.shape)
    g64, g32 = m64.backward(dout, c64), m32.backward(dout.astype(np.float32), c32)
    for k in g64:
        assert g32[k].dtype == np.float32 and rel_error(g32[k], g64[k], floor=1e-3) < 1e-4, k


def test_diffusers_state_dict_mapping_without_torch():
    model = tiny_model("rms_norm")
    P = model.params
    sd = to_diffusers_state_dict(P)
    assert not any(".qkv." in k or "add_qkv" in k for k in sd)
    b = "transformer_blocks.0.attn."
    for j, (plain, added) in enumerate(zip(("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))):
        np.testing.assert_array_equal(sd[b + plain + ".weight"], P[b + "qkv.weight"][8 * j:8 * (j + 1)])
        np.testing.assert_array_equal(sd[b + added + ".bias"], P[b + "add_qkv.bias"][8 * j:8 * (j + 1)])
    assert len(sd) == len(P) + 2 * 4 * 2  # per block and stream: 3 weights + 3 biases in place of 1 + 1
    back = from_diffusers_state_dict(sd)
    assert list(back) == list(P)
    for k in P:
        np.testing.assert_array_equal(back[k], P[k])
    del sd[b + "to_k.bias"]
    with pytest.raises(ValueError, match="to_k.bias: q, k, v come together"):
        from_diffusers_state_dict(sd)
    with pytest.raises(ValueError, match="MMDiT-X"):
        from_diffusers_state_dict({"transformer_blocks.0.attn2.to_q.weight": np.zeros((8, 8))})


def test_spec_round_trip_and_diffusers_config():
    spec = MMDiTSpec(**TINY, qk_norm="rms_norm")
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["kind"] == "mmdit" == MMDiTSpec.kind and d["qk_norm"] == "rms_norm"
    assert MMDiTSpec.of(d) == spec and MMDiTSpec.of(spec) is spec
    assert MMDiTSpec.of(spec, num_layers=3).num_layers == 3
    config = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1", **TINY,
              "dual_attention_layers": [], "qk_norm": None}  # a config.json
    assert MMDiTSpec.of(config) == MMDiTSpec(**TINY)
    assert MMDiTSpec(**dict(TINY, out_channels=None)).out_dim == 3
    with pytest.raises(ValueError, match="MMDiTSpec has no field 'bogus'"):
        MMDiTSpec.of({**TINY, "bogus": 1})
    model = MMDiT(d, seed=1)
    assert model.spec == spec and MMDiT(**TINY, qk_norm="rms_norm").spec == spec


@pytest.mark.parametrize("fields, match", [
    (dict(dual_attention_layers=(0,)), r"dual_attention_layers=\[0\]: SD3.5's MMDiT-X dual attention"),
    (dict(caption_projection_dim=12), r"caption_projection_dim=12 must equal num_attention_heads \* attention_head"),
    (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not implemented"),
    (dict(pos_embed_max_size=None), "pos_embed_max_size=None"),
    (dict(attention_head_dim=3, caption_projection_dim=6), "must be divisible by 4"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_spec_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        MMDiTSpec(**{**TINY, **fields})


def test_input_errors():
    model = MMDiT(MMDiTSpec(**TINY))
    rng = np.random.default_rng(0)
    good = {k: v.astype(np.float32) if k != "t" else v for k, v in tiny_inputs(rng).items()}
    model.forward(**good)
    cases = [
        (dict(x=np.zeros((2, 4, 8, 8), np.float32)), ValueError, r"x must have shape \(N, 3, H, W\)"),
        (dict(x=np.zeros((2, 3, 7, 8), np.float32)), ValueError, "multiples of the patch size 2 between 2 and "
                                                                 r"pos_embed_max_size \* patch_size = 12, got 7 x 8"),
        (dict(x=np.zeros((2, 3, 8, 14), np.float32)), ValueError, "got 8 x 14"),
        (dict(x=good["x"].astype(np.float64)), TypeError, "x has dtype float64 but the model is float32"),
        (dict(t=np.array([1.0])), ValueError, r"t must have shape \(2,\)"),
        (dict(t=np.array([1, 2], dtype=np.complex64)), TypeError, "t must be an integer or float array"),
        (dict(context=np.zeros((2, 3, 5), np.float32)), ValueError, r"context must have shape \(2, L, 6\)"),
        (dict(context=np.zeros((1, 3, 6), np.float32)), ValueError, r"context must have shape \(2, L, 6\)"),
        (dict(context=np.zeros((2, 0, 6), np.float32)), ValueError, "L >= 1"),
        (dict(pooled=np.zeros((2, 4), np.float32)), ValueError, r"pooled must have shape \(2, 5\)"),
        (dict(pooled=np.zeros((2, 5))), TypeError, "pooled has dtype float64"),
    ]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.forward(**{**good, **bad})
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        MMDiT(MMDiTSpec(**TINY), dtype=np.int32)


def test_device_backends_match_numpy(device_backend):
    """The same forward and backward on the strict backend (a CPU stand-in for CuPy: no host arrays mixed in, no
    host syncs) and on CuPy where a GPU is present."""
    from minidit.dev import strict
    from minidit.xp import to_device, to_numpy

    ref = tiny_model("rms_norm")
    model = MMDiT(ref.spec, dtype=np.float64, backend=device_backend)
    model.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(5)
    inp = tiny_inputs(rng, H=8, W=6)
    out, cache = ref.forward(**inp)
    dout = rng.standard_normal(out.shape)
    grads, d = ref.backward(dout, cache, return_dx=True)
    with strict.no_syncs():
        dev_out, dev_cache = model.forward(**{k: to_device(v, model.xp) for k, v in inp.items()})
        dev_grads, dev_d = model.backward(to_device(dout, model.xp), dev_cache, return_dx=True)
    assert list(dev_grads) == list(grads)
    pairs = [("out", dev_out, out)] + [(k, dev_grads[k], grads[k]) for k in grads] + [(k, dev_d[k], d[k]) for k in d]
    for name, a, b in pairs:
        a = to_numpy(a)
        # strict runs numpy underneath: the same numbers; a GPU's float32 cos in the sinusoid may differ by an ulp
        tol = 1e-12 if device_backend == "strict" else 1e-5
        assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-3), name
