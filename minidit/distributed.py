"""Data parallelism over processes: `mpiexec -n N python -m minidit.train ...` trains one model on N ranks.

minidit.threads shares a batch among the threads of one process; this module shares it among processes ("ranks"),
on one machine or several, each rank with some CPU cores (numpy) or one GPU (cupy). The mathematics is that of one
process with the whole batch (as PyTorch's DistributedDataParallel):

  * every rank draws the same global batch of B samples, timesteps, noise and label dropout (functions of
    (seed, step), minidit.train) and keeps its own contiguous shard S_r of B_r samples (`World.shard`);
  * the loss is a mean over the global batch, so it splits into the shards' means, each weighted by its share:

        L = 1/B sum_n l_n = sum_r (B_r / B) L_r,        L_r = 1/B_r sum_{n in S_r} l_n

    rank r scales its shard's loss and dL_r/d(out) by B_r / B, and one allreduce (a sum over the ranks) gives every
    rank the global loss and the global gradient dL/dW = sum_r (B_r / B) dL_r/dW;
  * every rank then makes the same AdamW and EMA update from the same gradient, so the parameters stay identical
    on every rank without ever being sent (an allreduce hands every rank the same bits).

So N ranks compute what one process computes with batch B, up to the order of float additions. Rank 0 does the
talking (log, metrics, checkpoints, sample grids, progress bar); the others write nothing. A checkpoint holds no trace
of the number of ranks: a run resumes on any number (the global batch stays --batch-size).

The allreduce (`World.sum`): the arrays are copied into a few flat buckets of about BUCKET_BYTES each (one dtype per
bucket), each bucket is summed across the ranks in place, and the sums come back as views into the buckets. Host
(numpy) arrays go through MPI (mpi4py), device (cupy) arrays through NCCL (cupy.cuda.nccl) on the current CUDA stream,
never through the host. The buckets are reduced one after the other once the backward is done: communication does
not overlap the backward (its cost: docs/distributed.md).

    world = init("auto", backend="numpy")   # World(): one process, unless an MPI launcher started this one
    s = world.shard(B)                       # this rank's slice of every batch
    grads = world.sum(grads)                 # name -> the sum over ranks, the same on every rank

Without mpi4py (the "mpi" extra: pip install -e ".[mpi]") minidit runs as one process, as it always has.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

import numpy as np

from .threads import batch_shards, cpu_count
from .xp import get_xp

MODES = ("auto", "mpi", "off")  # --distributed
# Set in every rank by the launchers: Open MPI's mpirun/mpiexec (OMPI_COMM_WORLD_SIZE, and PMIX_RANK as every PMIx
# launcher), MPICH's Hydra mpiexec (PMI_SIZE, as other PMI-1/PMI-2 launchers)
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
BUCKET_BYTES = 25 * 2**20  # gradient bucket size: PyTorch DDP's default (bucket_cap_mb=25)
INSTALL = 'pip install -e ".[mpi]"'


def launcher_variable():
    """The variable of LAUNCHER_VARIABLES that says an MPI launcher started this process, or None."""
    return next((v for v in LAUNCHER_VARIABLES if v in os.environ), None)


def init(mode="auto", backend="numpy"):
    """The world this process trains in. mode "off", or "auto" without an MPI launcher: World(), one process.
    "mpi", or "auto" under mpiexec: an MPIWorld over MPI.COMM_WORLD (which needs mpi4py, and with the cupy backend
    one GPU per rank)."""
    if mode not in MODES:
        raise ValueError(f"--distributed {mode!r}: choose one of {', '.join(MODES)}")
    found = launcher_variable()
    if mode == "off" or (mode == "auto" and found is None):
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        why = "--distributed mpi" if mode == "mpi" else f"this process was started by an MPI launcher (${found} is set)"
        raise RuntimeError(f"{why}: data-parallel training needs mpi4py and an MPI; install them with {INSTALL}, "
                           f"or train as one process with --distributed off") from None
    return MPIWorld(MPI, backend)


class World:
    """One process: rank 0 of 1, the whole batch its shard. Every world has this interface; here each collective
    is the identity."""

    rank, size = 0, 1

    @property
    def is_root(self):
        """Whether this is rank 0, the one that writes the log, metrics, checkpoints and sample grids."""
        return self.rank == 0

    def shard(self, n):
        """This rank's slice of a global batch of n: the rank-th of `size` contiguous shards of sizes differing by at
        most one (minidit.threads.batch_shards)."""
        if n < self.size:
            raise ValueError(f"--batch-size {n} is smaller than the number of ranks ({self.size}): every rank needs at "
                             f"least one sample of the batch (--batch-size is the global batch, over all ranks)")
        return batch_shards(n, self.size)[self.rank]

    def cores(self):
        """The CPU threads this rank should run (the default of --threads): the cores it may run on."""
        return cpu_count()

    def sum(self, arrays: dict) -> dict:
        """name -> the sum over the ranks of arrays[name], the same on every rank (one process: `arrays` itself)."""
        return arrays

    def any(self, flag) -> bool:
        """Whether `flag` is true on any rank; every rank gets the same answer."""
        return bool(flag)


class MPIWorld(World):
    """The ranks an MPI launcher started: MPI.COMM_WORLD, host arrays summed by MPI, device arrays by NCCL.

    Ranks on one machine share its cores (`cores`); with the cupy backend each takes its own GPU (`select_gpu`)."""

    def __init__(self, MPI, backend="numpy", bucket_bytes=BUCKET_BYTES):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.bucket_bytes = bucket_bytes
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        mine = affinity()
        self._cores = threads_per_rank(mine, node.allgather(mine))
        self.nccl_sum = None  # sums device arrays
        if backend == "cupy":
            self.nccl_sum = NCCLSum(self.comm, node)
        elif backend != "numpy" and self.size > 1:
            raise ValueError(f"--backend {backend} trains as one process; data-parallel ranks run on numpy (MPI) or "
                             f"cupy (NCCL)")
        node.Free()

    def cores(self):
        return self._cores

    def sum(self, arrays):
        if self.size == 1:
            return arrays
        if get_xp(*arrays.values()) is np:
            return allreduce(arrays, self._mpi_sum, self.bucket_bytes)
        if self.nccl_sum is None:
            raise RuntimeError("device arrays are summed over NCCL, which this world was not set up for: "
                               "train with --backend cupy")
        return allreduce(arrays, self.nccl_sum, self.bucket_bytes)

    def _mpi_sum(self, buffer):
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def any(self, flag):
        return self.comm.allreduce(bool(flag), op=self.MPI.LOR)


# ---------------------------------------------------------------- the allreduce in buckets (any array module)
def plan_buckets(arrays: dict, bucket_bytes=BUCKET_BYTES):
    """The names of `arrays` in buckets: runs of consecutive names (in dict order) of one dtype, a bucket closed before
    it would pass bucket_bytes (an array larger than that is a bucket of its own). Returns a list of lists of names."""
    buckets, filled, dtype = [], 0, None
    for name, a in arrays.items():
        nbytes = a.size * a.dtype.itemsize
        if not buckets or a.dtype != dtype or filled + nbytes > bucket_bytes:
            buckets.append([])
            filled, dtype = 0, a.dtype
        buckets[-1].append(name)
        filled += nbytes
    return buckets


def flatten(arrays: dict, names):
    """One new contiguous 1-D buffer holding arrays[name] for each of `names`, one after the other."""
    xp = get_xp(*(arrays[n] for n in names))
    return xp.concatenate([xp.reshape(arrays[n], (-1,)) for n in names])


def unflatten(buffer, arrays: dict, names):
    """name -> the view of `buffer` (laid out by flatten) shaped like arrays[name]."""
    views, start = {}, 0
    for n in names:
        a = arrays[n]
        views[n] = buffer[start:start + a.size].reshape(a.shape)
        start += a.size
    return views


def allreduce(arrays: dict, reduce, bucket_bytes=BUCKET_BYTES):
    """name -> the sum over ranks of arrays[name]: each bucket (plan_buckets) is flattened into a new buffer, which
    reduce(buffer) sums across the ranks in place; the sums are views of those buffers, shaped as the inputs.
    Every rank must pass the same names, in the same order, with the same shapes and dtypes (a model's gradients)."""
    summed = {}
    for names in plan_buckets(arrays, bucket_bytes):
        buffer = flatten(arrays, names)
        reduce(buffer)
        summed.update(unflatten(buffer, arrays, names))
    return summed


# ---------------------------------------------------------------- a rank's share of the machine
def affinity():
    """The set of CPU cores this process may run on."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def threads_per_rank(mine, on_this_machine):
    """CPU threads for a rank that may run on the cores `mine`, among ranks on one machine that may run on the cores
    `on_this_machine` (one set per rank, its own included): its cores shared out among the ranks that may use them.
    Two ranks on 2 cores, unbound (MPICH's default) or bound to one core each (Open MPI's): 1 thread each."""
    sharing = sum(1 for cores in on_this_machine if cores & mine)
    return max(1, len(mine) // sharing)


# ---------------------------------------------------------------- GPUs: NCCL
def select_gpu(local_rank, device_count):
    """The GPU of the rank `local_rank` on its machine: that one, or the only one it sees (a launcher that hands each
    rank its own GPU through CUDA_VISIBLE_DEVICES)."""
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise RuntimeError(f"rank {local_rank} on this machine has no GPU of its own ({device_count} GPUs): start at "
                           f"most one rank per GPU")
    return local_rank


class NCCLSum:
    """Sums device (cupy) buffers across the ranks of an MPI communicator with NCCL, in place, on the current CUDA
    stream: no host copy and no sync (kernels queued after it wait for it, as for any kernel on the stream).

    Making one selects this rank's GPU (select_gpu by its rank among the `node` communicator's, the ranks of its
    machine), refuses ranks that would share a GPU, and builds the NCCL communicator from an id rank 0 broadcasts."""

    def __init__(self, comm, node):
        import cupy
        from cupy.cuda import nccl

        device = cupy.cuda.Device(select_gpu(node.Get_rank(), cupy.cuda.runtime.getDeviceCount()))
        device.use()
        buses = node.allgather(device.pci_bus_id)
        if len(set(buses)) < len(buses):
            raise RuntimeError(f"ranks on this machine share a GPU ({', '.join(buses)}): NCCL needs one GPU per rank; "
                               f"start one rank per GPU")
        uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
        self.nccl, self.cupy = nccl, cupy
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def __call__(self, buffer):
        if buffer.dtype not in self.types:
            raise TypeError(f"NCCLSum sums float16, float32 and float64 buffers, got {buffer.dtype}")
        self.comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self.types[buffer.dtype],
                            self.nccl.NCCL_SUM, self.cupy.cuda.get_current_stream().ptr)


# ---------------------------------------------------------------- one rank's failure ends the job
@contextlib.contextmanager
def abort_on_error():
    """Under MPI with other ranks, an exception (or a non-zero exit) in this rank prints its error, prefixed with the
    rank, and ends every rank with MPI_Abort, rather than leaving the others waiting for it forever in their next
    collective. Anywhere else it changes nothing."""
    try:
        yield
    except BaseException as e:
        MPI = sys.modules.get("mpi4py.MPI")
        if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() == 1:
            raise
        if isinstance(e, SystemExit):
            if not e.code:
                raise
            text = e.code if isinstance(e.code, str) else f"exit status {e.code}"
        else:
            text = "".join(traceback.format_exception(e)).rstrip()
        comm = MPI.COMM_WORLD
        print(f"[rank {comm.Get_rank()} of {comm.Get_size()}] {text}", file=sys.stderr, flush=True)
        comm.Abort(1)
