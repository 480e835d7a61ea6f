"""The paper's design studies at small scale: `python -m minidit.dev.experiments conditioning|scaling|objective`.

    conditioning   the four ways of feeding t and the class (--block), one model size (paper Table 4 / Figure 5)
    scaling        several model sizes and patch sizes with adaLN-Zero (paper Figure 2 / Table 4)
    objective      the same DiT trained with DDPM and with rectified flow (SiT's experiment; SD3's objective),
                   scored at several sampling-step counts: their training losses measure different things, so only
                   the samples can be compared
    samplers       no training: one checkpoint (--ckpt) sampled with each sampler and step count of --samplers at
                   each --cfg-scales, scored, with the sampling time (DDPM 250, DDIM 50, DPM-Solver++ 10/20/50)
    dynamic        Dynamic DiT: --ckpt (the parent) fine-tuned with each --dynamic-runs MODE:RATIO (--steps each),
                   then the parent and every fine-tune sampled with each --samplers pair: scores, MACs per step and
                   wall-clock speed-up over the parent at the same sampler and over the parent's first sampler

Every configuration trains on the same data with the same seed, batch, learning rate and number of steps (through
minidit.train, so each run is an ordinary run directory that can be resumed or sampled), then draws
--per-class guided samples of every class and scores them with minidit.dev.evaluate (digit classifier accuracy and a
Frechet distance on its features: a check that fits a laptop, not ImageNet FID). It writes, under --out:

    <name>/            the run directory of each configuration
    results.json       everything measured
    results.md         the table
    losses.png         training loss curves (needs matplotlib: pip install -e ".[notebooks]")

An interrupted experiment continues where it stopped when run again: finished runs are kept, an interrupted run is
resumed from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .. import train as train_mod
from ..cli import nonnegative_float, nonnegative_int, positive_float, positive_int, run, sampling_steps
from ..checkpoint import load, load_checkpoint
from ..data import to_uint8_nhwc
from .evaluate import evaluate
from ..conditioning import DESIGNS
from ..sample import generate


BLOCK_TYPES = ("adaln-zero", *DESIGNS)  # DiT itself and the paper's other three designs (--block)

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.dev.experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["conditioning", "scaling", "objective", "samplers", "dynamic"])
    ap.add_argument("--ckpt", default="runs/default",
                    help="samplers: the checkpoint to sample; dynamic: the parent (default runs/default)")
    ap.add_argument("--dynamic-runs", nargs="+", default=["width:0.7", "width:0.5", "depth:0.6"],
                    help="dynamic: MODE:RATIO fine-tunes of the parent (default width:0.7 width:0.5 depth:0.6)")
    ap.add_argument("--samplers", nargs="+", default=["ddpm:250", "ddim:50", "dpm++2m:10", "dpm++2m:20", "dpm++2m:50"],
                    help="samplers: SAMPLER:STEPS pairs (default: ddpm:250 ddim:50 dpm++2m:10 dpm++2m:20 dpm++2m:50)")
    ap.add_argument("--cfg-scales", type=nonnegative_float, nargs="+", default=[1.5, 4.0],
                    help="samplers: the guidance scales (default 1.5 4)")
    ap.add_argument("--backend", default="numpy", help="numpy, cupy or strict (default numpy)")
    ap.add_argument("--blocks", nargs="+", default=list(BLOCK_TYPES), choices=BLOCK_TYPES,
                    help="conditioning: the designs to compare (default: all four)")
    ap.add_argument("--variant", default="mini/4", help="conditioning, objective: the model (default mini/4)")
    ap.add_argument("--variants", nargs="+", default=["mini/4", "mini/2", "S/4"],
                    help="scaling: the models (default mini/4 mini/2 S/4)")
    ap.add_argument("--image-size", type=positive_int, default=16, help="digit image side (default 16, as the CPU demo)")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1, help="digit image channels (default 1)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="training steps of every configuration (default 2000 for conditioning, 1000 for scaling)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    ap.add_argument("--lr", type=positive_float, default=1e-3, help="default 1e-3 (the mini variants' default)")
    ap.add_argument("--per-class", type=positive_int, default=10, help="samples per class for the score (default 10)")
    ap.add_argument("--sample-steps", type=sampling_steps, nargs="+", default=None,
                    help="sampling steps of the scored samples, each scored (DDPM steps, or Euler steps for flow; "
                         "default 50, and 10 25 50 for the objective experiment)")
    ap.add_argument("--cfg-scale", type=nonnegative_float, default=4.0, help="guidance of the scored samples (default 4)")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--out", default=None, help="default results/<experiment>")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join("results", args.experiment)
    if args.steps is None:
        args.steps = 1000 if args.experiment in ("scaling", "dynamic") else 2000
    if args.sample_steps is None:
        args.sample_steps = [10, 25, 50] if args.experiment == "objective" else [50]
    return args


def configurations(args):
    """name -> (variant, block, objective)."""
    if args.experiment == "conditioning":
        return {block: (args.variant, block, "ddpm") for block in args.blocks}
    if args.experiment == "objective":
        return {objective: (args.variant, "adaln-zero", objective) for objective in ("ddpm", "flow")}
    return {variant.replace("/", "-"): (variant, "adaln-zero", "ddpm") for variant in args.variants}


def train_config(args, run_dir, variant, block, objective):
    """Train (or finish training) one configuration."""
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if os.path.exists(ckpt):
        _, meta = load_checkpoint(ckpt)
        if meta["step"] >= args.steps:
            return
        argv = ["--resume", run_dir, "--steps", str(args.steps)]
    else:
        argv = ["--backend", args.backend, "--variant", variant, "--block", block, "--objective", objective,
                "--data", "digits",
                "--image-size", str(args.image_size), "--channels", str(args.channels),
                "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
                "--seed", str(args.seed), "--out", run_dir, "--log-every", str(max(1, args.steps // 20)),
                "--ckpt-every", str(max(1, args.steps // 4)), "--no-final-samples"]
    run = train_mod.train(*train_mod.parse_args(argv))
    if run is None or run.step < args.steps:
        sys.exit(f"experiment stopped: {run_dir} reached step {getattr(run, 'step', 0)} of {args.steps}; "
                 "run the same command again to continue")


def loss_curve(run_dir, steps):
    """(window end steps, mean loss of each window) from the per-step losses in the run's metrics.jsonl, with the
    same window (steps / 20) for every configuration, whatever --log-every the run used."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = np.array([x for line in f for x in json.loads(line)["losses"]][:steps])  # one per step
    w = max(1, steps // 20)
    n = len(losses) // w
    return [(i + 1) * w for i in range(n)], losses[:n * w].reshape(n, w).mean(axis=1).tolist()


SCORES = ("accuracy", "min_class_accuracy", "per_class_accuracy", "frechet_distance", "reference_frechet_distance")


def score(args, run_dir):
    """Guided samples of every class from the run's EMA weights at each --sample-steps count, with the sampler of
    the run's objective (DDPM, or Euler for flow), scored by minidit.dev.evaluate: {steps: scores}, and seconds."""
    model, objective, _ = load(run_dir, backend=args.backend)
    labels = np.repeat(np.arange(model.spec.num_classes), args.per_class)
    scores = {}
    for steps in args.sample_steps:
        start = time.perf_counter()
        images = generate(model, labels, objective=objective, cfg_scale=args.cfg_scale, num_sampling_steps=steps,
                          seed=args.seed, clip_denoised=True, progress=True)
        r = evaluate(to_uint8_nhwc(images), labels)
        scores[steps] = dict({k: r[k] for k in SCORES}, sampler=objective.SAMPLERS[0],
                             seconds=round(time.perf_counter() - start, 2))
    return model, scores


def write_table(args, results, path):
    lines = [f"# {args.experiment}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
             f"digits {args.image_size}x{args.image_size}x{args.channels}, backend {args.backend}",
             "",
             f"Scores: {args.per_class} guided samples per class (cfg {args.cfg_scale}, EMA weights, the objective's "
             "sampler: DDPM, or Euler for flow), classified by minidit.dev.evaluate's digit classifier; sampling "
             "seconds on this machine. Final loss: the mean training loss of the last 5% of the steps (the last "
             "point of the curves; a DDPM and a flow loss are not on the same scale).",
             "",
             "| configuration | variant | block | params | GMACs/image | final loss | sampler, steps | accuracy | "
             "lowest class | Frechet distance | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for steps, sc in r["scores"].items():
            lines.append(f"| {name} | {r['variant']} | {r['block']} | {r['params']:,} | {r['gmacs']:.4f} | "
                         f"{r['final_loss']:.4f} | {sc['sampler']} {steps} | {sc['accuracy']:.3f} | "
                         f"{sc['min_class_accuracy']:.3f} | {sc['frechet_distance']:.1f} | {sc['seconds']:.1f} |")
    floor = next(iter(next(iter(results.values()))["scores"].values()))["reference_frechet_distance"]
    lines += ["", f"Frechet distance of as many real held-out digits (the floor): {floor:.1f}. "
              "Chance accuracy is 0.100."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(args, results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e \".[notebooks]\"); the table is in "
              f"{os.path.join(args.out, 'results.md')}")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot(r["loss_steps"], r["loss_values"], label=f"{name} (acc {r['accuracy']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (mean over 5% of the steps)")
    ax.set_title(f"{args.experiment}: digits {args.image_size}px, batch {args.batch_size}, lr {args.lr}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare_samplers(args):
    """The samplers experiment: {(cfg, sampler, steps): scores and seconds}, written as results.md/json."""
    model, objective, meta = load(args.ckpt, backend=args.backend)
    labels = np.repeat(np.arange(model.spec.num_classes), args.per_class)
    rows = []
    for cfg in args.cfg_scales:
        for pair in args.samplers:
            sampler, _, steps = pair.partition(":")
            start = time.perf_counter()
            images = generate(model, labels, objective=objective, cfg_scale=cfg, num_sampling_steps=int(steps),
                              sampler=sampler, seed=args.seed, clip_denoised=True, progress=False)
            seconds = time.perf_counter() - start
            r = evaluate(to_uint8_nhwc(images), labels)
            rows.append(dict(cfg=cfg, sampler=sampler, steps=int(steps), seconds=round(seconds, 2),
                             **{k: r[k] for k in SCORES}))
            print(f"cfg {cfg} {sampler} {steps}: accuracy {r['accuracy']:.3f}, lowest {r['min_class_accuracy']:.2f}, "
                  f"Frechet {r['frechet_distance']:.1f}, {seconds:.1f} s")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), step=meta.get("step"), rows=rows), f, indent=1)
    lines = [f"# samplers: {args.ckpt} (step {meta.get('step')}), {args.per_class} samples per class, seed {args.seed}",
             "", "| guidance | sampler | steps | accuracy | lowest class | Frechet distance | seconds |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['cfg']:g} | {r['sampler']} | {r['steps']} | {r['accuracy']:.3f} | {r['min_class_accuracy']:.3f} | "
              f"{r['frechet_distance']:.1f} | {r['seconds']:.1f} |" for r in rows]
    lines += ["", f"Frechet distance of as many real digits (the floor): {rows[0]['reference_frechet_distance']:.1f}."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def finetune_dynamic(args, run_dir, mode, ratio):
    """Fine-tune the parent --ckpt into a Dynamic DiT (or finish doing so)."""
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if os.path.exists(ckpt):
        if load_checkpoint(ckpt)[1]["step"] >= args.steps:
            return
        argv = ["--resume", run_dir, "--steps", str(args.steps)]
    else:
        argv = ["--finetune", args.ckpt, "--dynamic", mode, "--target-ratio", str(ratio), "--steps", str(args.steps),
                "--backend", args.backend, "--out", run_dir, "--log-every", str(max(1, args.steps // 20)),
                "--ckpt-every", str(max(1, args.steps // 4)), "--no-final-samples"]
    trained = train_mod.train(*train_mod.parse_args(argv))
    if trained is None or trained.step < args.steps:
        sys.exit(f"experiment stopped: {run_dir} reached step {getattr(trained, 'step', 0)} of {args.steps}; "
                 "run the same command again to continue")


def compare_dynamic(args):
    """The dynamic experiment: the parent and its fine-tunes, each sampled with every --samplers pair at each
    --cfg-scales; scores, MACs per network call relative to the parent, seconds and speed-ups (results.md/json)."""
    models = {"parent": args.ckpt}
    for pair in args.dynamic_runs:
        mode, _, ratio = pair.partition(":")
        name = f"{mode}-{ratio}"
        print(f"== dynamic: fine-tune {name} ({args.steps} steps)")
        run(finetune_dynamic, args, os.path.join(args.out, name), mode, float(ratio))
        models[name] = os.path.join(args.out, name)
    rows = []
    for name, path in models.items():
        model, objective, _ = load(path, backend=args.backend)
        labels = np.repeat(np.arange(model.spec.num_classes), args.per_class)
        dense = model.gmacs() * 1e9
        for cfg in args.cfg_scales:
            for pair in args.samplers:
                sampler, _, steps = pair.partition(":")
                view = model.using(model.params)  # its own routes: the timesteps this sampler visits
                start = time.perf_counter()
                images = generate(view, labels, objective=objective, cfg_scale=cfg, num_sampling_steps=int(steps),
                                  sampler=sampler, seed=args.seed, clip_denoised=True, progress=False)
                seconds = time.perf_counter() - start
                visited = getattr(view, "timesteps_routed", lambda: [])()
                macs = np.mean([view.macs_at(t) for t in visited]) / dense if visited else 1.0
                r = evaluate(to_uint8_nhwc(images), labels)
                rows.append(dict(model=name, cfg=cfg, sampler=sampler, steps=int(steps), seconds=round(seconds, 2),
                                 macs_ratio=round(float(macs), 4), **{k: r[k] for k in SCORES}))
                print(f"{name} cfg {cfg} {sampler} {steps}: accuracy {r['accuracy']:.3f}, lowest "
                      f"{r['min_class_accuracy']:.2f}, Frechet {r['frechet_distance']:.1f}, MACs {macs:.3f}, "
                      f"{seconds:.1f} s")
    base = {(r["cfg"], r["sampler"], r["steps"]): r["seconds"] for r in rows if r["model"] == "parent"}
    first = args.samplers[0].partition(":")
    for r in rows:
        r["speedup"] = base[(r["cfg"], r["sampler"], r["steps"])] / r["seconds"]
        r["speedup_vs_first"] = base[(r["cfg"], first[0], int(first[2]))] / r["seconds"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    lines = [f"# dynamic: parent {args.ckpt}, fine-tunes of {args.steps} steps, {args.per_class} samples per class, "
             f"seed {args.seed}", "",
             f"| model | guidance | sampler | steps | MACs / call | accuracy | lowest class | Frechet distance | seconds "
             f"| speed-up | vs parent {args.samplers[0]} |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['cfg']:g} | {r['sampler']} | {r['steps']} | {r['macs_ratio']:.3f} | "
              f"{r['accuracy']:.3f} | {r['min_class_accuracy']:.3f} | {r['frechet_distance']:.1f} | "
              f"{r['seconds']:.1f} | {r['speedup']:.2f}x | {r['speedup_vs_first']:.1f}x |" for r in rows]
    lines += ["", f"Frechet distance of as many real digits (the floor): {rows[0]['reference_frechet_distance']:.1f}."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.experiment == "samplers":
        return run(compare_samplers, args)
    if args.experiment == "dynamic":
        return run(compare_dynamic, args)
    results_path = os.path.join(args.out, "results.json")
    results = {}
    for name, (variant, block, objective) in configurations(args).items():
        run_dir = os.path.join(args.out, name)
        print(f"== {args.experiment}: {name} ({variant}, {block}, {objective}, {args.steps} steps)")
        run(train_config, args, run_dir, variant, block, objective)
        model, scores = run(score, args, run_dir)
        steps, values = loss_curve(run_dir, args.steps)
        results[name] = dict(variant=variant, block=block, objective=objective, params=model.num_params(),
                             gmacs=model.gmacs(), steps=args.steps, final_loss=values[-1], loss_steps=steps,
                             loss_values=values, scores=scores, **scores[args.sample_steps[-1]])
        with open(results_path, "w") as f:  # after every configuration: nothing measured is lost
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    write_table(args, results, os.path.join(args.out, "results.md"))
    plotted = write_plot(args, results, os.path.join(args.out, "losses.png"))
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"wrote {results_path}, results.md" + (", losses.png" if plotted else ""))


if __name__ == "__main__":
    main()
