"""How fast is a minidit training step, and how far from the machine's matmul peak?

    python -m minidit.dev.bench --preset small --compare-torch    # mini/4 on 32x32x3, batch 32, against PyTorch eager
    python -m minidit.dev.bench --preset all                      # small, s4 (S/4, batch 16), s2 (S/2, batch 8)
    python -m minidit.dev.bench --backend cupy --variant S/2 --batch-size 64 --compare-torch
    python -m minidit.dev.bench --sampling --variant XL/2 --batch-size 8 --vae-decode   # sampling time and memory
    python -m minidit.dev.bench --mmdit --compare-torch    # SD3's MM-DiT, rectified flow, against diffusers' model
    python -m minidit.dev.bench --video --compare-torch    # the video DiT (Latte) against TorchLatte, same weights
    python -m minidit.dev.bench --sampling --dynamic RUN   # a Dynamic DiT's sliced sampling against its weights dense

Per configuration it prints
  * ms per training step, split into forward (q_sample + DiT forward), backward (loss, its gradient and the DiT
    backward) and optimizer (AdamW + EMA); images/s;
  * achieved GFLOP/s from the analytic count. Convention: training FLOPs per image = 3 x 2 x forward MACs
    (backward = 2 forwards; 2 FLOPs per multiply-add; matmuls only, as the paper's "Gflops" = MACs count them);
  * the float32 matmul peak measured in the same run with the same threads (the best n x n @ n x n product, probed
    before the runs and after each round of them) and the fraction of it reached;
  * peak memory of a step (what is measured is printed next to each number);
  * with --compare-torch: the same step in PyTorch eager (the same weights via torch_reference.build_torch_dit,
    float32, the official loss, torch.optim.AdamW, the official EMA update), in alternating runs A B A B ...

--video: minidit's VideoDiT in Latte's layout (one frame per token, spatial and temporal blocks in turn, the frame
code after block 0), by default S/2 on clips of 8 frames of 16x16x4 latents, 101 classes (UCF101's count), batch 2:
512 tokens per clip, about 0.9 s per training step on 2 idle cores. With --compare-torch the torch side is
torch_reference.TorchLatte (build_torch_latte: the same weights) taking the clips as Latte does, (N, F, C, H, W),
with the official loss split on the channel axis 2 as in Latte's training code. Figures: docs/performance.md.

Timing: after --warmup steps per side, --runs runs (pairs when comparing) of --steps steps each; a run's time is
the median of its steps, a side's time is the median over runs, and the ratio is the median of per-pair ratios.
On the CPU, phases are timed with time.perf_counter; on CUDA with events. Speed is measured here, never in tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from threadpoolctl import threadpool_limits

from ..backend import get_backend
from ..checkpoint import load
from ..cli import nonnegative_int, positive_int, run, sampling_steps
from ..diffusion import Diffusion
from ..model import DiT, DiTSpec, get_config
from ..optim import EMA, AdamW
from ..threads import data_parallel, threaded_map
from ..video import VideoDiT, VideoDiTSpec
from ..xp import set_fused_kernels, to_device

PRESETS = {  # the configurations measured in docs/performance.md
    "small": dict(variant="mini/4", input_size=32, in_channels=3, num_classes=10, batch_size=32),
    "s4": dict(variant="S/4", input_size=32, in_channels=4, num_classes=1000, batch_size=16),
    "s2": dict(variant="S/2", input_size=32, in_channels=4, num_classes=1000, batch_size=8),
}
DEFAULTS = dict(variant="S/2", input_size=32, in_channels=4, num_classes=1000, batch_size=8)
VIDEO = dict(variant="S/2", num_frames=8, input_size=16, in_channels=4, num_classes=101, batch_size=2)  # --video
MiB = float(2**20)


# ----------------------------------------------------------------------------------------------
# threads, timers, the matmul peak
# ----------------------------------------------------------------------------------------------
def limit_threads(n):
    """Limit this process's BLAS / OpenMP pools to n threads (NumPy's BLAS reads its env vars only at import,
    so threadpoolctl does it at run time); stays in force for the process."""
    threadpool_limits(limits=n)


class HostTimer:
    """Phase times from time.perf_counter: right for NumPy and CPU torch, whose calls return when done."""

    def start(self):
        self.t = [time.perf_counter()]

    def mark(self):
        self.t.append(time.perf_counter())

    def phases(self):
        return [b - a for a, b in zip(self.t, self.t[1:])]


class EventTimer:
    """Phase times from CUDA events recorded on the stream; phases() waits for the last event."""

    def __init__(self, new_event, elapsed_ms):
        self.new_event, self.elapsed_ms = new_event, elapsed_ms

    def start(self):
        self.events = []
        self.mark()

    def mark(self):
        e = self.new_event()
        e.record()
        self.events.append(e)

    def phases(self):
        self.events[-1].synchronize()
        return [self.elapsed_ms(a, b) / 1e3 for a, b in zip(self.events, self.events[1:])]


def cupy_timer(cp):
    return EventTimer(cp.cuda.Event, cp.cuda.get_elapsed_time)


def torch_cuda_timer(torch):
    return EventTimer(lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))


class MatmulPeak:
    """Float32 GFLOP/s of an n x n @ n x n product (2 n^3 FLOPs); `best` is the fastest of every run so far.
    The bench probes it before the timed runs and again after each round of runs, so a machine whose load
    changes during the bench still reports the best it could do in this run."""

    def __init__(self, matmul, make, timer, n):
        self.matmul, self.timer, self.n = matmul, timer, n
        self.a, self.b = make(n), make(n)
        matmul(self.a, self.b)  # warm-up (library and thread start-up)
        self.best, self.count = 0.0, 0

    def probe(self, repeats=1):
        for _ in range(repeats):
            self.timer.start()
            self.matmul(self.a, self.b)
            self.timer.mark()
            self.best = max(self.best, 2 * self.n**3 / self.timer.phases()[0] / 1e9)
            self.count += 1
        return self.best


# ----------------------------------------------------------------------------------------------
# the two sides: one training step each, phases (forward, backward incl. loss, optimizer) in seconds
# ----------------------------------------------------------------------------------------------
def is_video(spec):
    """A bench configuration with num_frames is the video model (--video), one without a DiT."""
    return "num_frames" in spec


def model_spec(spec):
    """The DiTSpec (or, for --video, the VideoDiTSpec: Latte's layout) of a bench configuration."""
    kw = dict(variant=spec["variant"], input_size=spec["input_size"], in_channels=spec["in_channels"],
              num_classes=spec["num_classes"])
    return VideoDiTSpec(num_frames=spec["num_frames"], **kw) if is_video(spec) else DiTSpec(**kw)


def make_batch(spec, seed=0):
    """x0, y, t, noise as host arrays (the same batch every step, for both sides); x0 and noise (N, C, S, S), or
    (N, C, F, S, S) clips for --video."""
    rng = np.random.default_rng(seed)
    N, C, S = spec["batch_size"], spec["in_channels"], spec["input_size"]
    shape = (N, C, spec["num_frames"], S, S) if is_video(spec) else (N, C, S, S)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, spec["num_classes"], size=N)
    t = rng.integers(0, 1000, size=N)
    noise = rng.standard_normal(shape, dtype=np.float32)
    return x0, y, t, noise


class MiniditSide:
    name = "minidit"

    def __init__(self, spec, backend, batch, threads=1):
        self.xp = xp = get_backend(backend)
        self.model = (VideoDiT if is_video(spec) else DiT)(model_spec(spec), seed=0, backend=backend)
        self.net, threads = data_parallel(self.model, threads)  # NumPy: one batch shard per thread, as minidit.train
        self.objective = Diffusion("")
        self.opt = AdamW(self.model.params, lr=1e-4, map=threaded_map(threads))
        self.ema = EMA(self.model.params, decay=0.9999, map=threaded_map(threads))
        self.x0, self.y, self.t, self.noise = (to_device(a, xp) for a in batch)
        self.rng = np.random.default_rng(1)  # label dropout
        self.timer = HostTimer() if xp is np else cupy_timer(xp)
        self.label = f"minidit {backend}"

    def step(self):
        net, params, tm = self.net, self.model.params, self.timer
        tm.start()
        x_t = self.objective.q_sample(self.x0, self.t, self.noise)
        out, cache = net.forward(x_t, self.t, self.y, train=True, rng=self.rng)
        tm.mark()
        _, _, dout = self.objective.training_loss(out, self.x0, self.t, self.noise)
        grads = net.backward(dout, cache, release=True)
        tm.mark()
        self.opt.step(params, grads)
        self.ema.update(params)
        tm.mark()
        return tm.phases()


class TorchSide:
    """The official model in PyTorch eager with minidit_model's weights: TorchDiT, or TorchLatte for a VideoDiT (which
    takes the clips as Latte does, (N, F, C, H, W), and whose loss splits its output on dim 2, as Latte's)."""
    name = "torch"

    def __init__(self, minidit_model, batch, device):
        import torch

        from .torch_reference import TorchDiffusion, build_torch_dit, build_torch_latte, update_ema
        self.torch, self.update_ema = torch, update_ema
        video = isinstance(minidit_model, VideoDiT)
        build = build_torch_latte if video else build_torch_dit
        self.model = build(minidit_model, torch.float32, device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)  # official train.py
        self.diffusion = TorchDiffusion(channel_dim=2 if video else 1)
        x0, y, t, noise = batch
        if video:  # minidit's (N, C, F, H, W) -> Latte's (N, F, C, H, W), once, outside the timed step
            x0, noise = (np.ascontiguousarray(a.swapaxes(1, 2)) for a in (x0, noise))
        self.x0, self.y, self.t, self.noise = (torch.from_numpy(a).to(device) for a in (x0, y, t, noise))
        self.timer = HostTimer() if device == "cpu" else torch_cuda_timer(torch)
        self.label = "torch eager" + ("" if device == "cpu" else " cuda")

    def step(self):
        tm = self.timer
        tm.start()
        x_t = self.diffusion.q_sample(self.x0, self.t, self.noise)
        out = self.model(x_t, self.t, self.y)
        tm.mark()
        loss = self.diffusion.losses_from_output(out, self.x0, x_t, self.t, self.noise)["loss"].mean()
        self.opt.zero_grad()  # official order: zero_grad, backward, step, update_ema
        loss.backward()
        tm.mark()
        self.opt.step()
        self.update_ema(self.ema, self.model)
        tm.mark()
        return tm.phases()


# MM-DiT (--mmdit): a small SD3-shaped model, one rectified-flow training step (AdamW, no EMA) on each side
MMDIT = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=3,
             joint_attention_dim=256, caption_projection_dim=192, pooled_projection_dim=256, out_channels=4,
             pos_embed_max_size=16)
MMDIT_CONTEXT = 16  # text tokens


def mmdit_batch(batch_size, seed=0):
    """x0, t, noise, context, pooled as float32 host arrays (t in (0, 1))."""
    rng = np.random.default_rng(seed)
    C, S = MMDIT["in_channels"], MMDIT["sample_size"]
    return (rng.standard_normal((batch_size, C, S, S), dtype=np.float32), rng.uniform(0.05, 0.95, batch_size),
            rng.standard_normal((batch_size, C, S, S), dtype=np.float32),
            rng.standard_normal((batch_size, MMDIT_CONTEXT, MMDIT["joint_attention_dim"]), dtype=np.float32),
            rng.standard_normal((batch_size, MMDIT["pooled_projection_dim"]), dtype=np.float32))


class MMDiTSide:
    name = "minidit"

    def __init__(self, batch, threads=1):
        from ..flow import RectifiedFlow
        from ..mmdit import MMDiT, MMDiTSpec

        self.model = MMDiT(MMDiTSpec(**MMDIT), seed=0)
        self.net, threads = data_parallel(self.model, threads)  # one batch shard per thread, as for the DiT
        self.objective = RectifiedFlow()
        self.opt = AdamW(self.model.params, lr=1e-4, map=threaded_map(threads))
        self.x0, self.t, self.noise, self.ctx, self.pooled = batch
        self.timer, self.label = HostTimer(), "minidit numpy (mm-dit)"

    def step(self):
        tm, f = self.timer, self.objective
        tm.start()
        x_t = f.q_sample(self.x0, self.t, self.noise)
        out, cache = self.net.forward(x_t, f.model_time(self.t).astype(np.float32), self.ctx, self.pooled)
        tm.mark()
        _, _, dout = f.training_loss(out, self.x0, self.t, self.noise)
        grads = self.net.backward(dout, cache, release=True)
        tm.mark()
        self.opt.step(self.model.params, grads)
        tm.mark()
        return tm.phases()


class SD3Side:
    name = "torch"

    def __init__(self, minidit_model, batch):
        import diffusers
        import torch

        from ..mmdit import to_diffusers_state_dict
        self.torch = torch
        self.model = diffusers.SD3Transformer2DModel(**MMDIT).float().train()
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                    to_diffusers_state_dict(minidit_model.params).items()}, strict=True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        x0, t, noise, ctx, pooled = (torch.from_numpy(np.asarray(a)) for a in batch)
        self.x0, self.noise, self.ctx, self.pooled = x0, noise, ctx, pooled
        self.t = t.float()
        self.timer, self.label = HostTimer(), "diffusers SD3Transformer2DModel eager"

    def step(self):
        tm, torch = self.timer, self.torch
        tm.start()
        s = self.t[:, None, None, None]
        x_t = (1 - s) * self.x0 + s * self.noise
        out = self.model(hidden_states=x_t, encoder_hidden_states=self.ctx, pooled_projections=self.pooled,
                         timestep=1000 * self.t, return_dict=False)[0]
        tm.mark()
        loss = torch.mean((out - (self.noise - self.x0)) ** 2)
        self.opt.zero_grad()
        loss.backward()
        tm.mark()
        self.opt.step()
        tm.mark()
        return tm.phases()


def bench_mmdit(args):
    """Step time of the MM-DiT preset against diffusers' SD3Transformer2DModel with the same weights, alternating."""
    N = args.batch_size or 8
    batch = mmdit_batch(N)
    mini = MMDiTSide(batch, args.threads)
    sides = [mini]
    print(f"== minidit.dev.bench --mmdit: {MMDIT['num_layers']} joint blocks, hidden "
          f"{MMDIT['num_attention_heads'] * MMDIT['attention_head_dim']}, {(MMDIT['sample_size'] // 2) ** 2} image + "
          f"{MMDIT_CONTEXT} text tokens, batch {N}, float32, {args.threads} threads; "
          f"{mini.model.num_params() / 1e6:.2f}M parameters ==")
    print(f"threads: minidit runs {args.threads} batch shards at once, one thread each with a single-threaded BLAS "
          "(minidit.threads); torch uses them inside each op")
    if args.compare_torch:
        import torch

        torch.set_num_threads(args.threads)
        sides.append(SD3Side(mini.model, batch))
    for s in sides:
        for _ in range(args.warmup):
            s.step()
    runs = {s.name: [] for s in sides}
    for _ in range(args.runs):
        for s in sides:  # alternating A B A B ...
            runs[s.name].append(_median_phases([s.step() for _ in range(args.steps)]))
    print(f"{'':40s} forward ms  backward ms  optimizer ms   step ms")
    for s in sides:
        f, b, o, total = np.median(np.array(runs[s.name]), axis=0)
        print(f"{s.label:40s} {1e3 * f:10.1f} {1e3 * b:12.1f} {1e3 * o:13.1f} {1e3 * total:9.1f}")
    if args.compare_torch:
        ratios = [a[3] / b[3] for a, b in zip(runs["minidit"], runs["torch"])]
        print(f"step-time ratio minidit / diffusers: median of {len(ratios)} per-pair ratios = "
              f"{statistics.median(ratios):.2f} (pairs: {' '.join(f'{r:.2f}' for r in ratios)})")
    if args.memory:
        growth = {name: rss_in_fresh_process(name, args.threads, ["--mmdit", "--batch-size", str(N)])
                  for name in ["minidit"] + (["torch"] if args.compare_torch else [])}
        print("memory, resident-set growth over the first 3 steps in a fresh process (VmHWM after minus RSS before; "
              "includes AdamW's m and v): " + "; ".join(f"{k} " + ("n/a" if v is None else f"{v / 2**20:.1f} MiB")
                                                         for k, v in growth.items()))


def mmdit_memory_child(side_name, batch_size, threads):
    batch = mmdit_batch(batch_size)
    side = MMDiTSide(batch, threads)
    if side_name == "torch":
        import torch
        torch.set_num_threads(threads)
        side = SD3Side(side.model, batch)
    print(json.dumps({"rss_growth": rss_growth_over_steps(side)}))


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


RSS_STEPS = 3  # steps of the resident-set measurement: the first creates AdamW's state, the later ones hold it


def rss_growth_over_steps(side, steps=RSS_STEPS):
    """Resident-set high-water growth over `steps` steps: reset VmHWM to the current RSS (Linux clear_refs 5), step,
    read VmHWM. Counts what a step needs on top of the parameters (AdamW's m and v from step 2 on: a later step
    holds them while its activations are alive). Bytes, or None where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    for _ in range(steps):
        side.step()
    return _proc_status_bytes("VmHWM") - rss0


def rss_growth_in_fresh_process(side_name, spec, threads):
    """Run rss_growth_over_steps for one DiT (or video) side in a new Python process, so neither side inherits the
    other's heap."""
    options = ["--video"] if is_video(spec) else []
    for key, value in spec.items():  # input_size -> --input-size 32, ...
        options += ["--" + key.replace("_", "-"), str(value)]
    return rss_in_fresh_process(side_name, threads, options)


def rss_in_fresh_process(side_name, threads, options):
    """`python -m minidit.dev.bench --memory-child SIDE ... OPTIONS` (the bench options that pick the model): the
    child's rss_growth_over_steps in bytes, or None if it could not be measured."""
    cmd = [sys.executable, "-m", "minidit.dev.bench", "--memory-child", side_name, "--threads", str(threads), *options]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["rss_growth"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError):
        return None


def memory_child(side_name, spec, threads):
    batch = make_batch(spec)
    side = MiniditSide(spec, "numpy", batch, threads)
    if side_name == "torch":
        import torch
        torch.set_num_threads(threads)
        side = TorchSide(side.model, batch, "cpu")
    print(json.dumps({"rss_growth": rss_growth_over_steps(side)}))


def traced_step_peak(side):
    """NumPy: peak bytes traced by tracemalloc during one step (NumPy registers its buffers with tracemalloc),
    counting only allocations made during the step, i.e. above what was held before it."""
    tracemalloc.start()
    try:
        side.step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def cupy_step_peak(side):
    """CuPy: empty the pool's cache, step, and read the bytes the pool holds beyond those in use before the step
    (the pool keeps every block it needed, so this is the step's peak demand, rounded up to the pool's blocks)."""
    pool = side.xp.get_default_memory_pool()
    side.xp.cuda.Device().synchronize()
    pool.free_all_blocks()
    used0 = pool.used_bytes()
    side.step()
    side.xp.cuda.Device().synchronize()
    return pool.total_bytes() - used0


def torch_cuda_step_peak(side):
    torch = side.torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    side.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - m0


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------
def _median_phases(steps):
    """[(fwd, bwd, opt), ...] -> medians of fwd, bwd, opt, and of the step total."""
    arr = np.array(steps)
    return list(np.median(arr, axis=0)) + [float(np.median(arr.sum(axis=1)))]


def bench_config(spec, args):
    """Measure one configuration (a DiT, or with num_frames the video model against TorchLatte); prints its block and
    returns the numbers as a dict (per image, or per clip for the video model)."""
    N = spec["batch_size"]
    batch = make_batch(spec)
    mini = MiniditSide(spec, args.backend, batch, args.threads)
    xp = mini.xp
    macs = mini.model.gmacs() * 1e9  # forward_macs(spec) for a DiT; per clip for the video model
    train_flops = 3 * 2 * macs  # per image (clip)
    unit = "clip" if is_video(spec) else "image"
    what = (f"VideoDiT {spec['variant']} (Latte's layout), {spec['num_frames']} frames of " if is_video(spec)
            else f"DiT {spec['variant']}, input ")
    print(f"== minidit.dev.bench: {what}{spec['input_size']}x{spec['input_size']}x"
          f"{spec['in_channels']}, {spec['num_classes']} classes, batch {N}, float32, backend {args.backend}"
          f"{'' if xp is np else ' (fused kernels ' + ('on' if args.fused else 'off') + ')'}, "
          f"threads {args.threads} ==")
    if xp is np:
        print(f"threads: minidit runs {args.threads} batch shards at once, one thread each with a single-threaded BLAS "
              f"(minidit.threads); torch and the matmul peak use {args.threads} threads inside each op")
    print(f"model: {mini.model.num_params() / 1e6:.2f}M parameters; forward {macs / 1e9:.4f} GMACs/{unit}")
    print(f"FLOP convention: training FLOPs/{unit} = 3 x 2 x forward MACs = {train_flops / 1e9:.4f} GFLOP "
          "(backward = 2 forwards, 2 FLOPs per multiply-add; matmuls only, elementwise ops not counted)")

    sides, peaks = [mini], {}
    n = args.peak_size
    if xp is np:
        peaks["numpy"] = MatmulPeak(np.matmul, lambda k: np.random.default_rng(0).random((k, k), np.float32),
                                    HostTimer(), n)
    else:
        n = max(n, 8192)  # a GPU needs a bigger product to reach its peak
        peaks["cupy"] = MatmulPeak(xp.matmul, lambda k: xp.random.random((k, k), dtype=xp.float32), cupy_timer(xp), n)
    tside = None
    if args.compare_torch:
        try:
            import torch
            device = "cpu" if xp is np else "cuda"
            if device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("this torch build has no CUDA")
            if device == "cpu":
                torch.set_num_threads(args.threads)
                print(f"torch threads: torch.set_num_threads({args.threads})")
            tside = TorchSide(mini.model, batch, device)
            sides.append(tside)
            t_timer = HostTimer() if device == "cpu" else torch_cuda_timer(torch)
            peaks["torch"] = MatmulPeak(torch.mm, lambda k: torch.rand(k, k, device=device), t_timer, n)
        except Exception as e:  # ImportError or a CUDA problem: say so in one line and go on without torch
            print(f"torch: unavailable ({type(e).__name__}: {e}); install it with pip install -e \".[torch]\"")
    for p in peaks.values():
        p.probe(repeats=3)

    for _ in range(args.warmup):
        for s in sides:
            s.step()
    runs = {s.name: [] for s in sides}  # name -> per run: [fwd, bwd, opt, step] medians
    for _ in range(args.runs):
        for s in sides:  # alternating A B A B ...
            runs[s.name].append(_median_phases([s.step() for _ in range(args.steps)]))
        for p in peaks.values():
            p.probe()
    peak = max(p.best for p in peaks.values())
    print(f"float32 matmul peak ({n}x{n} @ {n}x{n}, same threads, best of {peaks[next(iter(peaks))].count} runs spread "
          "over the bench): " + ", ".join(f"{k} {p.best:.1f} GFLOP/s" for k, p in peaks.items())
          + f"; 'of peak' below is of {peak:.1f}")

    print(f"timing: {args.runs} run{'s' if args.runs > 1 else ''} x {args.steps} step{'s' if args.steps > 1 else ''}"
          f" per side after {args.warmup} warm-up step{'s' if args.warmup != 1 else ''}"
          + (", alternating minidit / torch" if tside else "")
          + "; each number = median over runs of the run's median step")
    print(f"{'':16s} {'forward ms':>11s} {'backward ms':>12s} {'optimizer ms':>13s} {'step ms':>9s} "
          f"{unit + 's/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s}")
    result = dict(spec=spec, gmacs=macs / 1e9, train_gflop_per_image=train_flops / 1e9,
                  peaks={k: p.best for k, p in peaks.items()}, sides={})
    for s in sides:
        fwd, bwd, opt, step = (statistics.median(r[i] for r in runs[s.name]) for i in range(4))
        gflops = train_flops * N / step / 1e9
        print(f"{s.label:16s} {fwd * 1e3:11.1f} {bwd * 1e3:12.1f} {opt * 1e3:13.1f} {step * 1e3:9.1f} "
              f"{N / step:9.1f} {gflops:8.1f} {gflops / peak:8.1%}")
        result["sides"][s.name] = dict(forward_s=fwd, backward_s=bwd, optimizer_s=opt, step_s=step,
                                       images_per_s=N / step, gflops=gflops, fraction_of_peak=gflops / peak,
                                       run_step_s=[r[3] for r in runs[s.name]])
    if tside:
        ratios = [a[3] / b[3] for a, b in zip(runs["minidit"], runs["torch"])]
        result["ratio_minidit_over_torch"] = statistics.median(ratios)
        print(f"step-time ratio minidit / torch: median of {len(ratios)} per-pair ratios = "
              f"{statistics.median(ratios):.2f} (pairs: {' '.join(f'{r:.2f}' for r in ratios)})")

    if args.memory:
        result["memory"] = report_memory(mini, tside, spec, args)
    print()
    return result


def report_memory(mini, tside, spec, args):
    params = sum(int(p.nbytes) for p in mini.model.params.values())
    print(f"memory held between steps, both sides: params {params / MiB:.1f} MiB + AdamW m, v {2 * params / MiB:.1f}"
          f" MiB + EMA copy {params / MiB:.1f} MiB")
    mem = {"params_bytes": params}
    if mini.xp is np:
        mem["minidit_tracemalloc"] = traced_step_peak(mini)
        print(f"memory, minidit step peak (tracemalloc): {mem['minidit_tracemalloc'] / MiB:.1f} MiB = NumPy buffers "
              "live at once during one step after warm-up, beyond those held before it")
        names = ["minidit"] + (["torch"] if tside else [])
        for name in names:
            mem[f"{name}_rss_growth"] = rss_growth_in_fresh_process(name, spec, args.threads)
        print(f"memory, resident-set growth over the first {RSS_STEPS} steps in a fresh process (VmHWM after minus RSS "
              "before; includes AdamW's m and v, which the later steps hold next to their activations): "
              + "; ".join(f"{name} " + (f"{mem[f'{name}_rss_growth'] / MiB:.1f} MiB"
                                        if mem[f"{name}_rss_growth"] is not None else "n/a") for name in names))
    else:
        mem["minidit_pool"] = cupy_step_peak(mini)
        line = (f"memory, step peak on the GPU: minidit {mem['minidit_pool'] / MiB:.1f} MiB (CuPy pool bytes needed "
                "by one step started from an empty cache, beyond those in use before it)")
        if tside:
            mem["torch_cuda"] = torch_cuda_step_peak(tside)
            line += (f"; torch {mem['torch_cuda'] / MiB:.1f} MiB (torch.cuda.max_memory_allocated during one step "
                     "minus allocated before it)")
        print(line)
    return mem


# ----------------------------------------------------------------------------------------------
# sampling memory: the official sampling setting (XL/2, 256 px, batch 8, guidance) and the VAE decode
# ----------------------------------------------------------------------------------------------
def bench_sampling(spec, args):
    """Guided DDPM steps of `spec`'s model with random (non-zero) weights at its batch size (2x through the model),
    then, with --vae-decode, the decode of the latents by a VAE of the Stable Diffusion shapes (random weights).
    Prints seconds per step and the process's peak resident memory (ru_maxrss) after each phase."""
    import resource

    from ..sample import generate
    from ..vae import VAE, random_weights

    def peak_gib():  # ru_maxrss is in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    t0 = time.perf_counter()
    model = DiT(model_spec(spec), backend=args.backend)
    rng = np.random.default_rng(0)
    for k, v in model.params.items():  # the zero-initialised ones too, so the output is not trivially 0
        if not v.any():
            v[...] = to_device(0.02 * rng.standard_normal(v.shape, dtype=np.float32), model.xp)
    print(f"== sampling: DiT {spec['variant']} ({model.num_params() / 1e6:.0f}M parameters), input "
          f"{spec['input_size']}x{spec['input_size']}x{spec['in_channels']}, batch {spec['batch_size']} with guidance "
          f"(x2 through the model), backend {args.backend}, threads {args.threads}")
    print(f"model built in {time.perf_counter() - t0:.0f} s; peak resident memory {peak_gib():.2f} GiB")
    labels = rng.integers(0, spec["num_classes"], spec["batch_size"])
    t0 = time.perf_counter()
    z = generate(model, labels, cfg_scale=4.0, num_sampling_steps=args.sample_steps, progress=False,
                 threads=args.threads)
    per_step = (time.perf_counter() - t0) / args.sample_steps
    print(f"{args.sample_steps} guided DDPM steps: {per_step:.1f} s per step (250 steps: about "
          f"{250 * per_step / 60:.0f} min); peak resident memory {peak_gib():.2f} GiB")
    if args.vae_decode:
        del model
        vae = VAE(random_weights(latent=spec["in_channels"]), backend=args.backend)
        t0 = time.perf_counter()
        images = vae.decode(to_device(z, vae.xp))
        print(f"VAE decode of {len(z)} latents -> {tuple(images.shape[1:])}: {time.perf_counter() - t0:.0f} s; "
              f"peak resident memory {peak_gib():.2f} GiB")


def bench_dynamic(args):
    """--sampling --dynamic RUN: guided DDPM sampling (--sample-steps steps, --batch-size images) with the Dynamic
    DiT's sliced sub-networks, against the very same weights run dense as a DiT (the routers ignored), in
    alternating runs. Prints seconds per step of each, the speed-up, and the MACs per network call of both."""
    from ..sample import generate

    dynamic, objective, meta = load(args.dynamic, backend=args.backend)
    dense = DiT(dynamic.spec.dense(), backend=args.backend)
    dense.load_state_dict({k: v for k, v in dynamic.params.items() if k in dense.params})
    batch, steps = args.batch_size or 100, args.sample_steps
    labels = np.random.default_rng(0).integers(0, dense.spec.num_classes, batch)
    print(f"== sampling: Dynamic DiT {args.dynamic} ({dynamic.dynamic}, step {meta.get('step')}) vs its weights dense; "
          f"{steps} guided DDPM steps of {batch} images (x2 through the model), backend {args.backend}, threads "
          f"{args.threads}, {args.runs} runs each, alternating")

    def seconds_per_step(model):
        start = time.perf_counter()
        generate(model, labels, objective=objective, cfg_scale=4.0, num_sampling_steps=steps, progress=False,
                 threads=args.threads, clip_denoised=True)
        return (time.perf_counter() - start) / steps

    views = {"dense": dense, "dynamic": dynamic}
    times = {name: [] for name in views}
    for name, model in views.items():  # warm-up: and the dynamic model cuts its sub-networks once here
        seconds_per_step(model)
    for _ in range(args.runs):
        for name, model in views.items():
            times[name].append(seconds_per_step(model))
    med = {name: statistics.median(v) for name, v in times.items()}
    speedup = statistics.median(d / s for d, s in zip(times["dense"], times["dynamic"]))  # per pair: drift cancels
    macs = np.mean([dynamic.macs_at(t) for t in dynamic.timesteps_routed()]) / (dense.gmacs() * 1e9)
    print(f"dense   {1e3 * med['dense']:.1f} ms per step, MACs per call 1.000")
    print(f"dynamic {1e3 * med['dynamic']:.1f} ms per step, MACs per call {macs:.3f} (mean over the visited timesteps)")
    print(f"speed-up {speedup:.2f}x (median of {args.runs} per-pair ratios)")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.dev.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                    help="numpy (CPU) or cupy (CUDA); the strict test backend has nothing to time")
    ap.add_argument("--preset", choices=[*PRESETS, "all"], default=None,
                    help="small: mini/4 on 32x32x3, 10 classes, batch 32; s4: S/4 on 32x32x4, batch 16; "
                         "s2: S/2 at batch 8; all: the three. Options given explicitly override a preset's.")
    ap.add_argument("--variant", default=None, help=f"DiT variant (default {DEFAULTS['variant']})")
    ap.add_argument("--input-size", "--image-size", dest="input_size", type=positive_int, default=None,
                    help=f"model input side (latent or pixel), default {DEFAULTS['input_size']}")
    ap.add_argument("--in-channels", type=positive_int, default=None, help=f"default {DEFAULTS['in_channels']}")
    ap.add_argument("--num-classes", type=positive_int, default=None, help=f"default {DEFAULTS['num_classes']}")
    ap.add_argument("--batch-size", type=positive_int, default=None, help=f"default {DEFAULTS['batch_size']}")
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps per side before the runs")
    ap.add_argument("--runs", type=positive_int, default=5, help="runs per side (pairs with --compare-torch)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="CPU threads of both sides: minidit (numpy) runs that many batch shards at once, one thread "
                         "each with a single-threaded BLAS; torch uses them inside each op (BLAS / OpenMP)")
    ap.add_argument("--compare-torch", action="store_true", help="also time the same step in PyTorch eager")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    ap.add_argument("--peak-size", type=positive_int, default=2048, help="n of the n x n matmul that measures the peak")
    ap.add_argument("--memory-child", choices=["minidit", "torch"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="on cupy: use the fused CUDA kernels of minidit.cuda_kernels (--no-fused: the array code)")
    ap.add_argument("--sampling", action="store_true",
                    help="measure guided sampling instead of training: time per step and peak resident memory "
                         "(e.g. --variant XL/2 --batch-size 8 --sampling --vae-decode: the official 256 px setting)")
    ap.add_argument("--sample-steps", type=sampling_steps, default=None,
                    help="with --sampling: DDPM steps to run (>= 2; default 2, with --dynamic 50)")
    ap.add_argument("--dynamic", default=None, metavar="RUN",
                    help="with --sampling: time a Dynamic DiT checkpoint's sliced sampling against its weights dense "
                         "(--batch-size default 100)")
    ap.add_argument("--vae-decode", action="store_true", help="with --sampling: also decode with an SD-shaped VAE")
    ap.add_argument("--video", action="store_true",
                    help="time the video DiT in Latte's layout (default S/2, 8 frames of 16x16x4, 101 classes, batch 2)"
                         "; with --compare-torch against TorchLatte (the official Latte in PyTorch eager) with the "
                         "same weights. --variant, --input-size, --in-channels, --num-classes, --batch-size and "
                         "--num-frames override it")
    ap.add_argument("--num-frames", type=positive_int, default=None,
                    help=f"with --video: frames per clip (default {VIDEO['num_frames']})")
    ap.add_argument("--mmdit", action="store_true",
                    help="time SD3's MM-DiT (a small preset, rectified flow) instead; with --compare-torch against "
                         "diffusers' SD3Transformer2DModel with the same weights")
    args = ap.parse_args(argv)
    if args.sample_steps is None:
        args.sample_steps = 50 if args.dynamic else 2
    return args


def specs_from_args(args):
    if args.video:
        if args.preset or args.sampling or args.mmdit or args.dynamic:
            raise ValueError("--video has its own configuration and times training: drop --preset, --sampling, "
                             "--dynamic and --mmdit (give --variant, --num-frames, --input-size, ... to change it)")
        spec = dict(VIDEO)
        spec.update({k: getattr(args, k) for k in VIDEO if getattr(args, k) is not None})
        model_spec(spec)  # a clear error for an unknown variant or a clip that does not cut into patches
        return [spec]
    if args.num_frames is not None:
        raise ValueError("--num-frames is for the video model: add --video")
    names = list(PRESETS) if args.preset == "all" else [args.preset] if args.preset else [None]
    specs = []
    for name in names:
        spec = dict(PRESETS[name] if name else DEFAULTS)
        spec.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
        get_config(spec["variant"])  # a clear error for an unknown variant
        specs.append(spec)
    return specs


def main(argv=None):
    """Run the benchmark; returns the exit status (0, or 2 when the backend is unavailable)."""
    args = parse_args(argv)
    limit_threads(args.threads)
    set_fused_kernels(args.fused)
    if args.memory_child:
        if args.mmdit:
            mmdit_memory_child(args.memory_child, args.batch_size or 8, args.threads)
        else:
            memory_child(args.memory_child, specs_from_args(args)[0], args.threads)
        return 0
    try:
        get_backend(args.backend)
    except RuntimeError as e:
        print(f"minidit.dev.bench: backend {args.backend} unavailable: {e}")
        return 2
    specs = run(specs_from_args, args)  # an unknown variant, a bad size or option: one line, not a traceback
    if args.mmdit:
        run(bench_mmdit, args)
        return 0
    if args.dynamic:
        if not args.sampling:
            sys.exit("error: --dynamic times sampling: add --sampling")
        run(bench_dynamic, args)
        return 0
    for spec in specs:
        if args.sampling:
            run(bench_sampling, spec, args)
        else:
            run(bench_config, spec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
