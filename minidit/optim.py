"""AdamW and the EMA of the weights, as in the official train.py (facebookresearch/DiT train.py: main()).

Official settings: ``torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)`` with the default
betas (0.9, 0.999) and eps 1e-8, constant learning rate; ``ema = deepcopy(model)`` updated after every
optimizer step with decay 0.9999, over every parameter including the frozen ``pos_embed``.

Both classes work on a flat dict ``name -> array`` (numpy or cupy, named like the official state_dict)
and update the arrays IN PLACE: the model keeps holding the same array objects. Each array's module comes
from the array itself (``get_xp``); float32 stays float32 because every constant is a Python float.

State dicts are flat dicts of arrays and Python scalars, e.g. for AdamW
``{"step": 10, "lr": 1e-4, ..., "m.blocks.0.attn.qkv.weight": array, "v.<name>": array, "t.<name>": 10}``,
ready to be split into arrays and JSON metadata by ``checkpoint.split_state``.
"""
from __future__ import annotations

import math

from .params import check_keys
from .xp import fused, get_xp, to_backend


def _to_like(value, like):
    """A fresh array with ``like``'s module and dtype holding ``value`` (host or device)."""
    return to_backend(value, get_xp(like), like.dtype).copy()


def serial_map(fn, items, sizes):
    """fn(item) for each item in turn: the optimizers' default map. Another map may run the items at once, balanced
    by sizes (each item's number of elements), e.g. minidit.threads.threaded_map(4)."""
    for item in items:
        fn(item)


def run_updates(update, args, map):
    """update(*a) for every a in args, through map(fn, items, sizes); a parameter's update costs its size."""
    map(lambda a: update(*a), args, [a[0].size for a in args])


@fused
def adamw_update(p, g, m, v, keep, step_size, bc2_sqrt, b1, b2, eps):
    """One AdamW update of one parameter, in place on p, m, v (see AdamW for the formulas):
    keep = 1 - lr * wd,  step_size = lr / (1 - b1^t),  bc2_sqrt = sqrt(1 - b2^t)."""
    xp = get_xp(p)
    tmp = xp.empty_like(p)  # the one temporary
    if keep != 1.0:
        p *= keep  # decoupled weight decay
    # m += (1 - b1) (g - m)          == b1 m + (1 - b1) g
    xp.subtract(g, m, out=tmp)
    tmp *= 1.0 - b1
    m += tmp
    # v = b2 v + (1 - b2) g^2
    v *= b2
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp
    # denom = sqrt(v) / sqrt(1 - b2^t) + eps  (= sqrt(v^) + eps)
    xp.sqrt(v, out=tmp)
    tmp /= bc2_sqrt
    tmp += eps
    # p -= lr / (1 - b1^t) * m / denom
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments), updating params in place.

    For each parameter p with gradient g, at its step t (counted per parameter, as torch does):

        p  *= 1 - lr * wd                             # decoupled weight decay
        m   = b1 m + (1 - b1) g                       # first moment   (torch: m.lerp_(g, 1 - b1))
        v   = b2 v + (1 - b2) g^2                     # second moment
        m^  = m / (1 - b1^t),  v^ = v / (1 - b2^t)    # bias corrections (Python floats)
        p  -= lr * m^ / (sqrt(v^) + eps)

    Parameters absent from ``grads`` (the frozen ``pos_embed``, or any parameter without a gradient this
    step) are skipped entirely: no decay, no moment update, their step count does not advance; moments are
    created on a parameter's first gradient, so a never-trained parameter has no state (as in torch).

    map(fn, items, sizes) applies the per-parameter updates (default serial_map, one after the other); a threaded
    map (minidit.threads.threaded_map) only splits the work: each parameter's update is the same.
    """

    def __init__(self, params: dict, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, map=serial_map):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.map = map
        self._like = dict(params)  # name -> array (references, for shape / dtype / module only)
        self.step_count = 0  # number of step() calls
        self.m: dict = {}  # name -> first moment, same shape/dtype/module as the parameter
        self.v: dict = {}  # name -> second moment
        self.t: dict = {}  # name -> number of updates this parameter received

    def step(self, params: dict, grads: dict) -> None:
        """One AdamW update of ``params`` (in place) from ``grads`` (same names; missing names skipped)."""
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise ValueError(f"gradients for unknown parameters {unknown}")
        self.step_count += 1
        b1, b2, lr = self.beta1, self.beta2, self.lr
        updates = []  # the arguments of each parameter's adamw_update
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient {name} has shape {g.shape}, parameter has {p.shape}")
            xp = get_xp(p)
            if name not in self.m:
                self.m[name] = xp.zeros_like(p)
                self.v[name] = xp.zeros_like(p)
                self.t[name] = 0
            self.t[name] = t = self.t[name] + 1
            updates.append((p, g, self.m[name], self.v[name], 1.0 - lr * self.weight_decay, lr / (1.0 - b1**t),
                            math.sqrt(1.0 - b2**t), b1, b2, self.eps))
        run_updates(adamw_update, updates, self.map)

    def state_dict(self) -> dict:
        """Flat state: "step", hyper-parameters, and "m.<name>", "v.<name>" arrays, "t.<name>" ints.

        The arrays are the live moment arrays (not copies), like torch's state_dict.
        """
        d = {
            "step": self.step_count,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }
        for name in self.m:
            d[f"m.{name}"] = self.m[name]
            d[f"v.{name}"] = self.v[name]
            d[f"t.{name}"] = self.t[name]
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore a state saved by ``state_dict`` (hyper-parameters included, as torch does).

        Strict: every key must be known, hyper-parameters and "step" present, and each parameter that has
        state must have all of "m.", "v.", "t.", with shapes matching the parameter. Arrays are copied onto
        the parameter's module (host or device) and dtype.
        """
        scalars = {"step", "lr", "beta1", "beta2", "eps", "weight_decay"}
        names = sorted({k.split(".", 1)[1] for k in d if k[:2] in ("m.", "v.", "t.")})
        expected = set(scalars)
        for name in names:
            if name in self._like:
                expected |= {f"m.{name}", f"v.{name}", f"t.{name}"}
        check_keys(d, expected, "AdamW state_dict does not match")
        m, v, t = {}, {}, {}
        for name in names:
            like = self._like[name]
            for key in (f"m.{name}", f"v.{name}"):
                if tuple(d[key].shape) != tuple(like.shape):
                    raise ValueError(f"AdamW state {key} has shape {tuple(d[key].shape)}, parameter has {like.shape}")
            m[name], v[name] = _to_like(d[f"m.{name}"], like), _to_like(d[f"v.{name}"], like)
            t[name] = int(d[f"t.{name}"])
        self.m, self.v, self.t = m, v, t
        self.step_count = int(d["step"])
        self.lr, self.eps, self.weight_decay = float(d["lr"]), float(d["eps"]), float(d["weight_decay"])
        self.beta1, self.beta2 = float(d["beta1"]), float(d["beta2"])


@fused
def ema_update(e, p, d):
    """ema = d ema + (1 - d) p in place, written as d (ema - p) + p, which needs no temporary array."""
    e -= p
    e *= d
    e += p


class EMA:
    """Exponential moving average of the weights: ``ema = decay * ema + (1 - decay) * p`` for every parameter.

    ``params`` is the averaged copy (a dict like the model's, ``pos_embed`` included, as official), made at
    construction, which equals the official initialisation ``update_ema(ema, model, decay=0)``.

    warmup=False (official): the decay is ``decay`` (0.9999) at every update. With that decay the average
    forgets its initial value with a time constant of 10,000 updates, so a run of a few thousand steps
    would sample from weights still close to the initialisation.

    warmup=True (not in DiT; a convenience for short runs): update n (n = 0, 1, ... updates so far) uses
    ``decay_n = min(decay, (1 + n) / (10 + n))``: 0.1, 0.18, 0.25, ... so the average starts by following the
    weights closely and reaches ``decay`` after about 1 / (1 - decay) updates (the schedule of
    tf.train.ExponentialMovingAverage with num_updates).
    """

    def __init__(self, params: dict, decay=0.9999, warmup=False, map=serial_map):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"invalid EMA decay {decay}: must be in [0, 1]")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.map = map  # applies the per-parameter updates, as AdamW's
        self.num_updates = 0
        self.params = {name: p.copy() for name, p in params.items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    def update(self, params: dict) -> None:
        """ema = d * ema + (1 - d) * p, in place on ``self.params`` (every name must be present)."""
        check_keys(params, set(self.params), "EMA update: params do not match the averaged copy")
        d = self.current_decay()
        if d != 1.0:  # d = 1 (frozen): skip, since (ema - p) + p need not round back to ema exactly
            run_updates(ema_update, [(e, params[name], d) for name, e in self.params.items()], self.map)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Flat state: "decay", "warmup", "num_updates", and "params.<name>" (the live averaged arrays)."""
        d = {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}
        for name, e in self.params.items():
            d[f"params.{name}"] = e
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore a state saved by ``state_dict``; strict on keys and shapes; copies into the existing arrays."""
        expected = {"decay", "warmup", "num_updates"} | {f"params.{name}" for name in self.params}
        check_keys(d, expected, "EMA state_dict does not match")
        for name, e in self.params.items():
            value = d[f"params.{name}"]
            if tuple(value.shape) != tuple(e.shape):
                raise ValueError(f"EMA state params.{name} has shape {tuple(value.shape)}, parameter has {e.shape}")
        for name, e in self.params.items():
            e[...] = _to_like(d[f"params.{name}"], e)
        self.decay, self.warmup, self.num_updates = float(d["decay"]), bool(d["warmup"]), int(d["num_updates"])
