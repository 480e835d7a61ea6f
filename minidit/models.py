"""Every kind of model minidit has, in one table; checkpoints and commands find a kind here and nowhere else.

    KINDS["dit"]                        -> DiT           (a checkpoint's meta["model"]["kind"])
    build({"kind": "dit", ...})         -> a DiT         (what a checkpoint's spec dict describes)
    choose(args, changed)               -> DiT           (what `python -m minidit.train`'s options ask for)

A new kind is its module (a Spec, and a Model subclass that sets what differs from DiT's behaviour, its command-line
options included) and one line in MODELS.
"""
from __future__ import annotations

import numpy as np

from .captions import CaptionMMDiT
from .conditioning import ConditioningDiT
from .dynamic import DynamicDiT
from .mmdit import MMDiT
from .model import DiT
from .video import VideoDiT

MODELS = (DiT, ConditioningDiT, DynamicDiT, VideoDiT, MMDiT, CaptionMMDiT)
KINDS = {cls.Spec.kind: cls for cls in MODELS}
CLI_NAMES = tuple(dict.fromkeys(cls.CLI_NAME for cls in MODELS if cls.CLI_NAME))  # train --model's choices


def build(spec: dict, seed=0, dtype=np.float32, backend="numpy"):
    """The model a spec dict (Spec.to_dict: its "kind" and fields) describes, freshly initialised from `seed`.
    An unknown kind or field is a ValueError that says so."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; this minidit builds {', '.join(KINDS)}")
    cls = KINDS[kind]
    return cls(cls.Spec.of(spec), seed=seed, dtype=dtype, backend=backend)


def upgrade_spec(spec: dict, version: str) -> dict:
    """A model spec as an older minidit wrote it (checkpoint.upgrade's `version`), in today's kinds and fields:

      minidit-train-1, minidit-converted-1  no "kind": every model was a DiT
      minidit-2   DiT's spec (and Dynamic DiT's) held the conditioning design as "block"; a design other than
                  adaLN-Zero is now ConditioningDiTSpec's (kind "dit-conditioning"), adaLN-Zero is DiT itself.
                  CaptionMMDiTSpec listed the transformer's free fields beside its own; they are now an MMDiTSpec
                  (`transformer`), its text widths embed_dim and its output channels in_channels. A video DiT added
                  its frame code at the input (frame_code "input"; Latte's place, after block 0, is the default now).
    """
    spec = dict(spec)
    if version in ("minidit-train-1", "minidit-converted-1"):
        spec = {"kind": DiT.Spec.kind, **spec}
    if spec.get("kind") in (DiT.Spec.kind, DynamicDiT.Spec.kind):
        block = spec.pop("block", "adaln-zero")
        if block != "adaln-zero":
            spec.update(kind=ConditioningDiT.Spec.kind, block=block)
    if spec.get("kind") == VideoDiT.Spec.kind:
        spec.setdefault("frame_code", "input")
    if spec.get("kind") == CaptionMMDiT.Spec.kind and "transformer" not in spec:
        names = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                 "pos_embed_max_size", "qk_norm")
        t = {k: spec.pop(k) for k in names if k in spec}
        E = spec.pop("embed_dim")
        spec["transformer"] = {**t, "joint_attention_dim": E, "pooled_projection_dim": E,
                               "out_channels": t["in_channels"],
                               "caption_projection_dim": t["num_attention_heads"] * t["attention_head_dim"]}
    return spec


def add_options(ap):
    """Every kind's own command-line options, for minidit.train."""
    for cls in MODELS:
        cls.add_options(ap)


def choose(args, changed=frozenset()):
    """The kind minidit.train's options ask for: of the kinds whose chosen_by(args) holds, the most derived (--model dit
    with --block adaln is a ConditioningDiT, a DiT refined). `changed`: the options the user set to other than their
    defaults; one that belongs to another kind than the chosen one is an error rather than silently unused."""
    chosen = [cls for cls in MODELS if cls.chosen_by(args)]
    leaves = [cls for cls in chosen if not any(other is not cls and issubclass(other, cls) for other in chosen)]
    if len(leaves) != 1:
        def named(c):  # the class and the options of its own that chose it
            given = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in c.OPTIONS if n in changed]
            return c.__name__ + (f" ({', '.join(given)})" if given else "")
        raise ValueError(f"the options ask for {' and '.join(map(named, leaves)) or 'no model'}, which no one model "
                         f"is: give --model one of {', '.join(CLI_NAMES)} and the options of that kind only")
    cls = leaves[0]
    for other in MODELS:
        stray = [name for name in other.OPTIONS if name in changed and not issubclass(cls, other)]
        if stray:
            raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in stray)} is an option of "
                             f"{other.__name__}; these options train a {cls.__name__}")
    return cls
