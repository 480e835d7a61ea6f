"""minidit.distributed: N ranks under `mpiexec -n N` train as one process with the same global batch (losses and
checkpoints to float32 tolerance), whatever the split into ranks and threads; rank 0 alone writes; checkpoints resume
on another number of ranks; a failing rank ends the job; Ctrl-C stops every rank at one step. The bucketed allreduce,
the choice of threads and GPUs, and the errors without mpi4py are checked without MPI.

The mpiexec tests need the mpi extra (pip install -e ".[mpi]": mpi4py and MPICH) and skip without it."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minidit import distributed
from minidit import train as train_mod
from minidit.backend import get_backend
from minidit.checkpoint import load_checkpoint
from minidit.dev import strict
from minidit.distributed import (INSTALL, LAUNCHER_VARIABLES, World, allreduce, init, plan_buckets, select_gpu,
                                 threads_per_rank)

# batch 5: unequal shards (3 + 2 on two ranks), so each rank's share B_r / B matters
FAST = ["--variant", "mini/4", "--batch-size", "5", "--log-every", "1", "--sample-steps", "2", "--steps", "4"]
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason=f"needs mpi4py and mpiexec: {INSTALL}")
LOSS_RTOL = 1e-5  # float32, another order of additions
STATE_RTOL = 1e-3  # of each checkpoint array's largest |value|: AdamW divides by sqrt(v), which amplifies rounding


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return np.array([x for line in f for x in json.loads(line)["losses"]])


def mpiexec(n, args, tmp_path, timeout=180, python=("-m", "minidit.train")):
    """`mpiexec -n n python -m minidit.train args` (or another python command line); the finished process."""
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *python, *args], cwd=tmp_path, timeout=timeout,
                          capture_output=True, text=True)


def train(ranks, threads, out, tmp_path, extra=()):
    """A run of FAST on `ranks` processes of `threads` threads each: in this process for one rank, else under
    mpiexec. Returns its printed output (mpiexec) or ""."""
    args = [*FAST, "--threads", str(threads), "--out", str(out), *extra]
    if ranks == 1:
        train_mod.main(args)
        return ""
    done = mpiexec(ranks, args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def assert_same_run(run, reference):
    """The same losses and the same checkpoint (weights, EMA, AdamW moments), to float32 tolerance. The moments
    matter: AdamW's step m / sqrt(v) hardly changes if every gradient is scaled alike, the moments change with it."""
    np.testing.assert_allclose(losses(run), losses(reference), rtol=LOSS_RTOL)
    got, meta = load_checkpoint(os.path.join(run, "checkpoint.npz"))
    ref, ref_meta = load_checkpoint(os.path.join(reference, "checkpoint.npz"))
    assert meta["step"] == ref_meta["step"] and sorted(got) == sorted(ref)
    for name in ref:
        scale = max(float(np.abs(ref[name]).max()), 1e-30)
        assert float(np.abs(got[name] - ref[name]).max()) <= STATE_RTOL * scale, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """FAST on one process and one thread, the run every split must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_mod.main([*FAST, "--threads", "1", "--out", str(out)])
    return out


# ---------------------------------------------------------------- under mpiexec
@needs_mpi
@pytest.mark.parametrize("ranks, threads", [(2, 1), (1, 2), (2, 2)])
def test_ranks_and_threads_train_as_one_process(reference, tmp_path, ranks, threads):
    out = tmp_path / "run"
    printed = train(ranks, threads, out, tmp_path)
    assert_same_run(out, reference)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # rank 0's files, and nothing from the others
    if ranks > 1:
        assert printed.count("done: 4 steps") == 1 and printed.count("(step=0000004)") == 1  # rank 0 alone talks
        assert f"backend numpy ({ranks} ranks, {threads} thread" in open(out / "log.txt").read()


@needs_mpi
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(reference, tmp_path, first, then):
    out = tmp_path / "run"
    train(first, 1, out, tmp_path, ["--steps", "2"])
    resume = ["--resume", str(out), "--steps", "4"]
    if then == 1:
        train_mod.main(resume)
    else:
        done = mpiexec(then, resume, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(out, reference)


IDENTICAL = """
import sys
import numpy as np
from mpi4py import MPI
from minidit import train
run = train.train(*train.parse_args(sys.argv[1:]))
mine = np.concatenate([a.ravel() for d in (run.model.params, run.ema.params, run.opt.m, run.opt.v) for a in d.values()])
everyone = MPI.COMM_WORLD.gather(mine)
if MPI.COMM_WORLD.Get_rank() == 0:
    print("IDENTICAL" if all(np.array_equal(m, everyone[0]) for m in everyone) else "DIFFERENT")
"""


@needs_mpi
def test_every_rank_holds_the_same_bits(tmp_path):
    """No parameter is ever sent, yet every rank's weights, EMA and AdamW moments stay equal, bit for bit."""
    done = mpiexec(2, [*FAST, "--threads", "1", "--no-final-samples", "--out", str(tmp_path / "run")], tmp_path,
                   python=("-c", IDENTICAL))
    assert done.returncode == 0 and "IDENTICAL" in done.stdout, done.stdout + done.stderr


@needs_mpi
def test_a_failing_rank_ends_the_job_with_its_error(reference, tmp_path):
    """Rank 0 refuses a folder that holds a run (only rank 0 claims it); rank 1, already training, must not wait for
    it forever: the job ends at once with rank 0's one-line error."""
    held = tmp_path / "held"
    shutil.copytree(reference, held)
    start = time.time()
    done = mpiexec(2, [*FAST, "--threads", "1", "--out", str(held)], tmp_path, timeout=60)
    assert done.returncode != 0
    assert "[rank 0 of 2] error: " in done.stderr and "already holds a run" in done.stderr, done.stderr
    assert time.time() - start < 60


@needs_mpi
def test_ctrl_c_stops_every_rank_and_rank_0_writes_the_checkpoint(tmp_path):
    """Ctrl-C in a terminal signals mpiexec's process group; MPICH's mpiexec passes SIGINT on to every rank (Open MPI's
    mpirun ends them instead: docs/distributed.md), and the ranks stop at one step."""
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    if "HYDRA" not in version:
        pytest.skip("this mpiexec is not MPICH's Hydra, which forwards Ctrl-C to the ranks")
    run = tmp_path / "c"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "minidit.train", *FAST, "--threads", "1",
                             "--steps", "100000", "--ckpt-every", "100000", "--out", str(run)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    _, meta = load_checkpoint(run / "checkpoint.npz")
    assert 0 < meta["step"] < 100000
    assert f"interrupted at step {meta['step']}; checkpoint written" in out
    assert len(losses(run)) == meta["step"]


NCCL_ON_ONE_GPU = """
import cupy, numpy as np
from mpi4py import MPI
from minidit.distributed import MPIWorld, allreduce
world = MPIWorld(MPI, "cupy")
host = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float64), "c": np.float32(2.5)}
summed = allreduce({k: cupy.asarray(v) for k, v in host.items()}, world.nccl_sum, bucket_bytes=16)
assert all(isinstance(v, cupy.ndarray) for v in summed.values())
assert all(np.array_equal(summed[k].get(), v) for k, v in host.items())
print("NCCL OK")
"""


@needs_mpi
def test_nccl_sum_on_cupy_arrays(tmp_path):
    """The NCCL path on a GPU: one rank, so the sum is the input; the buckets and the communicator are real."""
    try:
        get_backend("cupy")
    except RuntimeError as e:
        pytest.skip(str(e))
    done = mpiexec(1, [], tmp_path, python=("-c", NCCL_ON_ONE_GPU))
    assert done.returncode == 0 and "NCCL OK" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- without MPI
def grads_like(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32),
            "big": rng.standard_normal(40).astype(np.float32), "d": rng.standard_normal((2, 2)),  # float64
            "loss": np.float32(0.5) * np.float32(3.0)}  # a NumPy scalar, as train_step's loss * share


def test_buckets_keep_order_and_dtype_and_their_size():
    g = grads_like()
    # 64 bytes: w (128 bytes) and big (160) over it, each alone; b (32) alone too, as b + big would be over it;
    # d (float64) and loss (float32) start buckets of their dtype
    assert plan_buckets(g, bucket_bytes=64) == [["w"], ["b"], ["big"], ["d"], ["loss"]]
    assert plan_buckets(g, bucket_bytes=200) == [["w", "b"], ["big"], ["d"], ["loss"]]
    assert plan_buckets(g) == [["w", "b", "big"], ["d"], ["loss"]]  # 25 MiB: one bucket per run of one dtype


@pytest.mark.parametrize("bucket_bytes", [64, 200, distributed.BUCKET_BYTES])
def test_allreduce_sums_bucket_by_bucket_and_returns_views(bucket_bytes):
    """Two ranks holding the same arrays: their sum is twice them, in each array's shape and dtype, as views of the
    buffers that were reduced."""
    g = grads_like()
    buffers = []

    def reduce(buffer):  # the sum over two identical ranks
        buffer *= 2
        buffers.append(buffer)

    summed = allreduce(g, reduce, bucket_bytes)
    assert len(buffers) == len(plan_buckets(g, bucket_bytes)) and list(summed) == list(g)
    for name, a in g.items():
        assert summed[name].shape == np.shape(a) and summed[name].dtype == a.dtype
        np.testing.assert_array_equal(summed[name], 2 * a)
        assert any(np.shares_memory(summed[name], b) for b in buffers)  # a view: no copy out of the bucket


def test_allreduce_on_a_device_moves_nothing_to_the_host():
    """On the strict backend (a CPU stand-in for a GPU) the buckets are device arrays: no sync, no upload."""
    g = {k: strict.asarray(v) for k, v in grads_like().items()}
    with strict.track() as traffic, strict.no_syncs():
        summed = allreduce(g, lambda buffer: buffer.__imul__(2), bucket_bytes=64)
    assert traffic.syncs == [] and traffic.uploads == []
    for name in g:
        assert isinstance(summed[name], strict.ndarray)
        np.testing.assert_array_equal(summed[name].get(), 2 * g[name].get())


def test_a_world_of_one_process_is_the_identity():
    world = World()
    g = grads_like()
    assert world.sum(g) is g and world.any(True) and not world.any(False)
    assert world.shard(5) == slice(0, 5) and world.is_root


def test_each_rank_takes_its_contiguous_shard():
    shards = []
    for rank in range(3):
        world = World()
        world.rank, world.size = rank, 3
        shards.append(world.shard(8))
    assert shards == [slice(0, 2), slice(2, 5), slice(5, 8)]
    with pytest.raises(ValueError, match="--batch-size 2 is smaller than the number of ranks"):
        world.shard(2)


def test_threads_share_out_the_cores_of_a_machine():
    both = frozenset({0, 1})
    assert threads_per_rank(both, [both, both]) == 1  # MPICH: two unbound ranks on 2 cores
    assert threads_per_rank(frozenset({0}), [frozenset({0}), frozenset({1})]) == 1  # Open MPI: bound, a core each
    assert threads_per_rank(frozenset(range(16)), [frozenset(range(16))] * 4) == 4
    assert threads_per_rank(both, [both]) == 2
    assert threads_per_rank(frozenset({0}), [frozenset({0})] * 3) == 1  # never 0


def test_each_rank_takes_its_own_gpu():
    assert [select_gpu(r, 8) for r in range(8)] == list(range(8))
    assert select_gpu(3, 1) == 0  # the launcher gave each rank one GPU (CUDA_VISIBLE_DEVICES)
    with pytest.raises(RuntimeError, match="at most one rank per GPU"):
        select_gpu(2, 2)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_one_process_unless_a_launcher_or_the_flag_asks(no_launcher, monkeypatch):
    assert type(init("auto")) is World and type(init("off")) is World
    monkeypatch.setenv("PMI_SIZE", "2")
    assert type(init("off")) is World  # off: one process even under mpiexec
    with pytest.raises(ValueError, match="choose one of auto, mpi, off"):
        init("nccl")


@pytest.mark.parametrize("how", ["launcher", "flag"])
def test_without_mpi4py_asking_for_ranks_names_the_install(no_launcher, monkeypatch, tmp_path, how):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails, as where it is not installed
    if how == "launcher":
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    flag = ["--distributed", "mpi"] if how == "flag" else []
    with pytest.raises(SystemExit, match=r'needs mpi4py and an MPI; install them with pip install -e "\.\[mpi\]"'):
        train_mod.main([*FAST, *flag, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
