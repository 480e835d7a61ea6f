"""Checkpoints: one .npz of plain arrays plus JSON metadata; loading can never execute code.

Layout of a minidit checkpoint (a zip written by ``np.savez``):

    "<namespace>.<name>"  -> array        e.g. "model.blocks.0.attn.qkv.weight", "ema.params.pos_embed",
                                               "opt.m.y_embedder.embedding_table.weight"
    "__meta__"            -> uint8 array  UTF-8 JSON of ``meta`` (specs, step, options, scalar state ...)

Why not pickle / torch.save: unpickling runs arbitrary code. Here ``np.load(allow_pickle=False)`` reads only
array headers and raw data, and JSON carries the rest.

The write is atomic: the file is written to a temporary name in the same directory, flushed to disk, then
``os.replace``d over the target, so a crash mid-write leaves the previous checkpoint intact.

Arrays may be host (numpy) or device (cupy) arrays; they are brought to the host with ``xp.to_numpy``,
and ``load_checkpoint`` returns numpy arrays (move them with ``xp.to_device``).

Below the file layer (save_checkpoint / load_checkpoint), this module is the one place that knows minidit's
checkpoint format: what a training run saves (save_training, read_training), what minidit.convert writes
(save_weights), and how any of them becomes a model and an objective again (read, build_model, load).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import zipfile

import numpy as np

from . import models
from .diffusion import Diffusion
from .flow import RectifiedFlow
from .xp import to_numpy

META_KEY = "__meta__"
# keyword names of np.savez itself, which cannot be passed through **kwds
_SAVEZ_RESERVED = ("file", "args", "allow_pickle")

_CONVERT_HINT = ("to use a PyTorch checkpoint (an official DiT .pt, or one written by its train.py), convert it "
                 "once: python -m minidit.convert IN.pt OUT.npz")


class CheckpointError(ValueError):
    """A file that is not a readable minidit checkpoint; the message says why and what to do."""


def save_checkpoint(path, arrays: dict, meta: dict) -> None:
    """Write ``arrays`` (name -> numpy or device array) and JSON-able ``meta`` to ``path``, atomically.

    The file is written exactly at ``path`` (no ".npz" is appended). Object arrays are refused.
    """
    path = os.fspath(path)
    for key in arrays:
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be strings, got {key!r}")
        if key == META_KEY or key in _SAVEZ_RESERVED:
            raise ValueError(f"checkpoint key {key!r} is reserved; namespace it, e.g. 'model.{key}'")
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from e

    host = {}
    for key, value in arrays.items():
        a = to_numpy(value)
        if a.dtype == object:
            raise TypeError(f"checkpoint array {key!r} has dtype object; only plain numeric arrays can be saved")
        host[key] = a
    host[META_KEY] = np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    # a hidden temporary in the same directory (so os.replace is a rename on one filesystem); created by os.open
    # rather than mkstemp so that the file gets the usual permissions (0o666 less the umask), not 0o600
    tmp = os.path.join(directory, _temporary_name(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **host)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno and e.filename is None:  # a write into the open file: say which
            raise OSError(e.errno, f"{e.strerror} while writing the checkpoint {path}") from e
        raise
    try:  # make the rename itself durable (POSIX); harmless to skip where directories cannot be opened
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _temporary_name(path):
    """.NAME.PID.RANDOM.tmp: the hidden temporary a save of `path` writes first; the pid tells a stale one."""
    return f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _temporary_pattern(path):
    return re.compile(re.escape(f".{os.path.basename(path)}.") + r"(\d+)\.[0-9a-f]+\.tmp")  # _temporary_name's


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path):
    """Delete the temporaries that interrupted saves of `path` left (a SIGKILL mid-write leaves one, of the
    checkpoint's size): those named after a process that no longer runs, or after this one."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _temporary_pattern(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read a checkpoint written by ``save_checkpoint``: ``(arrays, meta)``, arrays as numpy arrays.

    Raises FileNotFoundError if there is no file, and CheckpointError if the file is not a minidit
    checkpoint (a torch .pt, a plain .npz/.npy without "__meta__"), is truncated or corrupt, or holds
    pickled (object) arrays.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(6)

    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        raise CheckpointError(
            f"{path!r} is a pickle (a legacy torch.save file?), not a minidit checkpoint; "
            f"minidit never unpickles, since that can execute code.\n{_CONVERT_HINT}"
        )
    if head.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"{path!r} is a single .npy array, not a minidit checkpoint (.npz with {META_KEY!r})")
    if not head.startswith(b"PK"):
        raise CheckpointError(
            f"{path!r} is not a minidit checkpoint: not an .npz (zip) file, or its start is corrupt "
            f"(first bytes {head!r})"
        )

    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if META_KEY not in names:
                if any(n.endswith("data.pkl") or n.endswith("/version") for n in names):
                    raise CheckpointError(
                        f"{path!r} is a PyTorch checkpoint (torch.save zip), not a minidit checkpoint.\n{_CONVERT_HINT}"
                    )
                raise CheckpointError(
                    f"{path!r} is an .npz but not a minidit checkpoint: it has no {META_KEY!r} entry "
                    f"(keys: {names[:5]}{' ...' if len(names) > 5 else ''})"
                )
            arrays = {}
            for name in names:
                try:
                    arrays[name] = z[name]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise CheckpointError(
                            f"{path!r}: entry {name!r} is a pickled object array; minidit checkpoints hold only "
                            f"plain arrays and refuse pickles, since loading them can execute code"
                        ) from e
                    raise
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or corrupt ({type(e).__name__}: {e}); "
            f"use an earlier checkpoint or copy this one again (save_checkpoint writes atomically, so a crash "
            f"mid-save does not cause this; an interrupted copy or a damaged disk does)"
        ) from e

    meta_bytes = arrays.pop(META_KEY)
    try:
        meta = json.loads(meta_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has corrupt metadata ({e})") from e
    return arrays, meta


def split_prefix(arrays: dict, prefix: str) -> dict:
    """The entries whose key starts with ``prefix``, with the prefix removed: ``split_prefix(a, "model.")``."""
    n = len(prefix)
    return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix)}


def add_prefix(arrays: dict, prefix: str) -> dict:
    """The inverse of ``split_prefix``: ``{prefix + name: value}``."""
    return {prefix + k: v for k, v in arrays.items()}


def split_state(state: dict) -> tuple[dict, dict]:
    """Split a flat state dict (e.g. ``AdamW.state_dict()``) into ``(arrays, scalars)``.

    Python / numpy scalars (int, float, bool, str, None) go to ``scalars`` (JSON, for ``meta``); everything
    with a ``shape`` goes to ``arrays``. Merge them back with ``{**arrays, **scalars}`` before loading.
    """
    arrays, scalars = {}, {}
    for k, v in state.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            scalars[k] = v
        elif isinstance(v, np.generic):
            scalars[k] = v.item()
        elif hasattr(v, "shape"):
            arrays[k] = v
        else:
            raise TypeError(f"state entry {k!r} is neither an array nor a scalar: {type(v).__name__}")
    return arrays, scalars


# ---------------------------------------------------------------- the format of minidit's checkpoints
# Every checkpoint minidit writes (a training run's, or converted official weights) is one .npz:
#   arrays  "model.<name>"        the raw weights (training checkpoints)
#           "ema.params.<name>"   the EMA weights, which sampling uses (both kinds)
#           "opt.<m|v>.<name>"    AdamW's moments (training checkpoints)
#   meta    {"format": FORMAT, "model": the model's spec (spec.to_dict(): "kind" and every field),
#            "objective": the objective's spec(), ...}  plus, for a training run, "step", "args" (every option of
#            minidit.train), "class_names", "opt" and "ema" (their scalar state); for converted weights, "source".
# One loader rebuilds any model from "model" (minidit.models.build) and its objective from "objective".
FORMAT = "minidit-3"
CKPT_NAME = "checkpoint.npz"  # the file minidit.train keeps in its run directory


def upgrade(meta):
    """The metadata of a checkpoint an earlier minidit wrote, in today's layout (FORMAT); other metadata unchanged.
    The one place that knows the older layouts:

      minidit-train-1, minidit-converted-1  the objective is not stored (DDPM)
      minidit-2 and before   the model spec in an older layout (minidit.models.upgrade_spec); a run's options lack
                  those added since (OPTIONS_ADDED)
    """
    meta, version = dict(meta), meta.get("format")
    if version not in ("minidit-train-1", "minidit-converted-1", "minidit-2"):
        return meta
    if isinstance(meta.get("model"), dict):  # the model's kind and fields: minidit.models knows the kinds
        meta["model"] = models.upgrade_spec(meta["model"], version)
    if version != "minidit-2":  # before the objective was stored, every model trained on DDPM
        meta["objective"] = {"kind": "ddpm", "noise_schedule": "linear", "diffusion_steps": 1000,
                             "learn_sigma": bool(meta.get("model", {}).get("learn_sigma", True))}
    if isinstance(meta.get("args"), dict):
        meta["args"] = {**OPTIONS_ADDED, **meta["args"]}
    meta["format"] = FORMAT
    return meta


# minidit.train's options that runs written by minidit-2 or earlier may lack, with the value that reproduces them
OPTIONS_ADDED = dict(block="adaln-zero", final_samples=True, threads=None, objective="ddpm",
                     time_sampling="logit-normal", model="dit", text_dim=64, frames=None, temporal_patch=1,
                     attention="factorised", finetune=None, dynamic=None, target_ratio=0.5, target_warmup=200,
                     distributed="auto")


def checkpoint_file(path):
    """A checkpoint path, or a run directory -> the checkpoint file inside it."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def read(path) -> tuple[dict, dict]:
    """(arrays, meta) of a minidit checkpoint of any version, its meta in today's layout (upgrade); a clear
    CheckpointError for files of another version or kind."""
    path = checkpoint_file(path)
    arrays, meta = load_checkpoint(path)
    version = meta.get("format")
    meta = upgrade(meta)
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path!r} is a checkpoint of format {version!r}; this minidit reads {FORMAT!r} and the "
                              f"older minidit-2, minidit-train-1, minidit-converted-1: write it again with this "
                              f"minidit (minidit.train --resume with the version that wrote it, or minidit.convert)")
    for key in ("model", "objective"):
        if not isinstance(meta.get(key), dict) or "kind" not in meta[key]:
            raise CheckpointError(f"{path!r} does not say which {key} it holds (no {key!r} spec in its metadata)")
    return arrays, meta


def build_model(spec: dict, seed=0, dtype=np.float32, backend="numpy"):
    """The model a spec dict describes (a checkpoint's meta["model"]), freshly initialised from `seed`."""
    try:
        return models.build(spec, seed=seed, dtype=dtype, backend=backend)
    except (TypeError, ValueError) as e:  # an unknown kind, a field this minidit does not know, or a bad value
        raise CheckpointError(f"the model spec {spec} does not describe a model this minidit can build ({e})") from None


def build_objective(spec: dict):
    """The objective a spec dict describes (a checkpoint's meta["objective"])."""
    objectives = {"ddpm": Diffusion, "flow": RectifiedFlow}
    kind = spec.get("kind")
    if kind not in objectives:
        raise CheckpointError(f"unknown objective {kind!r} in the checkpoint; this minidit has {', '.join(objectives)}")
    try:
        return objectives[kind](**{k: v for k, v in spec.items() if k != "kind"})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's objective spec {spec} is not one this minidit can build ({e})") from None


def check_weights(state, path, what):
    """Refuse weights that are not floating point or not finite, naming the first such tensor."""
    for name, a in state.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise CheckpointError(f"{path!r}: {what} tensor {name!r} has dtype {a.dtype}, not a float type")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{path!r}: {what} tensor {name!r} holds NaN or Inf values; the checkpoint is "
                                  f"damaged or was saved from a diverged run: use an earlier one")


def load(path, ema=True, backend="numpy", dtype=np.float32):
    """(model, objective, meta) of a checkpoint: the model its spec describes with its EMA weights (or the raw ones,
    ema=False), and the objective it was trained with."""
    arrays, meta = read(path)
    prefix = "ema.params." if ema else "model."
    state = split_prefix(arrays, prefix)
    if not state:
        raise CheckpointError(f"{checkpoint_file(path)!r} has no {'EMA' if ema else 'raw model'} weights "
                              f"(no '{prefix}*' arrays)" + ("" if ema else "; converted weights have only EMA ones"))
    check_weights(state, checkpoint_file(path), "weight")
    model = build_model(meta["model"], dtype=dtype, backend=backend)
    model.load_state_dict(state)
    return model, build_objective(meta["objective"]), meta


def load_model(path, ema=True, backend="numpy", dtype=np.float32):
    """The model of a checkpoint (minidit.train's or minidit.convert's) with its EMA weights, or the raw ones."""
    return load(path, ema=ema, backend=backend, dtype=dtype)[0]


def save_weights(path, model_spec: dict, objective_spec: dict, ema_params: dict, **meta):
    """A checkpoint of weights only (minidit.convert): loads with load_model, cannot be resumed."""
    save_checkpoint(path, add_prefix(ema_params, "ema.params."),
                    {"format": FORMAT, "model": model_spec, "objective": objective_spec, **meta})


def save_training(path, *, model, objective, opt, ema, step, args: dict, class_names):
    """A training run's whole state: weights, EMA, AdamW, step and options, so that resuming continues exactly."""
    opt_arrays, opt_scalars = split_state(opt.state_dict())
    ema_arrays, ema_scalars = split_state(ema.state_dict())
    arrays = {**add_prefix(model.params, "model."), **add_prefix(ema_arrays, "ema."), **add_prefix(opt_arrays, "opt.")}
    meta = {"format": FORMAT, "model": model.spec.to_dict(), "objective": objective.spec(), "step": step,
            "args": args, "class_names": list(class_names), "opt": opt_scalars, "ema": ema_scalars,
            "rng": "stateless: step k draws from default_rng([seed, k, ...]); seed is in args"}
    save_checkpoint(path, arrays, meta)


def read_training(path) -> tuple[dict, dict]:
    """(states, meta) of a training checkpoint: states["model"], ["ema"], ["opt"] are the flat state dicts of the
    model, EMA and AdamW (arrays and scalars merged, as their load_state_dict takes them)."""
    arrays, meta = read(path)
    path = checkpoint_file(path)
    if "args" not in meta or "opt" not in meta:
        raise CheckpointError(f"{path!r} is not a training checkpoint of minidit.train (converted weights, say); it "
                              f"cannot be resumed, only sampled")
    for key, kind in (("args", dict), ("opt", dict), ("ema", dict), ("step", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path!r}: its metadata entry {key!r} is {meta.get(key)!r}, not a {kind.__name__}; "
                                  f"the file is damaged: use an earlier checkpoint")
    check_weights(arrays, path, "state")
    states = {"model": split_prefix(arrays, "model."),
              "ema": {**split_prefix(arrays, "ema."), **meta["ema"]},
              "opt": {**split_prefix(arrays, "opt."), **meta["opt"]}}
    return states, meta
