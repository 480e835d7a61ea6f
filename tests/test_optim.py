"""AdamW and EMA against direct re-statements of their formulas (float64), in-place and dtype checks, the map that
applies their per-parameter updates."""
import numpy as np
import pytest

from minidit.optim import EMA, AdamW


def make_params(rng, dtype=np.float64):
    return {
        "pos_embed": rng.standard_normal((1, 4, 6)).astype(dtype),
        "x_embedder.proj.weight": rng.standard_normal((6, 4, 2, 2)).astype(dtype),
        "x_embedder.proj.bias": rng.standard_normal(6).astype(dtype),
        "blocks.0.attn.qkv.weight": rng.standard_normal((18, 6)).astype(dtype),
    }


def make_grads(rng, params, skip=("pos_embed",)):
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items() if k not in skip}


def reference_adamw(params, grads_seq, lr, betas, eps, wd):
    """The torch.optim.AdamW update, one parameter at a time, in plain float64 with fresh arrays."""
    b1, b2 = betas
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m, v, t = {}, {}, {}
    for grads in grads_seq:
        for k, g in grads.items():
            if k not in m:
                m[k], v[k], t[k] = np.zeros_like(p[k]), np.zeros_like(p[k]), 0
            t[k] += 1
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1 ** t[k])
            v_hat = v[k] / (1 - b2 ** t[k])
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.8)])
def test_adamw_matches_formula(wd, betas):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    start = {k: v.copy() for k, v in params.items()}
    grads_seq = [make_grads(rng, params) for _ in range(6)]
    # a parameter without a gradient on some steps: its own step count (for bias correction) lags
    del grads_seq[0]["x_embedder.proj.bias"]
    del grads_seq[3]["x_embedder.proj.bias"]
    lr, eps = 3e-2, 1e-8
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads_seq:
        opt.step(params, g)
    want = reference_adamw(start, grads_seq, lr, betas, eps, wd)
    for k in params:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-12, atol=1e-14, err_msg=k)
    # never-trained parameter: untouched even with weight decay, and no state
    np.testing.assert_array_equal(params["pos_embed"], start["pos_embed"])
    assert "m.pos_embed" not in opt.state_dict()
    assert opt.step_count == 6 and opt.t["x_embedder.proj.bias"] == 4


def test_adamw_in_place_and_float32():
    rng = np.random.default_rng(1)
    params = make_params(rng, np.float32)
    ids = {k: id(v) for k, v in params.items()}
    originals = dict(params)
    opt = AdamW(params, lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        opt.step(params, make_grads(rng, params))
    for k, p in params.items():
        assert id(p) == ids[k] and np.shares_memory(p, originals[k])
        assert p.dtype == np.float32, k
    for k in opt.m:
        assert opt.m[k].dtype == np.float32 and opt.v[k].dtype == np.float32
    # float64 gradients into float32 parameters still leave them float32
    opt.step(params, {k: g.astype(np.float64) for k, g in make_grads(rng, params).items()})
    assert all(p.dtype == np.float32 for p in params.values())


def test_adamw_float32_close_to_float64():
    rng = np.random.default_rng(2)
    p64 = make_params(rng)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    o64, o32 = AdamW(p64, lr=1e-2), AdamW(p32, lr=1e-2)
    for _ in range(5):
        g = make_grads(rng, p64)
        o64.step(p64, g)
        o32.step(p32, {k: v.astype(np.float32) for k, v in g.items()})
    for k in p64:
        np.testing.assert_allclose(p32[k], p64[k], rtol=1e-5, atol=1e-6)


def test_adamw_errors():
    rng = np.random.default_rng(3)
    params = make_params(rng)
    opt = AdamW(params)
    with pytest.raises(ValueError, match="unknown parameters.*nope"):
        opt.step(params, {"nope": np.zeros(3)})
    with pytest.raises(ValueError, match="x_embedder.proj.bias.*shape"):
        opt.step(params, {"x_embedder.proj.bias": np.zeros(5)})
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(1.0, 0.9))


def test_adamw_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    opt = AdamW(params, lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        opt.step(params, make_grads(rng, params))
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict().items()}
    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = AdamW(params2)  # default hyper-parameters: overwritten by the loaded state, as in torch
    opt2.load_state_dict(state)
    assert opt2.lr == 1e-2 and opt2.weight_decay == 0.05 and opt2.step_count == 3
    for _ in range(2):
        g = make_grads(rng, params)
        opt.step(params, g)
        opt2.step(params2, g)
    for k in params:
        np.testing.assert_array_equal(params[k], params2[k])


def test_adamw_load_state_dict_strict():
    rng = np.random.default_rng(5)
    params = make_params(rng)
    opt = AdamW(params)
    opt.step(params, make_grads(rng, params))
    state = opt.state_dict()
    bad = dict(state)
    del bad["v.blocks.0.attn.qkv.weight"]
    bad["m.not_a_param"] = np.zeros(2)
    with pytest.raises(ValueError) as e:
        AdamW(params).load_state_dict(bad)
    assert "missing keys (1): v.blocks.0.attn.qkv.weight" in str(e.value)
    assert "unexpected keys (1): m.not_a_param" in str(e.value)
    bad = dict(state)
    del bad["lr"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): lr"):
        AdamW(params).load_state_dict(bad)
    bad = dict(state)
    bad["m.x_embedder.proj.bias"] = np.zeros(7)
    with pytest.raises(ValueError, match="m.x_embedder.proj.bias has shape"):
        AdamW(params).load_state_dict(bad)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    params = make_params(rng)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for i in range(5):
        grads = make_grads(rng, params)
        if i in (0, 2):
            del grads["x_embedder.proj.bias"]
        for k, p in tparams.items():
            p.grad = torch.from_numpy(grads[k].copy()) if k in grads else None
        topt.step()
        opt.step(params, grads)
    for k in params:
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=k)


# ---------------------------------------------------------------- EMA


def test_ema_matches_formula_and_is_in_place():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    ema = EMA(params, decay=0.9)
    assert set(ema.params) == set(params)  # pos_embed included, as official
    for k in params:
        np.testing.assert_array_equal(ema.params[k], params[k])
        assert not np.shares_memory(ema.params[k], params[k])  # a copy, not the model's arrays
    want = {k: v.copy() for k, v in params.items()}
    held = dict(ema.params)
    for _ in range(4):
        for k in params:
            params[k] += rng.standard_normal(params[k].shape)
            want[k] = want[k] * 0.9 + params[k] * (1 - 0.9)
        ema.update(params)
    for k in params:
        np.testing.assert_allclose(ema.params[k], want[k], rtol=1e-13, atol=1e-14)
        assert ema.params[k] is held[k]


def test_ema_decay_zero_copies_and_float32():
    rng = np.random.default_rng(8)
    params = make_params(rng, np.float32)
    ema = EMA(params, decay=0.0)
    for k in params:
        params[k] *= 3.0
    ema.update(params)
    for k in params:
        np.testing.assert_array_equal(ema.params[k], params[k])
        assert ema.params[k].dtype == np.float32


def test_ema_official_decay_is_constant():
    params = {"w": np.zeros(3)}
    ema = EMA(params)
    for _ in range(3):
        assert ema.current_decay() == 0.9999
        ema.update({"w": np.ones(3)})
    np.testing.assert_allclose(ema.params["w"], 1 - 0.9999**3, rtol=1e-12)


def test_ema_decay_one_is_frozen():
    params = {"w": np.array([0.1, 1e-30, 3.0], np.float32)}
    ema = EMA(params, decay=1.0)
    ema.update({"w": np.array([1e30, 2.0, -7.0], np.float32)})
    np.testing.assert_array_equal(ema.params["w"], params["w"])


def test_ema_warmup_schedule():
    params = {"w": np.zeros(2)}
    ema = EMA(params, decay=0.5, warmup=True)
    want, decays = np.zeros(2), []
    for n in range(12):
        d = ema.current_decay()
        decays.append(d)
        assert d == min(0.5, (1 + n) / (10 + n))
        x = np.full(2, float(n + 1))
        want = want * d + x * (1 - d)
        ema.update({"w": x})
        np.testing.assert_allclose(ema.params["w"], want, rtol=1e-14)
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.5
    assert ema.num_updates == 12
    long = EMA(params, decay=0.9999, warmup=True)
    long.num_updates = 10**6
    assert long.current_decay() == 0.9999


def test_ema_state_dict_round_trip_and_strict():
    rng = np.random.default_rng(9)
    params = make_params(rng)
    ema = EMA(params, decay=0.99, warmup=True)
    ema.update({k: v + 1 for k, v in params.items()})
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in ema.state_dict().items()}
    other = EMA(params)
    held = dict(other.params)
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.warmup and other.num_updates == 1
    for k in params:
        np.testing.assert_array_equal(other.params[k], ema.params[k])
        assert other.params[k] is held[k]
    bad = dict(state)
    del bad["params.pos_embed"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): params.pos_embed"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="EMA update.*missing keys"):
        other.update({"pos_embed": params["pos_embed"]})



# ---------------------------------------------------------------- map: how the per-parameter updates are applied


def test_updates_go_through_the_given_map_in_any_order():
    """AdamW and EMA hand every per-parameter update to `map` once, with its parameter's size; a map that applies
    them in another order (as threads may) changes nothing."""
    rng = np.random.default_rng(10)
    params = make_params(rng)
    twin = {k: v.copy() for k, v in params.items()}
    calls = []

    def backwards(fn, items, sizes):
        calls.append(list(sizes))
        for item in reversed(items):
            fn(item)

    opts = AdamW(params, lr=1e-2, weight_decay=0.1), AdamW(twin, lr=1e-2, weight_decay=0.1, map=backwards)
    emas = EMA(params, decay=0.9), EMA(twin, decay=0.9, map=backwards)
    for _ in range(3):
        grads = make_grads(rng, params)
        for p, opt, ema in zip((params, twin), opts, emas):
            opt.step(p, grads)
            ema.update(p)
    adamw_sizes = [params[k].size for k in params if k != "pos_embed"]
    assert calls == [adamw_sizes, [p.size for p in params.values()]] * 3
    for k in params:
        np.testing.assert_array_equal(twin[k], params[k], err_msg=k)
        np.testing.assert_array_equal(emas[1].params[k], emas[0].params[k], err_msg=k)
