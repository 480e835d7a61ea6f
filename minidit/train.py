"""Train a DiT: `python -m minidit.train` (a small model on the built-in digits, on the CPU, in minutes) or
`python -m minidit.train --backend cupy --variant S/2 --data latents.npz` (the official recipe on a GPU).

One training step (facebookresearch/DiT train.py, hand-written here):

    x0, y  = batch                  t ~ U{0..999}      eps ~ N(0, I)
    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                      (q_sample)
    out    = DiT(x_t, t, y)         labels dropped to the null class with p = 0.1
    loss   = MSE(eps, out[:, :C]) + VLB(out[:, C:] with the mean frozen)  (diffusion.training_loss)
    grads  = DiT.backward(dloss/dout)
    AdamW step, then the EMA update

With --objective flow the same loop trains the same model on rectified flow (minidit.flow): t ~ logit-normal in
(0, 1), x_t = (1 - t) x0 + t eps, the model sees 1000 t and predicts v = eps - x0, loss = MSE(v, out).

With --finetune PARENT --dynamic width (or depth) a trained DiT becomes a Dynamic DiT (minidit.dynamic): routers on
the timestep switch heads and MLP channel groups (or whole blocks), trained with the loss above plus DyDiT's FLOPs
target 2 (mean FLOPs ratio - lambda)^2, lambda going from 1 to --target-ratio over --target-warmup steps.

With --model mmdit --data digits-captions the model is SD3's MM-DiT reading the digits' captions through a tiny
learned text encoder (minidit.captions.CaptionMMDiT), y being token ids and label dropout caption dropout.

Everything random in step k is drawn from generators seeded by (seed, k), and the batch of step k is a
pure function of (seed, k): so a resumed run reproduces the uninterrupted run's losses exactly.

`mpiexec -n N python -m minidit.train ...` trains on N data-parallel ranks (minidit.distributed): every rank draws
the same global batch of --batch-size and runs its own shard of it, the gradients are summed over the ranks, and the
result is one process's with that batch, up to the order of float additions. Rank 0 alone writes into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks for the run folder
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

from .backend import BACKENDS, get_backend, is_out_of_memory, memory_report
from . import models
from .checkpoint import CKPT_NAME, checkpoint_file, load_model, read, read_training, save_training
from .cli import (nonnegative_float, nonnegative_int, positive_float, positive_int, probability, run as run_command,
                  sampling_steps, unit_interval)
from .data import BUILT_IN, KINDS as DATA_KINDS, load_dataset, sample_file, save_samples
from .diffusion import Diffusion
from .distributed import MODES as DISTRIBUTED_MODES, World, abort_on_error, init as init_distributed
from .flow import TIME_SAMPLING, RectifiedFlow
from .model import get_config
from .optim import EMA, AdamW
from .sample import generate
from .threads import data_parallel, threaded_map
from .xp import to_device, to_numpy


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m minidit.train", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", choices=BACKENDS, default="numpy",
                    help="numpy (CPU), cupy (CUDA), or strict (a CPU emulation of a device, for testing: it refuses "
                         "NumPy arrays in device math as CuPy does, and counts host syncs)")
    ap.add_argument("--variant", default="mini/8",
                    help="S/2 ... XL/8 (official), or mini/2, mini/4, mini/8 (small, for CPUs; the default mini/8 sees a "
                         "16 px digit as 4 tokens of 8 x 8 pixels)")
    ap.add_argument("--model", choices=models.CLI_NAMES, default="dit",
                    help="dit: DiT, class labels; video: the video DiT (--data digits-clips); mmdit: SD3's MM-DiT "
                         "reading text prompts through minidit's tiny text encoder (--data digits-captions), sized "
                         "from --variant (depth, heads of hidden/heads, patch)")
    ap.add_argument("--frames", type=positive_int, nargs="+", default=None,
                    help="--data digits-clips: the frame counts to train on, one per batch (bucketing; default: the "
                         "clips' 16)")
    ap.add_argument("--data", default="digits",
                    help="'digits' (built in, generated on first use), 'digits-captions' (the same with captions "
                         "read off the renderer, for --model mmdit), a folder with one sub-folder per class, "
                         "or an .npz of precomputed latents (arrays 'latents', 'labels')")
    ap.add_argument("--image-size", type=positive_int, nargs="+", default=None,
                    help="image side in pixels (default: 16 for the built-in digits, the CPU demo; 32 for a folder; "
                         "latents keep their own); --data digits-clips takes several, one per batch (bucketing)")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1,
                    help="channels of the built-in digits (grayscale: 1; 3 repeats it as RGB); other data keep theirs")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="images per step (the paper: 256)")
    ap.add_argument("--steps", type=positive_int, default=7000, help="training steps (ignored if --epochs is given)")
    ap.add_argument("--epochs", type=positive_int, default=None,
                    help="train for this many passes over the data instead")
    ap.add_argument("--lr", type=positive_float, default=None,
                    help="AdamW learning rate, constant (default: the paper's 1e-4 for the official variants, "
                         "1e-3 for the mini variants, whose short CPU runs need it)")
    ap.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    ap.add_argument("--ema-decay", type=unit_interval, default=0.9999, help="EMA decay (paper: 0.9999)")
    ap.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="use decay min(ema_decay, (1+n)/(10+n)) at update n, so a short run's EMA is usable")
    ap.add_argument("--class-dropout-prob", type=probability, default=0.1, help="label dropout for guidance")
    ap.add_argument("--objective", choices=OBJECTIVES, default="ddpm",
                    help="ddpm: DiT's Gaussian diffusion (MSE + VLB); flow: rectified flow, SD3's objective (velocity "
                         "MSE, Euler/Heun sampling), on the same model (SiT's experiment)")
    ap.add_argument("--time-sampling", choices=TIME_SAMPLING, default="logit-normal",
                    help="flow: how training times are drawn (logit-normal m = 0, s = 1 as SD3, or uniform)")
    ap.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                    help="learn the variance (output 2C channels, loss MSE + VLB); default: on for ddpm, off (and not "
                         "possible) for flow")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="numpy backend: CPU threads, each running one shard of the batch (minidit.threads); default: "
                         "every core (under mpiexec: per rank, the cores of this machine shared out among its ranks). "
                         "Results are reproducible for a given count (it changes float summation order)")
    ap.add_argument("--distributed", choices=DISTRIBUTED_MODES, default="auto",
                    help="data-parallel ranks over MPI (docs/distributed.md; needs pip install -e \".[mpi]\"): "
                         "auto when started by mpiexec (or mpirun), mpi always, off: one process even under mpiexec")
    ap.add_argument("--out", default="runs/default", help="run directory: checkpoint, log, metrics, samples")
    ap.add_argument("--log-every", type=positive_int, default=100)
    ap.add_argument("--ckpt-every", type=positive_int, default=500)
    ap.add_argument("--sample-every", type=nonnegative_int, default=0,
                    help="write an EMA sample grid every N steps (0: at the end only)")
    ap.add_argument("--final-samples", action=argparse.BooleanOptionalAction, default=True,
                    help="write the EMA sample grid samples.png at the end")
    ap.add_argument("--sample-steps", type=sampling_steps, default=50,
                    help="sampling steps (DDPM, or Euler for flow) of the grids written while training")
    ap.add_argument("--cfg-scale", type=nonnegative_float, default=4.0,
                    help="guidance scale of the grids written while training")
    ap.add_argument("--resume", default=None,
                    help="a checkpoint (or run directory) to continue from; the other options are taken from it")
    ap.add_argument("--finetune", default=None, metavar="PARENT",
                    help="start from a trained run's EMA weights (a checkpoint or run directory) with a fresh optimizer; "
                         "the model and data options are taken from it")
    models.add_options(ap)  # each kind's own: --block, --dynamic, --temporal-patch, --text-dim, ...
    return ap


def parse_args(argv=None):
    """(args, explicit): the options, and the names of those the user gave."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.image_size is not None and len(args.image_size) == 1:
        args.image_size = args.image_size[0]  # one size is stored as a number, several as a list (the buckets)
    for action in ap._actions:  # parse again without defaults: which options did the user give?
        action.default = argparse.SUPPRESS
    explicit = set(vars(ap.parse_args(argv)))
    return args, explicit


def changed_options(args, explicit):
    """The options the user gave with another value than their default."""
    ap = build_parser()
    return {a for a in explicit if getattr(args, a) != ap.get_default(a)}


# options that may change when a run is resumed; every other option is taken from the checkpoint
RESUME_OVERRIDES = ("steps", "epochs", "out", "log_every", "ckpt_every", "sample_every", "sample_steps", "cfg_scale",
                    "backend", "final_samples", "threads", "distributed")


# what a fine-tune takes from its parent: the model, its data and its objective
PARENT_OPTIONS = ("variant", "model", "text_dim", "data", "image_size", "channels", "block", "class_dropout_prob",
                  "objective", "time_sampling", "learn_sigma", "seed")

OBJECTIVES = ("ddpm", "flow")


def make_objective(args, model_class):
    """The objective the options describe (and resolve learn_sigma, which depends on it, once: it is saved)."""
    if args.learn_sigma is None:
        args.learn_sigma = args.objective == "ddpm" and model_class.LEARNS_SIGMA
    if args.learn_sigma and not model_class.LEARNS_SIGMA:
        raise ValueError(f"--learn-sigma: a {model_class.__name__} predicts the noise or the velocity alone")
    if args.objective == "flow":
        if args.learn_sigma:
            raise ValueError("--learn-sigma is for --objective ddpm: rectified flow predicts the velocity alone")
        return RectifiedFlow(time_sampling=args.time_sampling, num_steps=args.sample_steps)
    return Diffusion("", learn_sigma=args.learn_sigma)


def model_spec(model_class, args, data):
    """The spec of the model the options describe (its kind's spec_from_options), checked against the data."""
    if data.kind not in model_class.DATA:
        fits = [c for c in models.MODELS if data.kind in c.DATA and c.CLI_NAME]
        raise ValueError(f"--model {args.model} trains a {model_class.__name__} on "
                         f"{' or '.join(DATA_KINDS[k] for k in model_class.DATA)}, not on {DATA_KINDS[data.kind]}"
                         + (f": train it with --model {fits[0].CLI_NAME}" if fits else ""))
    return model_class.spec_from_options(args, data)


class Run:
    """Everything a training run owns: data, model, objective, optimizer, EMA, and the world of ranks it trains in
    (minidit.distributed; one process by default); `save` / `load` are the checkpoint round trip
    (minidit.checkpoint)."""

    def __init__(self, args, world=None, changed=frozenset()):
        self.args = args
        self.world = world or World()
        self.xp = get_backend(args.backend)
        get_config(args.variant)  # fail early on an unknown variant
        model_class = models.choose(args, changed)
        if args.image_size is None:  # resolved once and saved, like the learning rate below
            args.image_size = 16 if args.data in BUILT_IN else 32
        self.data = load_dataset(args.data, image_size=args.image_size, seed=args.seed, channels=args.channels,
                                 frames=args.frames)
        self.objective = make_objective(args, model_class)
        self.model = model_class(model_spec(model_class, args, self.data), seed=args.seed, backend=args.backend)
        if args.finetune and not args.resume:  # the parent's EMA weights (a resumed fine-tune has its own)
            self.model.load_parent(load_model(args.finetune).params)
        if args.lr is None:  # resolved once and saved, so a resumed run keeps it
            args.lr = 1e-3 if str(args.variant).startswith("mini/") else 1e-4
        # NumPy: this rank's shard in shards, one thread each (minidit.threads); the optimizer uses the same threads
        self.net, self.threads = data_parallel(self.model, args.threads or self.world.cores())
        self.opt = AdamW(self.model.params, lr=args.lr, weight_decay=args.weight_decay, map=threaded_map(self.threads))
        self.ema = EMA(self.model.params, decay=args.ema_decay, warmup=args.ema_warmup, map=threaded_map(self.threads))
        self.step = 0
        self.logged = []  # the model's extra_loss figures of each step since the last log line
        if args.epochs is not None:
            self.total_steps = args.epochs * self.data.steps_per_epoch(args.batch_size)
        else:
            self.total_steps = args.steps
            self.data.steps_per_epoch(args.batch_size)  # fails early if the batch is larger than the data
        self.shard = self.world.shard(args.batch_size)  # this rank's samples of every batch (one process: all)

    def train_step(self, step):
        """One step; returns the mean loss of the (global) batch as a 0-d array on the backend (not synchronised).

        Every rank draws the whole batch and runs its shard s of it (minidit.distributed): the shard's mean loss and
        its gradient, scaled by its share |s| / B, summed over the ranks, are the batch's (one process: share 1)."""
        xp, B = self.xp, self.args.batch_size
        x0, y = self.data.batch(step, B, self.args.seed)
        rng = np.random.default_rng([self.args.seed, step, 3])  # t, noise and label dropout of this step
        t = self.objective.sample_t(B, rng)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        drop = self.model.condition_dropout(B, rng)  # (B,) or None, drawn for the whole batch
        s = self.shard
        x0, y, noise = (to_device(a[s], xp) for a in (x0, y, noise))
        t_all = to_device(t, xp)  # the batch's timesteps: the model's extra loss below reads them all
        t = t_all[s]
        x_t = self.objective.q_sample(x0, t, noise)
        out, cache = self.net.forward(x_t, self.objective.model_time(t), y, train=True,
                                      force_drop_ids=None if drop is None else drop[s], rng=rng)
        loss, _, dout = self.objective.training_loss(out, x0, t, noise)
        share = (s.stop - s.start) / B
        grads = self.net.backward(dout * share, cache, release=True)  # release: activations freed as grads fill
        grads = self.world.sum({**grads, "loss": loss * share})  # the batch's gradients and loss, on every rank
        loss = grads.pop("loss")
        extra = self.model.extra_loss(self.objective.model_time(t_all), step, self.args)
        if extra is not None:  # e.g. Dynamic DiT's FLOPs target: a function of the batch's timesteps alone
            extra_grads, figures = extra
            for name, g in extra_grads.items():
                grads[name] += g
            self.logged.append(figures)
        self.opt.step(self.model.params, grads)
        self.ema.update(self.model.params)
        return loss

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path):
        """Write the checkpoint (rank 0 alone: every rank holds the same state)."""
        if not self.world.is_root:
            return
        save_training(path, model=self.model, objective=self.objective, opt=self.opt, ema=self.ema, step=self.step,
                      args=vars(self.args), class_names=self.data.class_names)

    def load(self, path):
        states, meta = read_training(path)
        self.model.load_state_dict(states["model"])
        dev = lambda d: {k: to_device(v, self.xp) if hasattr(v, "shape") else v for k, v in d.items()}  # noqa: E731
        self.ema.load_state_dict(dev(states["ema"]))
        self.opt.load_state_dict(dev(states["opt"]))
        self.step = meta["step"]


def resolve_resume(args, explicit):
    """--resume PATH: the run's options come from its checkpoint; only RESUME_OVERRIDES may be changed."""
    path = checkpoint_file(args.resume)
    _, meta = read_training(path)
    saved = dict(meta["args"])  # an older run's: checkpoint.upgrade filled in the options added since
    clash = [a for a in explicit - set(RESUME_OVERRIDES) - {"resume"} if getattr(args, a) != saved.get(a)]
    if clash:
        raise ValueError(f"--resume continues the run as it was configured; these options differ from the "
                         f"checkpoint: {', '.join('--' + a.replace('_', '-') for a in sorted(clash))} "
                         f"(only {', '.join('--' + a.replace('_', '-') for a in RESUME_OVERRIDES)} may change)")
    saved.update({a: getattr(args, a) for a in explicit & set(RESUME_OVERRIDES)})
    saved["resume"] = path
    if "out" not in explicit:
        saved["out"] = os.path.dirname(os.path.abspath(path))
    return argparse.Namespace(**saved), path


def resolve_finetune(args, explicit):
    """--finetune PARENT: the model, data and objective options come from the parent's checkpoint (a converted
    checkpoint has no data options: those stay as given)."""
    path = checkpoint_file(args.finetune)
    _, meta = read(path)
    # a training run's options; converted weights have none: their spec's fields that are options (the variant,
    # dropout, learn_sigma) stand in for them
    saved = dict(meta.get("args") or {k: v for k, v in meta["model"].items() if k in PARENT_OPTIONS})
    saved.setdefault("objective", meta["objective"]["kind"])
    for name in PARENT_OPTIONS:
        if name not in saved:
            continue
        if name in explicit and getattr(args, name) != saved[name]:
            raise ValueError(f"--finetune takes --{name.replace('_', '-')} from the parent ({saved[name]!r}); leave the "
                             f"option out")
        setattr(args, name, saved[name])
    args.finetune = path
    return args


LOCK_NAME = ".lock"  # held by the training that writes into a run folder; the OS releases it when the process ends


def claim_run_folder(out, resume_path=None):
    """Make the run folder `out`, lock it for the life of this process, and refuse to start over another run.

    The lock is an OS file lock (fcntl.flock) on out/.lock: a second training into the same folder fails at once,
    naming the holder's process, and the lock goes away with the process however it ends (SIGKILL included).
    A folder holding a checkpoint is only ever continued (--resume of that checkpoint), never overwritten.
    Returns the open lock file: keep it open as long as the run lasts."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out!r} is a file; give a folder for the run")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"--out {out!r} is not writable; choose another folder for the run")
    lock = open(os.path.join(out, LOCK_NAME), "a+")
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise RuntimeError(f"another training (process {holder}) is writing into {out}; wait for it to end or stop "
                               f"it, or train into another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    ckpt = os.path.join(out, CKPT_NAME)
    if os.path.exists(ckpt) and (resume_path is None or not os.path.samefile(ckpt, resume_path)):
        lock.close()
        raise FileExistsError(f"{out} already holds a run ({ckpt}); continue it with --resume {out} (and a larger "
                              f"--steps), or start a new run with another --out")
    return lock


def keep_metrics_up_to(path, step):
    """Drop the lines of metrics.jsonl after `step`: a resumed run rewrites what came after its checkpoint."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def write_grid(run, stem, progress=False):
    """An EMA sample grid, one row per class (the model's default conditions: a caption model's "a 0" ... "a 9"),
    written to stem.png (clips: stem.gif) by rank 0; returns that path."""
    if not run.world.is_root:
        return None
    model = run.model.using(run.ema.params)  # the EMA weights
    per_class = max(1, min(10, 100 // run.data.num_classes))
    y, _ = model.conditions(per_class=per_class)
    images = generate(model, y, objective=run.objective, cfg_scale=run.args.cfg_scale,
                      num_sampling_steps=run.args.sample_steps, seed=run.args.seed,
                      clip_denoised=run.data.kind != "latents", progress=progress, threads=run.threads)
    path = sample_file(stem, images.ndim)
    save_samples(images, path, nrow=per_class)
    return path


def train(args, explicit=frozenset()):
    """Run (or continue) training as `args` says; `explicit` = the option names the user gave. Under mpiexec every
    rank runs it (minidit.distributed), and rank 0 alone claims the run folder and writes into it."""
    changed = changed_options(args, explicit)
    resume_path = None
    if args.resume:
        args, resume_path = resolve_resume(args, set(explicit))
    elif args.finetune:
        args = resolve_finetune(args, set(explicit))
    world = init_distributed(args.distributed, args.backend)
    # rank 0 claims the run folder and holds its lock until this function returns, however it ends
    lock = claim_run_folder(args.out, resume_path) if world.is_root else None
    try:
        run = Run(args, world, changed)
        if resume_path:
            run.load(resume_path)
            if run.step >= run.total_steps:
                raise ValueError(f"the checkpoint is at step {run.step} already; give --steps larger than "
                                 f"{run.step} to train on")
        ckpt_path = os.path.join(args.out, CKPT_NAME)
        mode = "a" if resume_path else "w"  # a new run starts new logs; a resumed one continues them
        if resume_path and world.is_root:
            keep_metrics_up_to(os.path.join(args.out, "metrics.jsonl"), run.step)
        # the other ranks run the same loop, their log and metrics going to os.devnull
        log_path, metrics_path = ((os.path.join(args.out, name) if world.is_root else os.devnull)
                                  for name in ("log.txt", "metrics.jsonl"))
        with open(log_path, mode) as log_file, open(metrics_path, mode) as metrics:
            return _loop(run, args, resume_path, ckpt_path, log_file, metrics)
    finally:
        if lock is not None:
            lock.close()


def _loop(run, args, resume_path, ckpt_path, log_file, metrics):
    """The training loop of `train`: log, steps, checkpoints, interrupts, the final grid."""
    world = run.world

    def log(msg):
        if world.is_root:
            tqdm.write(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    m = run.model
    parallel = [f"{world.size} ranks"] if world.size > 1 else []
    if run.xp is np:
        parallel.append(f"{run.threads} thread{'s' if run.threads > 1 else ''}" + (" each" if parallel else ""))
    log(f"{m.describe()}: {m.num_params():,} parameters "
        f"({m.num_params(trainable_only=True):,} trainable), {m.gmacs():.3f} GMACs/image; data {run.data}; "
        f"backend {args.backend}" + (f" ({', '.join(parallel)})" if parallel else ""))
    if resume_path:
        log(f"resumed from {resume_path} at step {run.step}")

    stop = {"requested": False}

    def on_sigint(signum, frame):  # finish the current step, then checkpoint and exit (every rank: see the loop)
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if world.is_root:
            tqdm.write("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    xp = run.xp
    window_losses, window_start, t_window = [], run.step, time.perf_counter()

    def read_window():
        """The current window's losses on the host (the one device sync per window); a NaN/Inf stops the run."""
        losses = to_numpy(xp.stack(window_losses)).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise FloatingPointError(
                f"loss became {losses[bad[0]]} at step {window_start + int(bad[0])}; stopping. The last good "
                f"checkpoint is {ckpt_path} (if one was written before that step); try a lower --lr")
        return losses

    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not world.is_root)
    saved_step = run.step if resume_path else None  # the step the checkpoint on disk holds
    try:
        # the decision to stop is collective (Ctrl-C may reach some ranks only, or at another moment): every rank
        # stops before the same step, and rank 0 writes its checkpoint
        while run.step < run.total_steps and not world.any(stop["requested"]):
            window_losses.append(run.train_step(run.step))
            run.step += 1
            bar.update(1)
            end = run.step == run.total_steps or stop["requested"]
            if run.step % args.log_every == 0 or end:
                losses = read_window()
                dt = time.perf_counter() - t_window
                mean, rate = float(losses.mean()), len(losses) / dt
                extra = {name: float(np.mean([to_numpy(f[name]) for f in run.logged])) for name in
                         (run.logged[0] if run.logged else ())}  # the window's mean of each extra_loss figure
                run.logged = []
                log(f"(step={run.step:07d}) Train Loss: {mean:.4f}, Train Steps/Sec: {rate:.2f}"
                    + "".join(f", {name}: {value:.3f}" for name, value in extra.items())
                    + (f"; {mem}" if (mem := memory_report(xp)) else ""))
                metrics.write(json.dumps({"step": run.step, "loss": mean, "steps_per_sec": rate, **extra,
                                          "losses": losses.tolist(), "time": time.time()}) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{mean:.4f}", steps_s=f"{rate:.2f}")
                window_losses, window_start, t_window = [], run.step, time.perf_counter()
            if run.step % args.ckpt_every == 0 or end:
                if window_losses:
                    read_window()  # never write parameters that came from an unchecked loss
                run.save(ckpt_path)
                saved_step = run.step
            if args.sample_every and run.step % args.sample_every == 0 and not end:
                write_grid(run, os.path.join(args.out, f"samples_{run.step:07d}"))
        stopped = world.any(stop["requested"])
        if stopped and saved_step != run.step:  # Ctrl-C before the first step, or during a sample grid
            if window_losses:
                read_window()
            run.save(ckpt_path)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old_handler)
    if stopped:
        log(f"interrupted at step {run.step}; checkpoint written to {ckpt_path}; continue with --resume {args.out}")
        return run
    log(f"done: {run.step} steps; checkpoint {ckpt_path}")
    if args.final_samples:
        grid = write_grid(run, os.path.join(args.out, "samples"), progress=True)
        log(f"EMA samples (cfg {args.cfg_scale}, {args.sample_steps} {run.objective.SAMPLERS[0]} steps): {grid}")
    return run


def main(argv=None):
    args, explicit = parse_args(argv)
    with abort_on_error():  # under mpiexec, a rank that fails ends every rank, with its error
        try:
            run_command(train, args, explicit)  # a user error ends in one line `error: ...`
        except Exception as e:
            if is_out_of_memory(e):
                sys.exit(f"error: out of memory at batch size {args.batch_size} ({type(e).__name__}: {e}); "
                         "try a smaller --batch-size")
            raise


if __name__ == "__main__":
    main()
