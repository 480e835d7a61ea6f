"""The whole DiT: official parameter counts and names, init, full backward vs finite differences, errors."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidit import DiT, DiTConfig, DiTSpec, VARIANTS, forward_macs, get_config, param_shapes
from minidit.conditioning import ConditioningDiT
from minidit.gradcheck import check_backward, model_errors, rel_error, sampled_errors
from minidit.model import attention_mlp_shapes, block_backward, block_forward
from minidit.params import linear_shapes

# (total params, trainable, measured GMACs) at input 32, 4 channels, 1000 classes, learn_sigma: the official models.py
# instantiated and counted (sum of p.numel(); trainable: p.requires_grad), docs/dit-facts.md
OFFICIAL = {
    "S/8": (33_148_160, 33_142_016, 0.358), "S/4": (32_945_024, 32_920_448, 1.413),
    "S/2": (32_963_360, 32_865_056, 6.056), "B/8": (130_881_536, 130_869_248, 1.418),
    "B/4": (130_475_648, 130_426_496, 5.565), "B/2": (130_512_416, 130_315_808, 23.005),
    "L/8": (458_594_816, 458_578_432, 5.011), "L/4": (458_053_760, 457_988_224, 19.696),
    "L/2": (458_102_816, 457_840_672, 80.698), "XL/8": (675_683_072, 675_664_640, 7.392),
    "XL/4": (675_074_432, 675_000_704, 29.044), "XL/2": (675_129_632, 674_834_720, 118.621),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parameter_counts_and_gmacs(name):
    total, trainable, gmacs = OFFICIAL[name]
    shapes = param_shapes(get_config(name))
    assert sum(math.prod(s) for s in shapes.values()) == total
    assert sum(math.prod(s) for k, s in shapes.items() if k != "pos_embed") == trainable
    assert abs(forward_macs(get_config(name)) / 1e9 - gmacs) < 1e-3


def test_xl2_at_512():
    cfg = get_config("DiT-XL/2")
    assert sum(math.prod(s) for s in param_shapes(cfg, input_size=64).values()) == 676_014_368
    assert abs(forward_macs(cfg, input_size=64) / 1e9 - 524.538) < 1e-3


def test_dit_is_adaln_zero_only_and_names_the_other_designs():
    with pytest.raises(ValueError, match="DiTSpec has no field 'block'"):
        DiT("S/2", block="in-context")
    with pytest.raises(ValueError, match="unknown block type 'adaLN'; choose one of: adaln, cross-attention, "
                                         "in-context.*minidit.model.DiT"):
        ConditioningDiT("S/2", block="adaLN")


def test_spec_round_trip():
    """The spec is the constructor's argument: DiT(spec) rebuilds the same parameters, to_dict is JSON-able."""
    import json

    model = DiT(TINY, input_size=4, in_channels=2, num_classes=3, learn_sigma=False, class_dropout_prob=0.0, seed=4)
    d = json.loads(json.dumps(model.spec.to_dict()))
    assert d["kind"] == "dit" and d["variant"]["depth"] == 2
    again = DiT(DiTSpec.of(d), seed=4)
    assert again.spec == model.spec and list(again.params) == list(model.params)
    for k in model.params:
        np.testing.assert_array_equal(again.params[k], model.params[k])
    assert param_shapes(DiTSpec("S/2")) == param_shapes(get_config("S/2")) == param_shapes("DiT-S/2")


def test_s2_state_dict_names_shapes_and_zero_output():
    model = DiT("S/2", input_size=32, in_channels=4, num_classes=1000, seed=0)
    sd = model.state_dict()
    assert len(sd) == 132 and all(v.dtype == np.float32 for v in sd.values())
    assert list(sd)[:8] == ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                            "y_embedder.embedding_table.weight"]
    assert sd["x_embedder.proj.weight"].shape == (384, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)
    assert sd["blocks.11.adaLN_modulation.1.weight"].shape == (2304, 384)
    assert sd["final_layer.linear.weight"].shape == (32, 384)
    assert model.num_params() == 32_963_360 and model.num_params(trainable_only=True) == 32_865_056
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    out, _ = model.forward(x, np.array([0, 999]), np.array([3, 1000]))
    assert out.shape == (2, 8, 32, 32) and out.dtype == np.float32
    assert np.all(out == 0), "adaLN-Zero and the zero final layer make the output exactly 0 at init"


def test_official_init_statistics():
    model = DiT("S/4", seed=1)
    P = model.params
    a = math.sqrt(6 / (384 + 3 * 384))  # xavier bound of qkv
    w = P["blocks.0.attn.qkv.weight"]
    assert np.abs(w).max() <= a and np.abs(w).max() > 0.95 * a and abs(w.std() - a / math.sqrt(3)) < 2e-3
    a_patch = math.sqrt(6 / (4 * 16 + 384))
    assert np.abs(P["x_embedder.proj.weight"]).max() <= a_patch
    for k in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        assert abs(P[k].std() - 0.02) < 1e-3
    for k, v in P.items():
        if k.endswith("bias") or "adaLN" in k or k.startswith("final_layer.linear"):
            assert np.all(v == 0), k
    from minidit.layers import get_2d_sincos_pos_embed
    np.testing.assert_array_equal(P["pos_embed"][0], get_2d_sincos_pos_embed(384, 8).astype(np.float32))


TINY = DiTConfig(depth=2, hidden_size=8, num_heads=2, patch_size=2)


def tiny_model(learn_sigma=True, seed=0, scale=0.5, block="adaln-zero"):
    """A float64 DiT with every parameter random (not the init, where most gradients are exactly 0)."""
    fields = dict(input_size=4, in_channels=2, num_classes=3, learn_sigma=learn_sigma)
    model = DiT(TINY, **fields, seed=seed, dtype=np.float64) if block == "adaln-zero" else \
        ConditioningDiT(TINY, **fields, block=block, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        if k != "pos_embed":
            v[...] = rng.standard_normal(v.shape) * scale
    return model


@pytest.mark.parametrize("learn_sigma, block", [(True, "adaln-zero"), (False, "adaln-zero"), (True, "adaln"),
                                                (True, "cross-attention"), (True, "in-context")])
def test_full_model_backward_matches_finite_differences(learn_sigma, block):
    model = tiny_model(learn_sigma, block=block)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 4, 4))
    t = np.array([0, 17, 999])
    y = np.array([2, 3, 0])  # 3 is the null class
    out, cache = model.forward(x, t, y)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache, return_dx=True)
    assert set(grads) == set(model.params) - {"pos_embed"}

    def loss():
        return np.sum(model.forward(x, t, y)[0] * dout)

    errors = sampled_errors(loss, {**grads, "x": dx}, {**model.params, "x": x}, 40, rng)  # 40 entries per tensor
    for name, (err, norm) in errors.items():
        assert norm > 0 or name.endswith("embedding_table.weight"), f"{name}: vacuous check"
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    print(f"worst relative error over all parameters and x: {max(e for e, _ in errors.values()):.2e}")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 2), T=st.integers(1, 4), NH=st.integers(1, 3),
       hs=st.integers(2, 3), masked=st.booleans())
def test_block_backward_with_and_without_masks(seed, N, T, NH, hs, masked):
    """One adaLN-Zero block at random parameters; with masks (Dynamic DiT's gates, real-valued here) their gradients
    come back after dx and dc_act."""
    rng = np.random.default_rng(seed)
    D = NH * hs
    cfg = DiTConfig(depth=1, hidden_size=D, num_heads=NH, patch_size=2)
    shapes = {**attention_mlp_shapes("b.", cfg), **linear_shapes("b.adaLN_modulation.1.", 6 * D, D)}
    P = {k: rng.standard_normal(s) * (s[1] ** -0.5 if len(s) == 2 else 0.5) for k, s in shapes.items()}
    masks = dict(head_mask=rng.standard_normal((N, NH)), hidden_mask=rng.standard_normal((N, NH))) if masked else {}

    def forward(x, c_act, **arrays):
        params = {k: v for k, v in arrays.items() if k not in masks}
        return block_forward(x, c_act, params, "b.", NH, **{k: arrays[k] for k in masks})

    def backward(dout, cache):
        grads = {}
        dx, dc_act, *dmasks = block_backward(dout, cache, "b.", grads)
        assert len(dmasks) == len(masks)
        return {"x": dx, "c_act": dc_act, **grads, **dict(zip(masks, dmasks))}

    inputs = dict(x=rng.standard_normal((N, T, D)), c_act=rng.standard_normal((N, D)), **P, **masks)
    errors = check_backward(forward, backward, inputs, rng=rng, max_elems=20)
    assert max(errors.values()) < 1e-6, errors


def test_forward_without_cache_gives_the_same_output():
    model = tiny_model(block="adaln-zero")
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 4))
    t, y = np.array([5, 600]), np.array([1, 3])
    out, cache = model.forward(x, t, y, cache=False)
    assert cache is None
    np.testing.assert_array_equal(out, model.forward(x, t, y)[0])


def test_two_forwards_then_backwards_are_independent():
    model = tiny_model()
    rng = np.random.default_rng(3)
    xa, xb = rng.standard_normal((2, 2, 2, 4, 4))
    t, y = np.array([5, 600]), np.array([1, 2])
    out_a, cache_a = model.forward(xa, t, y)
    dout = rng.standard_normal(out_a.shape)
    ref = model.backward(dout, cache_a)
    model.forward(xb, t, y)  # a second forward in between must not disturb cache_a
    again = model.backward(dout, cache_a)
    for k in ref:
        np.testing.assert_array_equal(ref[k], again[k])


def test_float32_matches_float64():
    m64 = tiny_model()
    m32 = DiT(TINY, input_size=4, in_channels=2, num_classes=3, dtype=np.float32)
    m32.load_state_dict(m64.state_dict())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 4, 4))
    t, y = np.array([3, 500]), np.array([0, 1])
    o64, c64 = m64.forward(x, t, y)
    o32, c32 = m32.forward(x.astype(np.float32), t, y)
    np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-4)
    d = rng.standard_normal(o64.shape)
    g64, g32 = m64.backward(d, c64), m32.backward(d.astype(np.float32), c32)
    for k in g64:
        assert g32[k].dtype == np.float32
        assert rel_error(g32[k], g64[k], floor=1e-3) < 1e-4, k


def test_label_dropout():
    model = tiny_model()
    x = np.zeros((400, 2, 4, 4))
    t = np.full(400, 10)
    y = np.zeros(400, dtype=np.int64)
    null = np.full(400, 3)
    o_cond, _ = model.forward(x[:1], t[:1], y[:1])
    o_null, _ = model.forward(x[:1], t[:1], null[:1])
    out, _ = model.forward(x, t, y, train=True, rng=np.random.default_rng(0))
    dropped = np.all(np.isclose(out, o_null), axis=(1, 2, 3))
    kept = np.all(np.isclose(out, o_cond), axis=(1, 2, 3))
    assert np.all(dropped ^ kept) and 0.05 < dropped.mean() < 0.15  # p = 0.1
    out, _ = model.forward(x, t, y, train=False)
    assert np.all(np.isclose(out, o_cond))  # no dropout at eval
    force = (np.arange(400) % 2 == 0).astype(np.int64)
    out, _ = model.forward(x, t, y, force_drop_ids=force)
    assert np.all(np.isclose(out[::2], o_null)) and np.all(np.isclose(out[1::2], o_cond))


def test_no_null_row_without_dropout():
    m = DiT(TINY, input_size=4, in_channels=2, num_classes=3, class_dropout_prob=0.0)
    assert m.params["y_embedder.embedding_table.weight"].shape == (3, 8)


def test_load_state_dict_round_trip_and_strictness():
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    b.load_state_dict(a.state_dict())
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    sd = dict(a.state_dict())
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.9.attn.qkv.weight"] = np.zeros((24, 8))
    sd["final_layer.linear.weight"] = np.zeros((5, 8))
    with pytest.raises(ValueError) as e:
        b.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1): blocks.1.mlp.fc1.bias" in msg
    assert "unexpected keys (1): blocks.9.attn.qkv.weight" in msg
    assert "final_layer.linear.weight: got (5, 8), expected (16, 8)" in msg


def test_variant_names():
    assert len([k for k in VARIANTS if not k.startswith("mini")]) == 12
    assert get_config("DiT-XL/2") == get_config("XL/2") == DiTConfig(28, 1152, 16, 2)
    assert DiT("mini/4", input_size=32, in_channels=3, num_classes=10).num_params() > 0


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(variant="M/2"), ValueError, "unknown DiT variant 'M/2'; choose one of: S/2"),
    (dict(variant="S/8", input_size=12), ValueError, "input size 12 is not divisible by the patch size 8"),
    (dict(variant=DiTConfig(1, 10, 3, 2)), ValueError, "hidden size 10 is not divisible by num_heads 3"),
    (dict(variant="S/2", dtype=np.int32), ValueError, "dtype must be float32 or float64"),
])
def test_construction_errors(kwargs, exc, match):
    kwargs.setdefault("input_size", 8)
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        DiT(**kwargs)


def test_input_errors():
    m = DiT(TINY, input_size=4, in_channels=2, num_classes=3)
    x = np.zeros((2, 2, 4, 4), np.float32)
    t, y = np.array([1, 2]), np.array([0, 1])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 4, 4\) for this model, got \(2, 3, 4, 4\)"):
        m.forward(np.zeros((2, 3, 4, 4), np.float32), t, y)
    with pytest.raises(TypeError, match="x has dtype float64 but the model is float32"):
        m.forward(x.astype(np.float64), t, y)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        m.forward(x, t, np.array([0]))
    with pytest.raises(TypeError, match="t must be an integer or float array"):
        m.forward(x, t.astype(np.complex64), y)
    with pytest.raises(TypeError, match="y must be an integer array"):
        m.forward(x, t, y.astype(np.float32))
    np.testing.assert_array_equal(m.forward(x, t.astype(np.float32), y)[0], m.forward(x, t, y)[0])  # flow's real t
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] \(3 classes, 3 = the null class\), got min 0 max 4"):
        m.forward(x, t, np.array([0, 4]))
    with pytest.raises(ValueError, match="labels must lie"):
        m.forward(x, t, np.array([-1, 0]))


def test_an_unconditional_dit_has_no_label_table_and_checks_its_gradients():
    """num_classes = 0 (Latte's extras=1): no y_embedder, c = t_emb, y must be None; float64 gradients at random
    parameters against central differences, and ShardedDiT runs it on shards."""
    from minidit.threads import ShardedDiT

    model = DiT(TINY, input_size=4, in_channels=2, num_classes=0, dtype=np.float64, seed=3)
    assert not any(k.startswith("y_embedder") for k in model.params) and model.condition_dropout_prob == 0
    rng = np.random.default_rng(9)
    for k, v in model.params.items():
        if k != "pos_embed":
            v[...] = 0.5 * rng.standard_normal(v.shape)
    x, t = rng.standard_normal((3, 2, 4, 4)), np.array([0, 17, 999])
    errors = model_errors(model, x, t, None, 20, rng)
    assert all(norm > 0 and err < 1e-6 for err, norm in errors.values()), errors
    out, _ = model.forward(x, t, None, train=True)  # train: no dropout to draw
    np.testing.assert_allclose(ShardedDiT(model, 2).forward(x, t, None)[0], out, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unconditional.*y=None"):
        model.forward(x, t, np.array([0, 1, 2]))
