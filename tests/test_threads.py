"""minidit.threads: a DiT run on shards of the batch, in threads, gives the whole batch's outputs and gradients;
the optimizer's threaded updates equal its sequential ones; the helpers split work as they say."""
import numpy as np
import pytest

from minidit.conditioning import ConditioningDiT
from minidit.model import DiT, DiTConfig
from minidit.optim import EMA, AdamW
from minidit.threads import (ShardedDiT, balanced_groups, batch_shards, cpu_count, data_parallel, map_balanced,
                             parallel_map, threaded_map)

TINY = DiTConfig(depth=2, hidden_size=16, num_heads=2, patch_size=2)
C, S, K = 3, 8, 5


def make_model(dtype=np.float64, seed=0, block="adaln-zero", **kw):
    """A small DiT (another design: a ConditioningDiT) at random parameters (at DiT's init adaLN-Zero zeroes most
    gradients); kw: more spec fields."""
    fields = dict(input_size=S, in_channels=C, num_classes=K, dtype=dtype, **kw)
    model = DiT(TINY, **fields) if block == "adaln-zero" else ConditioningDiT(TINY, block=block, **fields)
    rng = np.random.default_rng(seed)
    model.load_state_dict({k: (0.3 * rng.standard_normal(s)).astype(dtype) for k, s in model.param_shapes().items()})
    return model


def inputs(n, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, C, S, S)).astype(dtype), rng.integers(0, 1000, n), rng.integers(0, K, n),
            rng.standard_normal((n, 2 * C, S, S)).astype(dtype))


@pytest.mark.parametrize("n, threads", [(7, 2), (7, 3), (2, 4), (1, 2), (5, 1)])
@pytest.mark.parametrize("block", ["adaln-zero", "in-context"])
def test_sharded_forward_and_backward_equal_the_whole_batch(n, threads, block):
    model = make_model(block=block)
    x, t, y, dout = inputs(n)
    ref_out, ref_cache = model.forward(x, t, y, train=True, rng=np.random.default_rng(3))
    ref_grads = model.backward(dout, ref_cache)

    net = ShardedDiT(model, threads)
    out, cache = net.forward(x, t, y, train=True, rng=np.random.default_rng(3))  # the same label dropout
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    assert len(cache.shards) == min(n, threads)
    grads = net.backward(dout, cache)
    assert list(grads) == list(ref_grads)
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert any(np.abs(g).max() > 1e-3 for g in grads.values())  # not vacuous: real gradients were compared


def test_label_dropout_is_drawn_for_the_whole_batch():
    """The sharded forward drops the labels DiT.forward would drop from the same generator (prob 0.5 here, so the
    mask has both values), and force_drop_ids is passed through per shard."""
    model = make_model(class_dropout_prob=0.5)
    x, t, y, _ = inputs(8)
    drop = model.condition_dropout(8, np.random.default_rng(5))
    assert drop.any() and not drop.all()
    ref, _ = model.forward(x, t, y, force_drop_ids=drop)
    net = ShardedDiT(model, 3)
    out, _ = net.forward(x, t, y, train=True, rng=np.random.default_rng(5))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    out, _ = net.forward(x, t, y, force_drop_ids=drop.astype(int))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    undropped, _ = model.forward(x, t, y)
    assert not np.allclose(out, undropped)


def test_release_frees_block_caches_and_keeps_the_gradients():
    model = make_model()
    x, t, y, dout = inputs(4)
    net = ShardedDiT(model, 2)
    _, cache = net.forward(x, t, y)
    kept = net.backward(dout, cache)
    _, cache = net.forward(x, t, y)
    released = net.backward(dout, cache, release=True)
    assert all(b is None for c in cache.caches for b in c.blocks)
    for name in kept:
        np.testing.assert_array_equal(released[name], kept[name])


def test_sampling_forward_without_cache():
    model = make_model()
    x, t, y, _ = inputs(5)
    out, cache = ShardedDiT(model, 2).forward(x, t, y, cache=False)
    assert cache is None
    np.testing.assert_allclose(out, model.forward(x, t, y, cache=False)[0], rtol=1e-12, atol=1e-12)


def test_bad_input_and_settings_are_named():
    model = make_model()
    x, t, y, _ = inputs(4)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ShardedDiT(model, 0)
    with pytest.raises(ValueError):  # the whole batch is checked, so the message names its shapes
        ShardedDiT(model, 2).forward(x, t[:3], y)
    strict = DiT(TINY, input_size=S, in_channels=C, num_classes=K, backend="strict")
    with pytest.raises(ValueError, match="NumPy models"):
        ShardedDiT(strict, 2)


def test_float32_threads_match_one_thread_closely():
    """The float32 model through 2 shards vs the whole batch: equal up to float32 rounding."""
    model = make_model(np.float32)
    x, t, y, dout = inputs(6, np.float32)
    ref_out, ref_cache = model.forward(x, t, y)
    ref = model.backward(dout, ref_cache)
    net = ShardedDiT(model, 2)
    out, cache = net.forward(x, t, y)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())
    grads = net.backward(dout, cache)
    for name in ref:  # sums in another order: rounding ~ 1e-7 of the largest terms, so compare to each array's scale
        assert grads[name].dtype == np.float32, name
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max(),
                                   err_msg=name)


def test_data_parallel_shards_numpy_models_only():
    model = make_model()
    net, threads = data_parallel(model, 3)
    assert isinstance(net, ShardedDiT) and net.model is model and threads == 3
    assert data_parallel(model)[1] == cpu_count()  # None: every core
    strict = DiT(TINY, input_size=S, in_channels=C, num_classes=K, backend="strict")
    assert data_parallel(strict, 4) == (strict, 1)  # a device model runs as it is


@pytest.mark.parametrize("n, k", [(7, 2), (7, 3), (3, 5), (1, 1), (8, 8)])
def test_batch_shards(n, k):
    shards = batch_shards(n, k)
    sizes = [s.stop - s.start for s in shards]
    assert len(shards) == min(n, k) and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert [s.start for s in shards] == [0] + [s.stop for s in shards[:-1]]  # contiguous, in order


def test_balanced_groups():
    sizes = [100, 1, 50, 50, 3, 7, 90]
    groups = balanced_groups(sizes, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    totals = [sum(sizes[i] for i in g) for g in groups]
    assert max(totals) - min(totals) <= max(sizes)
    assert balanced_groups([5], 4) == [[0]]  # no empty groups


@pytest.mark.parametrize("threads", [1, 3])
def test_map_balanced_calls_every_item_once(threads):
    seen = []  # list.append is atomic under the GIL
    map_balanced(seen.append, ["a", "b", "c", "d", "e"], [5, 1, 4, 2, 3], threads)
    assert sorted(seen) == ["a", "b", "c", "d", "e"]


def test_parallel_map_keeps_order_and_raises():
    assert parallel_map(lambda i: i * i, range(10), 3) == [i * i for i in range(10)]

    def boom(i):
        if i == 2:
            raise RuntimeError("shard 2 failed")
        return i

    with pytest.raises(RuntimeError, match="shard 2 failed"):
        parallel_map(boom, range(4), 2)


def test_pool_threads_reuse_freed_memory():
    """The pool's threads get their temporaries back from malloc's free lists as the main thread does (one arena
    for all: a thread's own arena unmaps its heaps when they empty, and every shard page-faulted them in again)."""
    resource = pytest.importorskip("resource")
    from minidit.threads import keep_freed_host_memory

    if not keep_freed_host_memory():
        pytest.skip("not glibc: malloc cannot be tuned here")
    x = np.ones(3 << 20, dtype=np.float32)  # 12 MiB

    def work(_):  # like a shard's step: many large temporaries live at once (96 MiB, over a thread heap's 64), freed
        for _ in range(10):
            live = [x * 2 for _ in range(8)]
            del live

    for _ in range(3):  # the first rounds grow the heap (as far as the two threads happen to overlap)
        parallel_map(work, range(2), 2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    parallel_map(work, range(2), 2)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # measured: 0 here; ~16000 with an arena per thread. Under one 12 MiB array's worth (3072 pages) leaves room
    # for a round in which the two threads overlap more than in any before it.
    assert faults < 3072, f"{faults} page faults in a round of the same temporaries (per-thread arenas?)"


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_optimizer_threads_change_nothing(wd):
    """AdamW and EMA spread over 3 threads update every parameter exactly as their default serial map does."""
    rng = np.random.default_rng(0)
    shapes = {"a": (40, 30), "b": (7,), "c": (3, 5, 2), "d": (1200,), "frozen": (4,)}
    params = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}]
    params.append({k: v.copy() for k, v in params[0].items()})
    init = {k: v.copy() for k, v in params[0].items()}
    opts = [AdamW(params[0], lr=1e-2, weight_decay=wd), AdamW(params[1], lr=1e-2, weight_decay=wd, map=threaded_map(3))]
    emas = [EMA(params[0], decay=0.9), EMA(params[1], decay=0.9, map=threaded_map(3))]
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k != "frozen"}
        for p, opt, ema in zip(params, opts, emas):
            opt.step(p, grads)
            ema.update(p)
    for k in shapes:
        np.testing.assert_array_equal(params[1][k], params[0][k], err_msg=k)
        np.testing.assert_array_equal(emas[1].params[k], emas[0].params[k], err_msg=k)
    assert not np.array_equal(params[0]["a"], init["a"])  # the updates did something
    np.testing.assert_array_equal(params[0]["frozen"], init["frozen"])  # no gradient, no update


def test_an_mmdit_in_shards_equals_the_whole_batch():
    """ShardedDiT cuts every condition (context, pooled) along the batch like x: an MM-DiT's sharded forward and
    backward (with release) equal the whole batch's in float64."""
    from minidit.mmdit import MMDiT, MMDiTSpec

    spec = MMDiTSpec(sample_size=4, patch_size=2, in_channels=2, num_layers=2, attention_head_dim=4,
                     num_attention_heads=2, joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=5,
                     out_channels=2, pos_embed_max_size=4, qk_norm="rms_norm")
    model = MMDiT(spec, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    for k, v in model.params.items():
        if k != "pos_embed.pos_embed":
            v[...] = 0.3 * rng.standard_normal(v.shape)
    x, t = rng.standard_normal((5, 2, 4, 4)), np.array([1.0, 200.0, 500.0, 800.0, 999.0])
    ctx, pooled = rng.standard_normal((5, 3, 6)), rng.standard_normal((5, 5))
    ref_out, ref_cache = model.forward(x, t, ctx, pooled)
    dout = rng.standard_normal(ref_out.shape)
    ref = model.backward(dout, ref_cache)
    net, threads = data_parallel(model, 2)
    out, cache = net.forward(x, t, ctx, pooled)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    grads = net.backward(dout, cache, release=True)
    assert list(grads) == list(ref) and threads == 2
    for name in ref:
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert all(c is None for shard in cache.caches for c in shard.blocks)  # released
