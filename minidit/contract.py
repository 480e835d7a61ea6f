"""The model contract: what every minidit model is (`Spec`, its constructor's one argument) and what the commands
(train, sample, checkpoint, threads, bench) may ask of it (`Model`). Nothing above this module knows one kind of model
from another: a new kind is its module, its spec, and one line in minidit.models.

    spec  = DiTSpec("S/2", input_size=32)        # a frozen dataclass: every argument that decides the parameters
    model = DiT(spec, seed=0, dtype=np.float32, backend="numpy")   # nanoGPT's GPT(GPTConfig(...))
    model = DiT("S/2", input_size=32, seed=0)   # the same: a spec's first field, then fields by name
    DiT(DiTSpec.of(checkpoint_meta["model"]))   # what checkpoints do: spec.to_dict() is stored, "kind" included

The defaults below are DiT's behaviour (class labels, a null class that guidance uses, images of input_size), so a
class-conditional model overrides nothing; a model that differs (a caption model's token ids, a video model's clips,
a Dynamic DiT's extra loss) overrides just that.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from .backend import get_backend
from .params import check_keys
from .xp import get_xp, to_backend, to_device


@dataclasses.dataclass(frozen=True)
class Spec:
    """The base of every model's spec: a frozen dataclass of the constructor's arguments. `kind` (a class attribute,
    not a field) names the model family as checkpoints store it; `to_dict` / `of` are the JSON round trip."""

    kind = ""

    @classmethod
    def of(cls, spec=None, **overrides):
        """A spec of this class from a spec, a dict as to_dict wrote it, or None (the defaults); fields overridden by
        name. A value of another type is the first field (a DiT's variant name, say)."""
        cls.check_fields(overrides)
        if isinstance(spec, cls):
            return dataclasses.replace(spec, **overrides) if overrides else spec
        if spec is None:
            fields = {}
        elif isinstance(spec, dict):
            fields = cls.dict_fields(spec)
            cls.check_fields(fields)
        else:
            fields = {dataclasses.fields(cls)[0].name: spec}
        return cls(**{**fields, **overrides})

    @classmethod
    def dict_fields(cls, d):
        """The fields of a dict as to_dict wrote it."""
        return {k: v for k, v in d.items() if k != "kind"}

    @classmethod
    def check_fields(cls, names):
        unknown = sorted(set(names) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; its fields are: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")

    def fields(self):
        """field name -> value (not recursive: a nested spec stays a spec)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self):
        """JSON-able: every field (nested dataclasses as dicts) and "kind"."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


def check_array(name, a, shape, model, kinds=None, what=""):
    """A clear error (before any deep traceback) for an input `a` of `model` whose shape differs from `shape` (a
    name such as "N" or "H": any size on that axis), whose dtype is not the model's (or, with kinds, not of those numpy kinds: "iu" integers,
    "iuf" numbers), or that lives on another backend."""
    got = tuple(getattr(a, "shape", ()))
    if getattr(a, "ndim", None) != len(shape) or any(isinstance(n, int) and n != g for n, g in zip(shape, got)):
        want = ", ".join(map(str, shape))
        raise ValueError(f"{name} must have shape ({want}{',' if len(shape) == 1 else ''}){what} for this model, "
                         f"got {got}")
    if kinds is None and a.dtype != model.dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the model is {model.dtype}; cast it with "
                        f"{name}.astype(np.{model.dtype})")
    if kinds is not None and a.dtype.kind not in kinds:
        raise TypeError(f"{name} must be an {'integer' if kinds == 'iu' else 'integer or float'} array, got {a.dtype}")
    if get_xp(a) is not model.xp:
        raise TypeError(f"{name} is a {type(a).__module__} array but the model lives on {model.xp.__name__}; move "
                        f"inputs with minidit.xp.to_device")


class Model:
    """What every minidit model has and does, as the commands use it.

    A subclass sets `Spec` and defines `param_shapes()`, `init_params(seed)` (host float64 arrays), `forward` and
    `backward`; the constructor is this one. What it inherits is DiT's behaviour: override what differs.

        params              name -> array on the model's backend (self.xp), in self.dtype
        forward(x, t, y, train=False, force_drop_ids=None, rng=None, cache=True) -> (out, cache)
        backward(dout, cache, return_dx=False, release=False) -> grads (name -> array), and dx with return_dx
    """

    Spec = Spec
    FROZEN: tuple = ()  # parameters stored in the state dict but never trained
    CLI_NAME = None  # `python -m minidit.train --model NAME` trains it (None: not from the command line)
    OPTIONS: tuple = ()  # the command-line options this kind adds (add_options) and no other kind reads
    DATA = ("digits", "folder", "latents")  # the dataset kinds (minidit.data) it trains on
    LEARNS_SIGMA = True  # whether it can output the variance too (DDPM's learned sigma)

    def __init__(self, spec=None, *, seed=0, dtype=np.float32, backend="numpy", **fields):
        self.spec = self.Spec.of(spec, **fields)
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.dtype = np.dtype(dtype)
        self.xp = get_backend(backend)
        self.rng = np.random.default_rng(seed)  # condition dropout when forward(train=True) gets no rng
        self.place(self.init_params(seed))

    # -- parameters ------------------------------------------------------------------------------
    def param_shapes(self):  # pragma: no cover - every model defines it
        raise NotImplementedError

    def init_params(self, seed):  # pragma: no cover - every model defines it
        """name -> host float64 array: the initial values."""
        raise NotImplementedError

    def place(self, host_params):
        """Host float64 initial values -> self.params in the model's dtype, on its backend."""
        self.params = {k: to_device(v.astype(self.dtype), self.xp) for k, v in host_params.items()}

    def using(self, params):
        """This model reading another parameter dict (shared, not copied), e.g. the EMA weights."""
        view = copy.copy(self)
        view.params = params
        return view

    def trainable(self):
        """Names of the parameters that receive gradients, in the official order."""
        return [k for k in self.params if k not in self.FROZEN]

    def num_params(self, trainable_only=False):
        return sum(math.prod(s) for k, s in self.param_shapes().items()
                   if not (trainable_only and k in self.FROZEN))

    def state_dict(self):
        """name -> array (the model's own arrays, not copies), official names and shapes."""
        return dict(self.params)

    def load_state_dict(self, state):
        """Strict load: every key present, none extra, every shape equal; values copied in place (cast to the model's
        dtype and backend), so arrays held by an optimizer stay valid."""
        shapes = self.param_shapes()
        check_keys(state, shapes, f"state dict does not match {self.describe()} (build the model with the spec the "
                                  f"checkpoint was trained with)", shapes)
        for k, v in state.items():
            self.params[k][...] = to_backend(v, self.xp, self.dtype)

    def load_parent(self, state):
        """Start a fine-tune (train --finetune) from a parent's weights; here every weight must match."""
        self.load_state_dict(state)

    # -- what it is ------------------------------------------------------------------------------
    def describe(self):
        """One line naming the model and its spec, for the log and messages."""
        return f"{type(self).__name__}({self.spec})"

    def gmacs(self):  # pragma: no cover - every trainable model defines it
        """Forward multiply-accumulates per sample, in billions."""
        raise NotImplementedError

    @property
    def in_channels(self):
        """The channels of x (and of the noise the sampler starts from)."""
        return self.spec.in_channels

    @property
    def learn_sigma(self):
        """Whether the output holds the variance interpolation after the C noise channels."""
        return self.spec.learn_sigma

    def sample_shape(self, n, frames=None, size=None):
        """The shape of n samples: (n, C, H, W) images of the training size. frames and size are for models that
        take other shapes (a video model)."""
        if frames is not None or size is not None:
            raise ValueError(f"{type(self).__name__} makes images of {self.spec.input_size} x "
                             f"{self.spec.input_size}: --frames and --size are for a video model")
        return (n, self.in_channels, self.spec.input_size, self.spec.input_size)

    # -- conditions: class labels, and the null class guidance uses -------------------------------
    @property
    def null_condition(self):
        """The condition of "no condition" (classifier-free guidance's second half): the null class num_classes."""
        return self.spec.num_classes

    @property
    def condition_dropout_prob(self):
        """The probability with which training replaces a condition by the null one (> 0: guidance is possible;
        0 for an unconditional model, num_classes 0)."""
        return self.spec.class_dropout_prob if self.spec.num_classes else 0.0

    def condition_dropout(self, n, rng=None):
        """Training's condition dropout for n samples: (n,) bool on the host, True = replaced by the null condition,
        each with probability condition_dropout_prob, drawn from `rng` (a numpy Generator; the model's own if None).
        None when the model has no dropout."""
        if self.condition_dropout_prob <= 0:
            return None
        return (rng or self.rng).random(n) < self.condition_dropout_prob

    def drop_condition(self, y, train=False, force_drop_ids=None, rng=None):
        """y with its dropped rows replaced by the null condition (the official LabelEmbedder.token_drop):
        force_drop_ids (N,) of 0/1 drops exactly those (guidance does this); otherwise train=True draws the drop with
        condition_dropout. y (N, ...) on the model's backend."""
        if force_drop_ids is None and train:
            force_drop_ids = self.condition_dropout(y.shape[0], rng)
        if force_drop_ids is None:
            return y
        xp, null = get_xp(y), self.null_condition
        if isinstance(null, np.ndarray):  # a condition with axes (a caption's token ids): moved to y's backend
            null = xp.asarray(null, dtype=y.dtype)
        drop = (xp.asarray(force_drop_ids) == 1).reshape((-1,) + (1,) * (y.ndim - 1))  # broadcast over y's rows
        return xp.where(drop, null, y)

    def check_conditions(self, y):
        """Clear errors for host conditions a sampler is given: class labels (N,) in [0, num_classes), or None for
        an unconditional model."""
        if not self.spec.num_classes:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes 0): it takes no class labels")
            return
        if y is None or y.ndim != 1 or y.size == 0:
            raise ValueError("give at least one class label")
        if y.dtype.kind not in "iu":
            raise TypeError(f"class labels must be integers, got {y.dtype}")
        if y.min() < 0 or y.max() >= self.spec.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.spec.num_classes - 1}], got {y.tolist()}")

    def conditions(self, class_labels=None, prompts=None, per_class=1, labelled=False):
        """The conditions `python -m minidit.sample` asks for -> (y host array, class of each sample or None):
        the given class labels, or every class per_class times; (None, None) for an unconditional model, which
        samples per_class images."""
        if prompts:
            raise ValueError(f"--prompt is for a model trained on captions (--model mmdit --data digits-captions); "
                             f"this checkpoint's {type(self).__name__} takes --class-labels")
        if not self.spec.num_classes:
            self.check_conditions(None if class_labels is None else np.asarray(class_labels))
            return None, None
        labels = class_labels if class_labels is not None else \
            [c for c in range(self.spec.num_classes) for _ in range(per_class)]
        y = np.asarray(labels, dtype=np.int64)
        return y, y

    # -- training --------------------------------------------------------------------------------
    def extra_loss(self, t, step, args):
        """A loss term besides the objective's, a function of the batch's timesteps t (N,) (the network's time), the
        step and the run's options: (grads to add, name -> 0-d array to log). None: there is none."""
        return None

    # -- the command line ------------------------------------------------------------------------
    @classmethod
    def add_options(cls, ap):
        """Add the command-line options of this kind (those named in OPTIONS) to minidit.train's parser."""

    @classmethod
    def chosen_by(cls, args):
        """Whether minidit.train's options ask for this kind: --model CLI_NAME."""
        return cls.CLI_NAME is not None and args.model == cls.CLI_NAME

    @classmethod
    def spec_from_options(cls, args, data):  # pragma: no cover - every trainable model defines it
        """The spec minidit.train's options describe, sized to the dataset `data`."""
        raise NotImplementedError
