"""Dynamic DiT: a DiT whose width (DyDiT, Zhao et al., ICLR 2025) or depth follows the timestep, and a sampler that
really skips what is switched off.

A trained DiT spends the same compute at every sampling step, though noisy early steps only lay out coarse shapes.
DyDiT's timestep-wise dynamic width gives every block two small routers that read the timestep embedding (t_embedder's
output, not c = t + y) and switch attention heads and groups of MLP channels on or off:

    width    head gates  m_h = 1[W_h temb + b_h > 0]   (N, NH)   multiply each head's attention output (before proj)
             group gates m_g = 1[W_g temb + b_g > 0]   (N, NH)   multiply the MLP hidden units, NH groups of 4D/NH
    depth    block gate  m_b = 1[W_b temb + b_b > 0]   (N, 1)    x <- x + m_b (block(x) - x): the block runs or not

The second option (depth) is the timestep-wise depth the "early exit" idea asks for: fewer blocks at some steps.
Both run DiT's own block: width with the two gates as its masks (minidit.model.block_forward's head_mask and
hidden_mask), depth inside the gated residual above.

Training fine-tunes a trained DiT (every router starts with weight 0 and bias ROUTER_BIAS, so every gate is on and
the model is exactly its parent) with the diffusion loss plus DyDiT's FLOPs target:

    r_n     = sum over gates of m * (the MACs the gate switches) / (the blocks' dense MACs)     (FLOPs ratio of sample n)
    L_flops = FLOPS_WEIGHT * (mean_n r_n - lambda)^2

The gates are step functions, so their backward is straight-through (STE): the forward uses the hard 0/1 gate,
the backward the derivative of the soft gate sigmoid(logit), d gate / d logit = s (1 - s). DyDiT adds Gumbel noise
to the logits while training; minidit keeps the gates a deterministic function of t, so the sub-network that
training shaped is exactly the one the sampler runs.

Because the gates depend on t alone, every sampling step's sub-network is known before the step runs: forward with
cache=False and one timestep for the whole batch cuts the active heads' rows of qkv and columns of proj, the active
groups' rows of fc1 and columns of fc2, drops the switched-off blocks, and runs DiT's own block on the slices (cut
once per gate pattern and kept). The masked forward (training) and the sliced one (sampling) compute the same numbers;
the sliced one does only the work that is on. (DyDiT's released code multiplies by masks, so its saved FLOPs are not
saved time.)
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, NamedTuple

import numpy as np

from .cli import nonnegative_int, unit_interval
from .layers import (
    final_layer_backward, final_layer_forward, linear_backward, linear_forward, silu_backward, silu_forward,
    timestep_embedder_backward, timestep_embedder_forward, unpatchify, unpatchify_backward,
)
from .model import (
    ATTN, EMBED_T, FINAL, MLP, DiT, DiTCache, DiTSpec, block_backward, block_forward, block_macs, forward_macs,
)
from .params import LINEAR, named, take
from .xp import get_xp, to_numpy

DYNAMIC = ("width", "depth")  # what the routers switch: heads and MLP channel groups, or whole blocks
ROUTER_BIAS = 3.0  # every router's initial bias: sigmoid(3) = 0.95, every gate on (DyDiT: 15 at temperature 5)
FLOPS_WEIGHT = 2.0  # DyDiT's weight of (mean FLOPs ratio - lambda)^2
MAX_SUBNETWORKS = 8  # cut sub-networks the sampler keeps at once (see DynamicDiT.subnetwork_at)


@dataclasses.dataclass(frozen=True)
class DynamicDiTSpec(DiTSpec):
    """A DiTSpec plus what is dynamic ("width" or "depth")."""
    dynamic: str = "width"  # in DYNAMIC

    kind = "dydit"

    def __post_init__(self):
        super().__post_init__()
        if self.dynamic not in DYNAMIC:
            raise ValueError(f"unknown dynamic mode {self.dynamic!r}; choose one of: {', '.join(DYNAMIC)}")

    def dense(self):
        """The DiTSpec of the same network without routers (the weights it shares with its parent)."""
        return DiTSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DiTSpec)})


# ----------------------------------------------------------------------------------------------
# The gate: hard forward, sigmoid backward (straight-through)
# ----------------------------------------------------------------------------------------------
class RouterCache(NamedTuple):
    soft: Any  # sigmoid(logits)


def gate_forward(logits, hard=True):
    """logits (N, K) -> gates (N, K): 1[logit > 0] (hard) or sigmoid(logit) (soft, a relaxation used to check the
    backward), and the cache."""
    xp = get_xp(logits)
    soft = 0.5 * (1 + xp.tanh(0.5 * logits))  # sigmoid, without overflow
    return ((logits > 0).astype(logits.dtype) if hard else soft), RouterCache(soft)


def gate_backward(dgate, cache):
    """The straight-through estimator: d gate / d logit taken as sigmoid'(logit) = s (1 - s), whether the forward
    was hard or soft."""
    s = cache.soft
    return dgate * s * (1 - s)


# ----------------------------------------------------------------------------------------------
# The block with a depth gate (training): x <- x + m_b (block(x) - x), DiT's block unchanged
# ----------------------------------------------------------------------------------------------
class DepthBlockCache(NamedTuple):
    block: Any  # BlockCache
    delta: Any  # block(x) - x (N, T, D)
    gate: Any  # (N, 1)


def depth_block_forward(x, c_act, P, prefix, num_heads, block_gate):
    out, block_cache = block_forward(x, c_act, P, prefix, num_heads)
    delta = out - x
    return x + block_gate[:, :, None] * delta, DepthBlockCache(block_cache, delta, block_gate)


def depth_block_backward(dout, cache, prefix, grads):
    """Returns dx, dc_act and dblock_gate (N, 1)."""
    g = cache.gate[:, :, None]
    dx_block, dc_act = block_backward(dout * g, cache.block, prefix, grads)
    dgate = (dout * cache.delta).sum(axis=(1, 2))[:, None]
    return dout * (1 - g) + dx_block, dc_act, dgate


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class DynamicCache(NamedTuple):
    dit: Any  # DiTCache (its blocks: BlockCache with masks (width) or DepthBlockCache)
    routers: list  # per block: (LinearCache, RouterCache) for each of its routers


class DynamicDiT(DiT):
    """A DiT with timestep routers (module docstring). Same calls as DiT:

        model = DynamicDiT("mini/8", input_size=16, in_channels=1, num_classes=10, dynamic="width")
        model.load_parent(parent_weights)                      # the routers keep their all-on initial values
        out, cache = model.forward(x, t, y, train=True)       # gates per sample, from t
        grads = model.backward(dout, cache)                    # routers included (straight-through)
        loss, ratio, grads = model.flops_loss(t, 0.5)          # DyDiT's FLOPs target, to add to the step's grads
        model.forward(x, t, y, cache=False)                    # one t for the batch: the sliced sub-network
    """

    Spec = DynamicDiTSpec
    OPTIONS = ("dynamic", "target_ratio", "target_warmup")
    dynamic = property(lambda self: self.spec.dynamic)  # "width" or "depth"

    def __init__(self, spec=None, *, seed=0, dtype=np.float32, backend="numpy", **fields):
        self._lock = threading.Lock()
        self.forget_subnetworks()
        super().__init__(spec, seed=seed, dtype=dtype, backend=backend, **fields)
        # the FLOPs each gate switches, as a fraction of the blocks' dense MACs: r_n = sum(gates * weights)
        attn, mlp, blocks = self.block_parts()
        H, L = self.num_heads, self.depth
        if self.spec.dynamic == "width":
            self.gate_weights = (attn / H / blocks, mlp / H / blocks)  # per head gate, per group gate
        else:
            self.gate_weights = (1 / L,)

    # -- the command line ------------------------------------------------------------------------
    @classmethod
    def add_options(cls, ap):
        ap.add_argument("--dynamic", choices=DYNAMIC, default=None,
                        help="make the DiT a Dynamic DiT (minidit.dynamic): timestep routers switch attention heads and "
                             "MLP channel groups (width, DyDiT) or whole blocks (depth); usually with --finetune")
        ap.add_argument("--target-ratio", type=unit_interval, default=0.5,
                        help="--dynamic: the FLOPs ratio lambda the routers are trained towards (DyDiT: 0.7, 0.5)")
        ap.add_argument("--target-warmup", type=nonnegative_int, default=200,
                        help="--dynamic: steps over which the target goes linearly from 1 to --target-ratio")

    @classmethod
    def chosen_by(cls, args):
        return args.model == DiT.CLI_NAME and args.dynamic is not None

    @classmethod
    def spec_from_options(cls, args, data):
        return dataclasses.replace(super().spec_from_options(args, data), dynamic=args.dynamic)

    @staticmethod
    def target_at(step, args):
        """lambda at `step`: from 1 down to --target-ratio over the run's first --target-warmup steps."""
        warmup = min(1.0, (step + 1) / args.target_warmup if args.target_warmup else 1.0)
        return 1.0 - (1.0 - args.target_ratio) * warmup

    def extra_loss(self, t, step, args):
        """DyDiT's FLOPs target at this step's lambda (flops_loss); logs the batch's mean FLOPs ratio and lambda."""
        target = self.target_at(step, args)
        _, ratio, grads = self.flops_loss(t, target)
        return grads, {"flops_ratio": ratio, "flops_target": target}

    # -- parameters ------------------------------------------------------------------------------
    def router_names(self, i):
        """The routers of block i, each a Linear(D -> gates): width: heads, MLP groups (NH gates each); depth: one."""
        return (f"blocks.{i}.head_router.", f"blocks.{i}.mlp_router.") if self.dynamic == "width" else \
            (f"blocks.{i}.depth_router.",)

    def param_shapes(self):
        shapes = super().param_shapes()
        D, gates = self.config.hidden_size, self.num_heads if self.dynamic == "width" else 1
        for i in range(self.depth):
            for r in self.router_names(i):
                shapes[r + "weight"], shapes[r + "bias"] = (gates, D), (gates,)
        return shapes

    def init_params(self, seed):
        """DiT's initialisation, and every router at weight 0, bias ROUTER_BIAS: all gates on at every t."""
        params = super().init_params(seed)
        for i in range(self.depth):
            for r in self.router_names(i):
                params[r + "weight"][...] = 0.0
                params[r + "bias"][...] = ROUTER_BIAS
        return params

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.forget_subnetworks()

    def load_parent(self, state):
        """A parent DiT's weights; the routers keep their all-on start, so the fine-tune begins exactly at the parent."""
        self.load_state_dict({**{k: v for k, v in self.params.items() if "_router." in k}, **state})

    def using(self, params):
        view = super().using(params)
        view._lock = threading.Lock()
        view.forget_subnetworks()  # other weights: other sub-networks
        return view

    def block_parts(self):
        """MACs per image of one block's attention (every head), MLP (every group), and the whole block with its adaLN
        regression: DyDiT's FLOPs ratio counts the first two for width, whole blocks for depth."""
        cfg, T, D = self.config, self.spec.num_patches, self.config.hidden_size
        mlp = 2 * T * D * int(D * cfg.mlp_ratio)
        attn = block_macs(cfg, T) - mlp
        if self.dynamic == "width":
            return attn, mlp, self.depth * (attn + mlp)
        return attn, mlp, self.depth * (attn + mlp + 6 * D * D)

    # -- routing ---------------------------------------------------------------------------------
    def route(self, temb, hard=True):
        """temb (N, D) -> per block a list of gates ((N, NH), (N, NH)) or ((N, 1),), and the routers' caches."""
        gates, caches = [], []
        for i in range(self.depth):
            g, c = [], []
            for r in self.router_names(i):
                logits, lin_cache = linear_forward(temb, *take(self.params, r, LINEAR))
                m, gate_cache = gate_forward(logits, hard)
                g.append(m)
                c.append((lin_cache, gate_cache))
            gates.append(g)
            caches.append(c)
        return gates, caches

    def route_backward(self, dgates, caches, grads):
        """Per block the gates' gradients -> the routers' gradients (into `grads`) and dtemb (N, D)."""
        dtemb = 0
        for i in range(self.depth):
            for r, dg, (lin_cache, gate_cache) in zip(self.router_names(i), dgates[i], caches[i]):
                dt, *dlin = linear_backward(gate_backward(dg, gate_cache), lin_cache)
                grads.update(named(r, LINEAR, dlin))
                dtemb = dtemb + dt
        return dtemb

    def flops_ratio(self, gates):
        """Per-sample FLOPs ratio r (N,) of the blocks' dense MACs, from route's gates."""
        return sum(w * g.sum(axis=1) for block in gates for w, g in zip(self.gate_weights, block))

    def gates_at(self, t):
        """The gates the sampler uses at timestep t (the network's time): per block a tuple of host bool arrays."""
        xp = self.xp
        temb, _ = timestep_embedder_forward(xp.asarray([t], dtype=self.dtype), *take(self.params, "", EMBED_T))
        gates, _ = self.route(temb)
        return [tuple(to_numpy(g[0]) > 0 for g in block) for block in gates]

    def flops_loss(self, t, target, hard=True):
        """DyDiT's FLOPs target on a batch of timesteps t (N,) (the network's time) and a target ratio lambda:
        returns L = FLOPS_WEIGHT (mean r - lambda)^2 (a 0-d array), mean r, and the gradients of L (the routers'
        and the timestep embedder's): add them to the diffusion loss's."""
        P = self.params
        temb, t_cache = timestep_embedder_forward(t, *take(P, "", EMBED_T))
        gates, caches = self.route(temb, hard)
        r = self.flops_ratio(gates).mean()
        loss = FLOPS_WEIGHT * (r - target) ** 2
        dr = 2 * FLOPS_WEIGHT * (r - target) / t.shape[0]  # dL / dr_n, the same for every sample
        dgates = [[dr * w * get_xp(g).ones_like(g) for w, g in zip(self.gate_weights, block)] for block in gates]
        grads = {}
        dtemb = self.route_backward(dgates, caches, grads)
        grads.update(named("", EMBED_T, timestep_embedder_backward(dtemb, t_cache)))
        return loss, r, grads

    # -- forward / backward ----------------------------------------------------------------------
    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True, hard=True):
        """As DiT.forward, the blocks gated by t's routers. cache=False with one t for the whole batch (sampling) runs
        the sliced sub-network instead (the same numbers, less work; on a GPU it reads t on the host, one small sync
        per call). hard=False: soft gates sigmoid(logit) (only to check the backward numerically)."""
        if not cache and hard and x.shape[0] and bool((t == t[0]).all()):
            return self.sliced_forward(x, t, y, force_drop_ids), None
        if train:
            self.forget_subnetworks()  # a training step changes the weights they were cut from
        P = self.params
        h, temb, yemb, embed_caches = self.embed(x, t, y, train, force_drop_ids, rng)
        gates, router_caches = self.route(temb, hard)
        c_act, c_silu_cache = silu_forward(temb + yemb)
        blocks = []
        block_forward_fn = block_forward if self.dynamic == "width" else depth_block_forward
        for i in range(self.depth):
            h, block_cache = block_forward_fn(h, c_act, P, f"blocks.{i}.", self.num_heads, *gates[i])
            if cache:
                blocks.append(block_cache)
        h, final_cache = final_layer_forward(h, c_act, *take(P, "", FINAL))
        out = unpatchify(h, self.patch_size, self.out_channels)
        if not cache:
            return out, None
        return out, DynamicCache(DiTCache(*embed_caches, c_silu_cache, blocks, final_cache), router_caches)

    def backward(self, dout, cache, return_dx=False, release=False):
        """As DiT.backward, the routers' gradients included (straight-through through the gates)."""
        c = cache.dit
        grads = {}
        dh = unpatchify_backward(dout, self.patch_size)
        dh, dc_act, *dfinal = final_layer_backward(dh, c.final)
        grads.update(named("", FINAL, dfinal))
        dgates = [None] * self.depth
        block_backward_fn = block_backward if self.dynamic == "width" else depth_block_backward
        for i in reversed(range(self.depth)):
            dh, dc_act_i, *dgates[i] = block_backward_fn(dh, c.blocks[i], f"blocks.{i}.", grads)
            if release:
                c.blocks[i] = None
            dc_act += dc_act_i
        dc = silu_backward(dc_act, c.c_silu)
        dtemb = dc + self.route_backward(dgates, cache.routers, grads)  # temb feeds c and the routers
        dx = self.embed_backward(dh, dtemb, dc, (c.patch, c.t_embedder, c.y_embedder), grads)
        grads = {k: grads[k] for k in self.trainable()}
        return (grads, dx) if return_dx else grads

    # -- sampling: the sliced sub-network --------------------------------------------------------
    def forget_subnetworks(self):
        """Drop every cut sub-network and routing decision (the weights they came from are about to change)."""
        self._routes = {}  # t -> its gate pattern (bytes of every gate): a few bytes per timestep
        self._subnetworks = collections.OrderedDict()  # gate pattern -> cut weights, least recently used first

    def subnetwork_at(self, t):
        """The sub-network at timestep t: per block None (switched off) or (params, num_heads), params with the
        active heads' rows of qkv and columns of proj, the active groups' rows of fc1 and columns of fc2.

        Cut once per gate pattern, not per timestep: neighbouring timesteps mostly share their gates, and the
        MAX_SUBNETWORKS most recently used cuts are kept (a sampler visits t in order), so memory stays bounded."""
        key = float(t)
        with self._lock:
            gates = None
            if key not in self._routes:
                gates = self.gates_at(key)
                self._routes[key] = b"".join(np.packbits(g).tobytes() for block in gates for g in block)
            pattern = self._routes[key]
            if pattern in self._subnetworks:
                self._subnetworks.move_to_end(pattern)
            else:
                self._subnetworks[pattern] = self._cut(gates if gates is not None else self.gates_at(key))
                if len(self._subnetworks) > MAX_SUBNETWORKS:
                    self._subnetworks.popitem(last=False)
            return self._subnetworks[pattern]

    def timesteps_routed(self):
        """The timesteps routed so far (sorted): after sampling, those the sampler visited."""
        return sorted(self._routes)

    def _cut(self, gates):
        P, xp, H, D = self.params, self.xp, self.num_heads, self.config.hidden_size
        hs = D // H
        blocks = []
        for i, g in enumerate(gates):
            prefix = f"blocks.{i}."
            names = [prefix + n for n in (ATTN + " " + MLP + " adaLN_modulation.1.weight adaLN_modulation.1.bias")
                     .split()]
            if self.dynamic == "depth":
                blocks.append(({n: P[n] for n in names}, H) if g[0][0] else None)
                continue
            heads, groups = (np.flatnonzero(m) for m in g)
            S = {n: P[n] for n in names}
            # a branch with nothing on still adds its output bias: keep one head (group) whose proj (fc2) columns
            # are zero, which computes exactly that
            zero_attn, zero_mlp = not heads.size, not groups.size
            heads, groups = (heads if heads.size else np.arange(1)), (groups if groups.size else np.arange(1))
            head_cols = (heads[:, None] * hs + np.arange(hs)).ravel()  # the active heads' channels in [0, D)
            qkv_rows = np.concatenate([j * D + head_cols for j in range(3)])  # [q | k | v]
            hidden = P[prefix + "mlp.fc1.weight"].shape[0]
            gs = hidden // H
            group_cols = (groups[:, None] * gs + np.arange(gs)).ravel()
            qkv_rows, head_cols, group_cols = (xp.asarray(a) for a in (qkv_rows, head_cols, group_cols))
            S[prefix + "attn.qkv.weight"] = P[prefix + "attn.qkv.weight"][qkv_rows]
            S[prefix + "attn.qkv.bias"] = P[prefix + "attn.qkv.bias"][qkv_rows]
            S[prefix + "attn.proj.weight"] = xp.ascontiguousarray(P[prefix + "attn.proj.weight"][:, head_cols])
            S[prefix + "mlp.fc1.weight"] = P[prefix + "mlp.fc1.weight"][group_cols]
            S[prefix + "mlp.fc1.bias"] = P[prefix + "mlp.fc1.bias"][group_cols]
            S[prefix + "mlp.fc2.weight"] = xp.ascontiguousarray(P[prefix + "mlp.fc2.weight"][:, group_cols])
            if zero_attn:
                S[prefix + "attn.proj.weight"] = xp.zeros_like(S[prefix + "attn.proj.weight"])
            if zero_mlp:
                S[prefix + "mlp.fc2.weight"] = xp.zeros_like(S[prefix + "mlp.fc2.weight"])
            blocks.append((S, len(heads)))
        return blocks

    def sliced_forward(self, x, t, y, force_drop_ids=None):
        """forward(cache=False) when every sample has the same t: DiT's blocks on the sliced weights, the switched-off
        blocks skipped. -> out (N, C_out, H, W)."""
        h, temb, yemb, _ = self.embed(x, t, y, False, force_drop_ids, None)
        c_act, _ = silu_forward(temb + yemb)
        for i, sub in enumerate(self.subnetwork_at(to_numpy(t[:1])[0])):
            if sub is not None:  # None: the block is switched off at this t
                params, num_heads = sub
                h, _ = block_forward(h, c_act, params, f"blocks.{i}.", num_heads)
        h, _ = final_layer_forward(h, c_act, *take(self.params, "", FINAL))
        return unpatchify(h, self.patch_size, self.out_channels)

    def macs_at(self, t):
        """Forward MACs per image of the sub-network at timestep t (DiT's count: matmuls only)."""
        attn, mlp, _ = self.block_parts()
        D, H = self.config.hidden_size, self.num_heads
        total = forward_macs(self.spec) - self.depth * (attn + mlp + 6 * D * D)
        for g in self.gates_at(t):
            if self.dynamic == "width":
                total += attn * g[0].sum() / H + mlp * g[1].sum() / H + 6 * D * D
            else:
                total += (attn + mlp + 6 * D * D) * bool(g[0][0])
        return int(total)
