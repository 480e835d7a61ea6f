"""Checkpoints: one .npz of plain arrays plus JSON metadata; loading can never execute code.

Layout of a minidit checkpoint (a zip written by ``np.savez``):

    "<namespace>.<name>"  -> array        e.g. "model.blocks.0.attn.qkv.weight", "ema.params.pos_embed",
                                               "opt.m.y_embedder.embedding_table.weight"
    "__meta__"            -> uint8 array  UTF-8 JSON of ``meta`` (config, step, RNG states, scalar state ...)

Why not pickle / torch.save: unpickling runs arbitrary code. Here ``np.load(allow_pickle=False)`` reads only
array headers and raw data, and JSON carries the rest.

The write is atomic: the file is written to a temporary name in the same directory, flushed to disk, then
``os.replace``d over the target, so a crash mid-write leaves the previous checkpoint intact.

Arrays may be host (numpy) or device (cupy) arrays; they are brought to the host with ``backend.to_numpy``,
and ``load_checkpoint`` returns numpy arrays (move them with ``backend.to_device``).
"""
from __future__ import annotations

import json
import os
import secrets
import zipfile

import numpy as np

from .backend import to_numpy

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
    # a hidden temporary in the same directory (so os.replace is a rename on one filesystem); created by os.open
    # rather than mkstemp so that the file gets the usual permissions (0o666 less the umask), not 0o600
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **host)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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


# ---------------------------------------------------------------- RNG state <-> JSON
# A numpy Generator's ``bit_generator.state`` is a dict of ints (PCG64: 128-bit ``state`` and ``inc``), strings
# and, for some bit generators (MT19937), arrays. Python's json keeps big ints exactly, but many other JSON
# readers turn numbers into float64, so ints beyond 2**53 and arrays are tagged and written as strings / lists.

_SAFE_INT = 2**53


def _encode(x):
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if isinstance(x, np.ndarray):
        return {"__ndarray__": [_encode(int(v)) for v in x.ravel()], "dtype": x.dtype.str, "shape": list(x.shape)}
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= _SAFE_INT:
        return {"__bigint__": str(x)}
    return x


def _decode(x):
    if isinstance(x, dict):
        if "__bigint__" in x:
            return int(x["__bigint__"])
        if "__ndarray__" in x:
            values = [_decode(v) for v in x["__ndarray__"]]
            return np.array(values, dtype=np.dtype(x["dtype"])).reshape(x["shape"])
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def rng_state(gen) -> dict:
    """JSON-able state of a ``np.random.Generator`` (any of numpy's bit generators)."""
    if not isinstance(gen, np.random.Generator):
        raise TypeError(
            f"rng_state needs a numpy.random.Generator, got {type(gen).__module__}.{type(gen).__name__}"
        )
    return _encode(gen.bit_generator.state)


def set_rng_state(gen, state: dict) -> None:
    """Restore a state from ``rng_state`` into ``gen`` (which must use the same bit generator)."""
    if not isinstance(gen, np.random.Generator):
        raise TypeError(
            f"set_rng_state needs a numpy.random.Generator, got {type(gen).__module__}.{type(gen).__name__}"
        )
    decoded = _decode(state)
    want, have = decoded.get("bit_generator"), type(gen.bit_generator).__name__
    if want != have:
        raise ValueError(f"RNG state is for bit generator {want!r}, but this Generator uses {have!r}")
    gen.bit_generator.state = decoded


# ---------------------------------------------------------------- a model from a checkpoint
CKPT_NAME = "checkpoint.npz"  # the file minidit.train keeps in its run directory


def checkpoint_file(path):
    """A checkpoint path, or a run directory -> the checkpoint file inside it."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def load_model(path, ema=True, backend="numpy"):
    """Build the DiT a training checkpoint describes and load its EMA weights (or the raw ones, ema=False)."""
    from .model import DiT  # here, not at the top: the model does not depend on checkpoints

    path = checkpoint_file(path)
    arrays, meta = load_checkpoint(path)
    if "model" not in meta:
        raise CheckpointError(f"{path!r} does not say which DiT it holds (no 'model' entry in its metadata)")
    prefix = "ema.params." if ema else "model."
    state = split_prefix(arrays, prefix)
    if not state:
        raise CheckpointError(f"{path!r} has no {'EMA' if ema else 'model'} weights (no '{prefix}*' arrays)")
    cfg = meta["model"]
    model = DiT(cfg["variant"], input_size=cfg["input_size"], in_channels=cfg["in_channels"],
                num_classes=cfg["num_classes"], learn_sigma=cfg["learn_sigma"],
                class_dropout_prob=cfg["class_dropout_prob"], backend=backend,
                block=cfg.get("block", "adaln-zero"))  # checkpoints from before block types are adaLN-Zero
    model.load_state_dict(state)
    return model
