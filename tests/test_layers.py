"""Every op's backward against central differences in float64, on shapes and values drawn by hypothesis."""
import numpy as np
from hypothesis import given, strategies as st

from minidit import layers as L
from minidit.gradcheck import check_backward

TOL = 1e-6  # float64 central differences are good to ~1e-10 absolute; a wrong backward gives >1e-2
seeds = st.integers(0, 2**31 - 1)


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def check(forward, backward_names, inputs, rng):
    """Run check_backward where backward returns a tuple in the order of `backward_names`;
    also assert that neither forward nor backward mutated any input."""
    before = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    fwd, bwd = forward
    errors = check_backward(fwd, bwd, inputs, backward_names, rng=rng)
    for k, v in before.items():
        np.testing.assert_array_equal(inputs[k], v, err_msg=f"{k} was mutated")
    for k, e in errors.items():
        assert e < TOL, f"d{k}: relative error {e:.2e}"
    return errors


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), din=st.integers(1, 5), dout=st.integers(1, 5))
def test_linear(seed, N, T, din, dout):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, din), w=randn(rng, dout, din), b=randn(rng, dout))
    check((lambda x, w, b: L.linear_forward(x, w, b), L.linear_backward), ["x", "w", "b"], inputs, rng)


# D >= 3: at D = 2 the output is +-sqrt(var / (var + eps)) ~ +-1 whatever x is, so the gradient is ~eps/var,
# below what central differences can resolve.
@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(3, 8), scale=st.floats(0.1, 10))
def test_layernorm(seed, N, T, D, scale):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D, scale=scale) + rng.standard_normal())
    check((lambda x: L.layernorm_forward(x), L.layernorm_backward), ["x"], inputs, rng)


def test_layernorm_matches_definition(rng):
    x = randn(rng, 2, 3, 7, scale=3)
    y, _ = L.layernorm_forward(x)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(1, 6))
def test_modulate(seed, N, T, D):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D), shift=randn(rng, N, D), scale=randn(rng, N, D))
    check((lambda x, shift, scale: L.modulate_forward(x, shift, scale), L.modulate_backward),
          ["x", "shift", "scale"], inputs, rng)
    out, _ = L.modulate_forward(**inputs)
    np.testing.assert_allclose(out[:, 0], inputs["x"][:, 0] * (1 + inputs["scale"]) + inputs["shift"])


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(1, 6))
def test_gated_residual(seed, N, T, D):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D), gate=randn(rng, N, D), y=randn(rng, N, T, D))
    check((lambda x, gate, y: L.gated_residual_forward(x, gate, y), L.gated_residual_backward),
          ["x", "gate", "y"], inputs, rng)


@given(seed=seeds, n=st.integers(1, 20), scale=st.floats(0.1, 8))
def test_silu_and_gelu(seed, n, scale):
    rng = np.random.default_rng(seed)
    x = randn(rng, 2, n, scale=scale)
    check((lambda x: L.silu_forward(x), L.silu_backward), ["x"], dict(x=x), rng)
    check((lambda x: L.gelu_forward(x), L.gelu_backward), ["x"], dict(x=x), rng)


def test_activation_values():
    x = np.array([-100.0, -1.0, 0.0, 0.5, 3.0, 100.0])
    np.testing.assert_allclose(L.silu_forward(x)[0], x / (1 + np.exp(-x)), rtol=1e-12, atol=1e-30)
    c = np.sqrt(2 / np.pi)
    np.testing.assert_allclose(L.gelu_forward(x)[0], 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3))), rtol=1e-12)
    xf = np.array([-1e4, 1e4], dtype=np.float32)  # no overflow warnings, finite results
    with np.errstate(all="raise"):
        assert np.all(np.isfinite(L.silu_forward(xf)[0]))


@given(seed=seeds, rows=st.integers(1, 4), n=st.integers(1, 6), scale=st.floats(0.1, 20))
def test_softmax(seed, rows, n, scale):
    rng = np.random.default_rng(seed)
    s = randn(rng, rows, n, scale=scale)
    a = L.softmax(s)
    np.testing.assert_allclose(a.sum(-1), 1.0)
    check((lambda s: (L.softmax(s),) * 2, L.softmax_backward), ["s"], dict(s=s), rng)  # a is its own cache


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 5), NH=st.integers(1, 3), hs=st.integers(1, 4))
def test_attention(seed, N, T, NH, hs):
    rng = np.random.default_rng(seed)
    D = NH * hs
    inputs = dict(x=randn(rng, N, T, D), w_qkv=randn(rng, 3 * D, D, scale=0.5), b_qkv=randn(rng, 3 * D),
                  w_proj=randn(rng, D, D), b_proj=randn(rng, D))
    check((lambda **kw: L.attention_forward(**kw, num_heads=NH), L.attention_backward),
          ["x", "w_qkv", "b_qkv", "w_proj", "b_proj"], inputs, rng)


def test_attention_matches_definition(rng):
    """Heads are contiguous slices of [q | k | v]; scale hs^-0.5; softmax over keys."""
    N, T, NH, hs = 2, 5, 3, 4
    D = NH * hs
    x, wq, bq, wp, bp = randn(rng, N, T, D), randn(rng, 3 * D, D), randn(rng, 3 * D), randn(rng, D, D), randn(rng, D)
    out, _ = L.attention_forward(x, wq, bq, wp, bp, NH)
    qkv = x @ wq.T + bq
    heads = []
    for h in range(NH):
        q = qkv[..., h * hs:(h + 1) * hs]
        k = qkv[..., D + h * hs:D + (h + 1) * hs]
        v = qkv[..., 2 * D + h * hs:2 * D + (h + 1) * hs]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hs)
        a = np.exp(s - s.max(-1, keepdims=True))
        heads.append((a / a.sum(-1, keepdims=True)) @ v)
    np.testing.assert_allclose(out, np.concatenate(heads, -1) @ wp.T + bp, rtol=1e-10, atol=1e-10)


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), G=st.integers(1, 3), width=st.integers(1, 3))
def test_group_mask(seed, N, T, G, width):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, G * width), mask=randn(rng, N, G))
    check((L.group_mask_forward, L.group_mask_backward), ["x", "mask"], inputs, rng)
    out, _ = L.group_mask_forward(**inputs)
    g = G - 1  # the last group: channels g * width .. (g + 1) * width - 1
    np.testing.assert_array_equal(out[..., g * width:], inputs["x"][..., g * width:] * inputs["mask"][:, None, g:])


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), NH=st.integers(1, 3), hs=st.integers(1, 3))
def test_attention_with_a_head_mask(seed, N, T, NH, hs):
    """The mask's gradient is checked at real-valued masks; at a 0/1 mask, a head masked out is a head whose proj
    columns are zero, and a mask of ones changes nothing."""
    rng = np.random.default_rng(seed)
    D = NH * hs
    inputs = dict(x=randn(rng, N, T, D), w_qkv=randn(rng, 3 * D, D, scale=0.5), b_qkv=randn(rng, 3 * D),
                  w_proj=randn(rng, D, D), b_proj=randn(rng, D), head_mask=randn(rng, N, NH))
    check((lambda **kw: L.attention_forward(**kw, num_heads=NH), L.attention_backward),
          ["x", "w_qkv", "b_qkv", "w_proj", "b_proj", "head_mask"], inputs, rng)
    weights = [inputs[k] for k in ("w_qkv", "b_qkv", "w_proj", "b_proj")]
    off = np.ones((N, NH))
    off[:, -1] = 0
    w_proj = inputs["w_proj"].copy()
    w_proj[:, -hs:] = 0  # the last head's columns
    np.testing.assert_allclose(L.attention_forward(inputs["x"], *weights, NH, off)[0],
                               L.attention_forward(inputs["x"], *weights[:2], w_proj, weights[3], NH)[0],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(L.attention_forward(inputs["x"], *weights, NH, np.ones((N, NH)))[0],
                                  L.attention_forward(inputs["x"], *weights, NH)[0])


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), D=st.integers(1, 4), G=st.sampled_from([1, 2, 4]))
def test_mlp_with_a_hidden_mask(seed, N, T, D, G):
    """G groups of 4D / G hidden units; a group masked out is a group whose fc2 columns are zero."""
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D), w1=randn(rng, 4 * D, D), b1=randn(rng, 4 * D),
                  w2=randn(rng, D, 4 * D), b2=randn(rng, D), hidden_mask=randn(rng, N, G))
    check((lambda **kw: L.mlp_forward(**kw), L.mlp_backward), ["x", "w1", "b1", "w2", "b2", "hidden_mask"], inputs,
          rng)
    x, w1, b1, w2, b2 = (inputs[k] for k in ("x", "w1", "b1", "w2", "b2"))
    off = np.ones((N, G))
    off[:, 0] = 0
    w2_off = w2.copy()
    w2_off[:, :4 * D // G] = 0  # the first group's columns
    np.testing.assert_allclose(L.mlp_forward(x, w1, b1, w2, b2, hidden_mask=off)[0],
                               L.mlp_forward(x, w1, b1, w2_off, b2)[0], rtol=1e-12, atol=1e-12)


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), D=st.sampled_from([3, 4, 6]), masked=st.booleans())
def test_adaln_zero_mlp(seed, N, T, D, masked):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D), attn_out=randn(rng, N, T, D), gate_msa=randn(rng, N, D),
                  shift_mlp=randn(rng, N, D), scale_mlp=randn(rng, N, D), gate_mlp=randn(rng, N, D),
                  w1=randn(rng, 4 * D, D, scale=0.5), b1=randn(rng, 4 * D), w2=randn(rng, D, 4 * D, scale=0.5),
                  b2=randn(rng, D))
    if masked:
        inputs["hidden_mask"] = randn(rng, N, 2)
    check((L.adaln_zero_mlp_forward, L.adaln_zero_mlp_backward), list(inputs), inputs, rng)


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 3), NH=st.integers(1, 3),
       hs=st.integers(1, 3))
def test_attend_over_another_key_set(seed, N, T, S, NH, hs):
    """attend_forward alone, with S keys for T queries (what joint and cross-attention use)."""
    rng = np.random.default_rng(seed)
    inputs = dict(q=randn(rng, N, NH, T, hs), k=randn(rng, N, NH, S, hs), v=randn(rng, N, NH, S, hs))
    check((L.attend_forward, L.attend_backward), ["q", "k", "v"], inputs, rng)


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(3, 6), scale=st.floats(0.1, 5))
def test_adaln(seed, N, T, D, scale):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D, scale=scale), shift=randn(rng, N, D), scale=randn(rng, N, D))
    check((L.adaln_forward, L.adaln_backward), ["x", "shift", "scale"], inputs, rng)


@given(seed=seeds, N=st.integers(1, 3), T=st.integers(1, 4), D=st.sampled_from([4, 8]), P=st.integers(1, 5))
def test_final_layer(seed, N, T, D, P):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D, scale=2), c_act=randn(rng, N, D), w_mod=randn(rng, 2 * D, D, scale=0.5),
                  b_mod=randn(rng, 2 * D), w=randn(rng, P, D), b=randn(rng, P))
    check((L.final_layer_forward, L.final_layer_backward), ["x", "c_act", "w_mod", "b_mod", "w", "b"], inputs, rng)


@given(seed=seeds, N=st.integers(1, 4), D=st.integers(1, 5))
def test_timestep_embedder(seed, N, D):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 1000, size=N)
    inputs = dict(w1=randn(rng, D, 256, scale=0.1), b1=randn(rng, D), w2=randn(rng, D, D), b2=randn(rng, D))
    check((lambda **w: L.timestep_embedder_forward(t, **w), L.timestep_embedder_backward), ["w1", "b1", "w2", "b2"],
          inputs, rng)


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), D=st.integers(1, 4))
def test_mlp(seed, N, T, D):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, T, D), w1=randn(rng, 4 * D, D), b1=randn(rng, 4 * D),
                  w2=randn(rng, D, 4 * D), b2=randn(rng, D))
    check((lambda **kw: L.mlp_forward(**kw), L.mlp_backward), ["x", "w1", "b1", "w2", "b2"], inputs, rng)


@given(seed=seeds, N=st.integers(1, 2), C=st.integers(1, 3), p=st.sampled_from([1, 2, 4]),
       g=st.integers(1, 3), D=st.integers(1, 5))
def test_patch_embed(seed, N, C, p, g, D):
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, C, g * p, g * p), w=randn(rng, D, C, p, p), b=randn(rng, D))
    check((lambda x, w, b: L.patch_embed_forward(x, w, b, p), L.patch_embed_backward), ["x", "w", "b"], inputs, rng)


def test_patch_embed_is_the_strided_conv(rng):
    """Token (row, col) = sum over (c, i, j) of w[:, c, i, j] x[c, row*p + i, col*p + j] + b, row-major tokens."""
    N, C, p, g, D = 2, 3, 2, 3, 5
    x, w, b = randn(rng, N, C, g * p, g * p), randn(rng, D, C, p, p), randn(rng, D)
    out, _ = L.patch_embed_forward(x, w, b, p)
    for row in range(g):
        for col in range(g):
            patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (N, C, p, p)
            ref = np.einsum("ncij,dcij->nd", patch, w) + b
            np.testing.assert_allclose(out[:, row * g + col], ref, rtol=1e-12, atol=1e-12)


@given(seed=seeds, N=st.integers(1, 2), C=st.integers(1, 3), p=st.sampled_from([1, 2, 3]), g=st.integers(1, 3))
def test_unpatchify(seed, N, C, p, g):
    rng = np.random.default_rng(seed)
    check((lambda x: (L.unpatchify(x, p, C), None), lambda d, _: L.unpatchify_backward(d, p)), ["x"],
          dict(x=randn(rng, N, g * g, p * p * C)), rng)
    # official order: token vector is (p_row, p_col, c) with channel fastest
    x = randn(rng, N, g * g, p * p * C)
    img = L.unpatchify(x, p, C)
    n, row, col, i, j, c = N - 1, g - 1, 0, p - 1, 0, C - 1
    assert img[n, c, row * p + i, col * p + j] == x[n, row * g + col, (i * p + j) * C + c]


def test_timestep_embedding():
    t = np.array([0, 1, 999])
    emb = L.timestep_embedding(t, 256)
    assert emb.shape == (3, 256) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])  # cos first: t=0 -> [1]*128 + [0]*128
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(emb[2], np.r_[np.cos(999 * freqs), np.sin(999 * freqs)], atol=2e-4)
    assert L.timestep_embedding(t, 7).shape == (3, 7) and np.all(L.timestep_embedding(t, 7)[:, -1] == 0)


@given(seed=seeds, N=st.integers(1, 6), K=st.integers(1, 4), D=st.integers(1, 4))
def test_embedding_with_repeated_labels(seed, N, K, D):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=N)
    labels[0] = labels[-1]  # at least one repeat whenever N > 1
    check((lambda table: L.embedding_forward(labels, table), L.embedding_backward), ["table"],
          dict(table=randn(rng, K, D)), rng)


def test_pos_embed_layout():
    D, g = 16, 4
    pe = L.get_2d_sincos_pos_embed(D, g)
    assert pe.shape == (g * g, D)
    n = 2 * g + 3  # row 2, col 3
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    np.testing.assert_allclose(pe[n, :D // 2], np.r_[np.sin(3 * omega), np.cos(3 * omega)])  # column first
    np.testing.assert_allclose(pe[n, D // 2:], np.r_[np.sin(2 * omega), np.cos(2 * omega)])  # then row


@given(seed=seeds, N=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 3), NH=st.integers(1, 2),
       hs=st.integers(1, 3))
def test_the_pieces_compose_a_joint_attention(seed, N, T, S, NH, hs):
    """The design test of the shared pieces: MM-DiT's joint attention (two token streams, each with its own qkv and
    output weights, one softmax over both) is qkv_forward per stream, attend_forward over the concatenated tokens,
    and linear_forward per stream; its backward is the same calls in reverse. No block code is copied."""
    rng = np.random.default_rng(seed)
    D = NH * hs

    def forward(x, c, wx, bx, wc, bc, px, pbx, pc, pbc):
        (qx, kx, vx), qkv_x = L.qkv_forward(x, wx, bx, NH)  # image stream (N, NH, T, hs) each
        (qc, kc, vc), qkv_c = L.qkv_forward(c, wc, bc, NH)  # text stream (N, NH, S, hs) each
        cat = lambda a, b: np.concatenate([a, b], axis=2)  # noqa: E731  tokens: (N, NH, T + S, hs)
        y, attend = L.attend_forward(cat(qx, qc), cat(kx, kc), cat(vx, vc))
        out_x, proj_x = L.linear_forward(L.merge_heads(y[:, :, :T]), px, pbx)
        out_c, proj_c = L.linear_forward(L.merge_heads(y[:, :, T:]), pc, pbc)
        return np.concatenate([out_x, out_c], axis=1), (qkv_x, qkv_c, attend, proj_x, proj_c)

    def backward(dout, cache):
        qkv_x, qkv_c, attend, proj_x, proj_c = cache
        dyx, dpx, dpbx = L.linear_backward(dout[:, :T], proj_x)
        dyc, dpc, dpbc = L.linear_backward(dout[:, T:], proj_c)
        dy = np.concatenate([L.split_heads(dyx, NH), L.split_heads(dyc, NH)], axis=2)
        dq, dk, dv = L.attend_backward(dy, attend)
        dx, dwx, dbx = L.qkv_backward(dq[:, :, :T], dk[:, :, :T], dv[:, :, :T], qkv_x)
        dc, dwc, dbc = L.qkv_backward(dq[:, :, T:], dk[:, :, T:], dv[:, :, T:], qkv_c)
        return dx, dc, dwx, dbx, dwc, dbc, dpx, dpbx, dpc, dpbc

    inputs = dict(x=randn(rng, N, T, D), c=randn(rng, N, S, D), wx=randn(rng, 3 * D, D, scale=0.5),
                  bx=randn(rng, 3 * D), wc=randn(rng, 3 * D, D, scale=0.5), bc=randn(rng, 3 * D),
                  px=randn(rng, D, D), pbx=randn(rng, D), pc=randn(rng, D, D), pbc=randn(rng, D))
    check((forward, backward), list(inputs), inputs, rng)
    # with one stream's weights used for both, it is self-attention over the concatenated tokens
    same = dict(inputs, wc=inputs["wx"], bc=inputs["bx"], pc=inputs["px"], pbc=inputs["pbx"])
    joint, _ = forward(**same)
    whole, _ = L.attention_forward(np.concatenate([same["x"], same["c"]], axis=1), same["wx"], same["bx"],
                                   same["px"], same["pbx"], NH)
    np.testing.assert_allclose(joint, whole, rtol=1e-10, atol=1e-10)


@given(seed=seeds, N=st.integers(1, 2), NH=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(1, 8),
       scale=st.floats(0.1, 10))
def test_rmsnorm(seed, N, NH, T, D, scale):
    """On (N, NH, T, hs) as MM-DiT's qk norm uses it: the weight's gradient sums over every leading axis."""
    rng = np.random.default_rng(seed)
    inputs = dict(x=randn(rng, N, NH, T, D, scale=scale), w=randn(rng, D))
    check((L.rmsnorm_forward, L.rmsnorm_backward), ["x", "w"], inputs, rng)


def test_rmsnorm_matches_definition(rng):
    x, w = randn(rng, 2, 3, 7, scale=3), randn(rng, 7)
    y, _ = L.rmsnorm_forward(x, w)
    np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-12, atol=1e-12)
    y32, _ = L.rmsnorm_forward(x.astype(np.float32), w.astype(np.float32))
    assert y32.dtype == np.float32


@given(seed=seeds, N=st.integers(1, 2), C=st.integers(1, 3), p=st.sampled_from([1, 2]), h=st.integers(1, 3),
       w=st.integers(1, 3))
def test_unpatchify_grid(seed, N, C, p, h, w):
    """The h x w case of unpatchify (the same token layout); unpatchify_backward is its inverse."""
    rng = np.random.default_rng(seed)
    x = randn(rng, N, h * w, p * p * C)
    img = L.unpatchify_grid(x, p, C, h, w)
    assert img.shape == (N, C, h * p, w * p)
    np.testing.assert_array_equal(L.unpatchify_backward(img, p), x)
    if h == w:
        np.testing.assert_array_equal(img, L.unpatchify(x, p, C))
    n, row, col, i, j, c = N - 1, h - 1, w - 1, p - 1, 0, C - 1
    assert img[n, c, row * p + i, col * p + j] == x[n, row * w + col, (i * p + j) * C + c]
