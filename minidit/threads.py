"""Every CPU core for a NumPy training step: the batch in shards, one thread per shard.

NumPy runs each elementwise operation (GELU, LayerNorm, softmax, the AdamW update, ...) on one core; only its
matmuls use several, through the BLAS library's own threads. So on a CPU minidit runs the DiT data-parallel, as
multi-GPU training does: the batch is cut into one shard per thread, each thread runs the forward and backward of
its shard with a single-threaded BLAS, and the shards' parameter gradients are summed. Nothing in a DiT mixes the
samples of a batch (LayerNorm normalises each token on its own), so

    forward(batch) = the shards' forwards, concatenated
    dL/dW          = the sum over shards of the shards' dL/dW         (the loss is a sum over samples)

exactly, up to the order of float additions. NumPy and BLAS release Python's GIL inside their loops, so the
threads run at the same time. The optimizer spreads its per-parameter updates over the same threads: minidit.train
gives AdamW and EMA threaded_map(threads) as their map (optim.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np



@functools.lru_cache(maxsize=None)
def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS. Returns whether it could.

    A training step allocates and frees the same large temporaries every step; by default glibc returns blocks over
    128 KiB to the OS on free, so every step would page-fault them in again. Threads other than the main one get
    arenas of their own, whose heaps are unmapped when they empty: one arena for all threads keeps their memory too.
    Process-wide; a no-op where the C library is not glibc. (Measurements: docs/performance.md.)
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library to open, or not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30)  # 32 MiB, 1 GiB
                and mallopt(M_ARENA_MAX, 1))


def cpu_count():
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _executor(threads):
    keep_freed_host_memory()  # before the threads exist, so that they reuse freed memory too (see there)
    return ThreadPoolExecutor(threads, thread_name_prefix="minidit")


def parallel_map(fn, items, threads):
    """[fn(item) for item in items], with up to `threads` items at a time on a pool of threads (kept between
    calls). Exceptions propagate to the caller."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    return list(_executor(threads).map(fn, items))


def balanced_groups(sizes, n):
    """Split indices 0..len(sizes)-1 into n groups of about equal total size (largest first, each to the lightest
    group), e.g. parameters by element count so that each thread updates about the same number of them."""
    groups, totals = [[] for _ in range(n)], [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = totals.index(min(totals))
        groups[j].append(i)
        totals[j] += sizes[i]
    return [g for g in groups if g]


def map_balanced(fn, items, sizes, threads):
    """fn(item) for every item, the items split into `threads` groups of about equal total size (sizes[i] is item
    i's), one group per thread: e.g. per-parameter work, so that each thread gets about the same number of elements."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    parallel_map(lambda group: [fn(items[i]) for i in group], balanced_groups(sizes, threads), threads)


def threaded_map(threads):
    """map(fn, items, sizes) = map_balanced on `threads` threads: how AdamW and EMA (minidit.optim) spread their
    per-parameter updates."""
    return functools.partial(map_balanced, threads=threads)


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block (every thread of the pool is already one core's worth of work);
    the previous thread counts are restored after it."""
    with _blas_controller().limit(limits=1):
        yield


def batch_shards(n, threads):
    """Slices cutting a batch of n into min(n, threads) contiguous shards of sizes differing by at most one."""
    k = max(1, min(n, threads))
    bounds = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class ShardedCache(NamedTuple):
    shards: list  # slices of the batch
    caches: list  # each shard's DiT cache


class ShardedDiT:
    """A DiT (or any minidit model with the same forward/backward, e.g. an MM-DiT) whose forward and backward run on
    `threads` shards of the batch at once (NumPy arrays).

        net = ShardedDiT(model, threads=2)
        out, cache = net.forward(x_t, t, y, train=True, rng=rng)   # as model.forward, same results
        grads = net.backward(dout, cache)                          # as model.backward

    Condition dropout is drawn once for the whole batch (the model's condition_dropout, as its forward draws it), so a
    seed gives the same conditions whatever the number of threads. The parameters are the model's (shared, read
    only).
    """

    def __init__(self, model, threads=None):
        if model.xp is not np:
            raise ValueError(f"ShardedDiT runs NumPy models on CPU threads; this model is on {model.xp.__name__}")
        self.model = model
        self.threads = cpu_count() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")

    def forward(self, x, t, *conds, train=False, force_drop_ids=None, rng=None, cache=True):
        """As the model's forward: (out (N, C_out, H, W), cache), the cache holding each shard's (None when
        cache=False). conds: the conditions, each cut along its first (batch) axis like x: DiT's labels y, an
        MM-DiT's context and pooled. Condition dropout (train=True) is drawn for the whole batch and given to the
        shards as force_drop_ids."""
        m = self.model
        m.check_inputs(x, t, *conds)  # on the whole batch, so that errors name its shapes
        if force_drop_ids is None and train:
            force_drop_ids = m.condition_dropout(x.shape[0], rng)
        shards = batch_shards(x.shape[0], self.threads)
        drop = None if force_drop_ids is None else np.asarray(force_drop_ids)

        def run(s):
            extra = {} if drop is None else {"force_drop_ids": drop[s]}
            return m.forward(x[s], t[s], *(None if c is None else c[s] for c in conds), cache=cache, **extra)

        with single_threaded_blas():
            results = parallel_map(run, shards, self.threads)
        out = np.concatenate([o for o, _ in results]) if len(results) > 1 else results[0][0]
        return out, (ShardedCache(shards, [c for _, c in results]) if cache else None)

    def backward(self, dout, cache, release=False):
        """dout (N, C_out, H, W) -> grads (name -> gradient): each shard's backward, then their sum.
        release=True: as DiT.backward's (each block's activations freed as soon as its backward is done)."""
        shards, caches = cache

        def run(i):
            return self.model.backward(dout[shards[i]], caches[i], release=release)

        with single_threaded_blas():
            grads = parallel_map(run, range(len(shards)), self.threads)
            total = grads[0]

            def add(name):
                for g in grads[1:]:
                    total[name] += g[name]

            map_balanced(add, list(total), [g.size for g in total.values()], self.threads)
        return total


def data_parallel(model, threads=None):
    """(net, threads) to train or sample `model` with: for a NumPy model a ShardedDiT on `threads` CPU threads (None:
    every core), for a device model the model itself and 1 (a GPU runs each operation on all its cores already)."""
    if model.xp is not np:
        return model, 1
    net = ShardedDiT(model, threads)
    return net, net.threads
