"""The paper's other three conditioning designs (minidit.conditioning): sizes against the paper's Table 4, each
design's block and the cross-attention layer against finite differences, the layer against its definition. (Their
whole-model gradient checks are in test_model.py, which runs every design.)"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidit import conditioning as C
from minidit import model as M
from minidit.conditioning import DESIGNS, ConditioningDiT
from minidit.layers import attention_forward
from minidit.model import DiTConfig, get_config
from test_layers import check, randn, seeds

# Paper Table 4, XL/2 at 256 px: (Gflops, params in millions) of each conditioning design
TABLE4_XL2 = {"in-context": (119.37, 449), "cross-attention": (137.62, 598), "adaln": (118.56, 600),
              "adaln-zero": (118.64, 675)}


@pytest.mark.parametrize("block", ["adaln-zero", *DESIGNS])
def test_block_types_match_paper_table4(block):
    """Each design's parameter count and Gflops against the paper's rows (which round to 0.01 G and 1 M):
    adaLN drops the gates (6D -> 4D outputs), in-context drops every adaLN and adds 2 tokens, cross-attention drops
    every adaLN and adds q, kv and proj per block (about +16% compute)."""
    cfg = get_config("XL/2")
    gflops, params_m = TABLE4_XL2[block]
    shapes, macs = (M.param_shapes(cfg), M.forward_macs(cfg)) if block == "adaln-zero" else \
        (C.param_shapes(cfg, block=block), C.forward_macs(cfg, block=block))  # DiT itself, or the other designs
    n = sum(math.prod(s) for s in shapes.values())
    assert abs(n / 1e6 - params_m) < 1.0, n
    assert abs(macs / 1e9 - gflops) < 0.01 * gflops, macs
    ratio = macs / M.forward_macs(cfg)
    assert abs(ratio - gflops / TABLE4_XL2["adaln-zero"][0]) < 2e-3, ratio


def test_conditioning_dit_builds_the_three_other_designs_only():
    with pytest.raises(ValueError, match="adaLN-Zero is minidit.model.DiT"):
        ConditioningDiT("mini/4", block="adaln-zero")
    m = ConditioningDiT("mini/4", input_size=16, in_channels=1, num_classes=10, block="adaln")
    assert m.num_params() == sum(math.prod(s) for s in C.param_shapes(m.spec).values())


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 3), NH=st.integers(1, 3),
       hs=st.integers(1, 3))
def test_cross_attention(seed, N, T, S, NH, hs):
    rng = np.random.default_rng(seed)
    D = NH * hs
    inputs = dict(x=randn(rng, N, T, D), ctx=randn(rng, N, S, D), w_q=randn(rng, D, D, scale=0.5), b_q=randn(rng, D),
                  w_kv=randn(rng, 2 * D, D, scale=0.5), b_kv=randn(rng, 2 * D), w_proj=randn(rng, D, D),
                  b_proj=randn(rng, D))
    check((lambda **kw: C.cross_attention_forward(**kw, num_heads=NH), C.cross_attention_backward),
          ["x", "ctx", "w_q", "b_q", "w_kv", "b_kv", "w_proj", "b_proj"], inputs, rng)


def test_cross_attention_matches_definition(rng):
    """Queries from x, [k | v] from ctx with contiguous heads; with ctx = x and W_kv = the k, v rows of a fused
    W_qkv it is self-attention."""
    N, T, NH, hs = 2, 5, 3, 4
    D = NH * hs
    x, wqkv, bqkv, wp, bp = randn(rng, N, T, D), randn(rng, 3 * D, D), randn(rng, 3 * D), randn(rng, D, D), randn(rng, D)
    out, _ = C.cross_attention_forward(x, x, wqkv[:D], bqkv[:D], wqkv[D:], bqkv[D:], wp, bp, NH)
    np.testing.assert_allclose(out, attention_forward(x, wqkv, bqkv, wp, bp, NH)[0], rtol=1e-10, atol=1e-10)
    # a single context token: softmax over one key is 1, so every query gets proj(v)
    ctx = randn(rng, N, 1, D)
    out, _ = C.cross_attention_forward(x, ctx, wqkv[:D], bqkv[:D], wqkv[D:], bqkv[D:], wp, bp, NH)
    v = ctx @ wqkv[2 * D:].T + bqkv[2 * D:]
    np.testing.assert_allclose(out, np.broadcast_to(v @ wp.T + bp, out.shape), rtol=1e-10, atol=1e-10)




@pytest.mark.parametrize("block", list(C.DESIGNS))
@given(seed=seeds)
def test_design_block_backward(block, seed):
    """One block of each design at random parameters, on tokens and a condition made by the design's own
    condition_forward from random embeddings: dx, dcond and every parameter gradient against finite differences."""
    rng = np.random.default_rng(seed)
    design, cfg, N, T = C.DESIGNS[block], DiTConfig(depth=1, hidden_size=6, num_heads=2, patch_size=2), 2, 3
    D = cfg.hidden_size
    x, cond, _ = design.condition_forward(randn(rng, N, T, D), randn(rng, N, D), randn(rng, N, D))
    params = {k: randn(rng, *s, scale=0.5) for k, s in design.block_shapes("", cfg).items()}
    inputs = {"x": x, **({} if cond is None else {"cond": cond}), **params}

    def forward(x, cond=None, **P):
        return design.block_forward(x, cond, P, "", cfg.num_heads)

    def backward(dout, cache):
        grads = {}
        grads["x"], grads["cond"] = design.block_backward(dout, cache, "", grads)
        return tuple(grads[k] for k in inputs)

    check((forward, backward), list(inputs), inputs, rng)
