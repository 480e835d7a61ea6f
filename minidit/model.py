"""The DiT model (facebookresearch/DiT `models.py`) with a hand-written backward pass.

Parameters live in one flat dict named exactly like the official state_dict (`blocks.3.attn.qkv.weight`,
Linear weights stored (out, in)), so official checkpoints load by name and every gradient has a name.

    x (N, C, H, W) --patch embed--> (N, T, D) + pos_embed
    t (N,)  --sinusoid(256)--> Linear -> SiLU -> Linear --> (N, D) \
                                                                    +--> c (N, D)
    y (N,)  --label table (null class = num_classes)-----> (N, D) /
    depth x adaLN-Zero block (x, c); final layer (x, c); unpatchify --> (N, C_out, H, W)
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from .backend import get_backend, get_xp, to_backend, to_device
from .layers import (
    attention_backward, attention_forward, cross_attention_backward, cross_attention_forward, embedding_backward,
    embedding_forward, gated_residual_backward, gated_residual_forward, get_2d_sincos_pos_embed, layernorm_backward,
    layernorm_forward, linear_backward, linear_forward, mlp_backward, mlp_forward, modulate_backward,
    modulate_forward, patch_embed_backward, patch_embed_forward, silu_backward, silu_forward, timestep_embedding,
    unpatchify, unpatchify_backward,
)

FREQ_DIM = 256  # size of the sinusoidal timestep embedding


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


VARIANTS = {
    **{f"S/{p}": DiTConfig(12, 384, 6, p) for p in (2, 4, 8)},
    **{f"B/{p}": DiTConfig(12, 768, 12, p) for p in (2, 4, 8)},
    **{f"L/{p}": DiTConfig(24, 1024, 16, p) for p in (2, 4, 8)},
    **{f"XL/{p}": DiTConfig(28, 1152, 16, p) for p in (2, 4, 8)},
    # Not in the paper: small models for CPU demos (head size 64 like the official ones).
    **{f"mini/{p}": DiTConfig(6, 192, 3, p) for p in (2, 4, 8)},
}


def get_config(variant) -> DiTConfig:
    """'S/2', 'DiT-S/2' (official spelling) or a DiTConfig -> DiTConfig."""
    if isinstance(variant, DiTConfig):
        return variant
    name = str(variant)
    if name.startswith("DiT-"):
        name = name[len("DiT-"):]
    if name not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of: {', '.join(VARIANTS)} "
                         "(the 'DiT-' prefix is optional)")
    return VARIANTS[name]


# The paper's four ways of feeding the timestep and class to the blocks (Section 3.2, Table 4, Figure 5):
#   adaln-zero       shift, scale and a residual gate per branch regressed from c = t + y; the regression and the
#                    final linear start at zero, so every block starts as the identity (DiT; the default)
#   adaln            shift and scale regressed from c, no gates, the regression initialised like any linear
#   cross-attention  a cross-attention layer after self-attention, attending to the 2 tokens [t, y]; no adaLN
#   in-context       t and y appended to the sequence as 2 extra tokens, dropped after the last block; no adaLN
# The blocks without adaLN use LayerNorm without affine parameters (like DiT's), and their final layer is
# LayerNorm + Linear (the paper: "adaptive if using adaLN").
BLOCK_TYPES = ("adaln-zero", "adaln", "cross-attention", "in-context")
ADA_CHUNKS = {"adaln-zero": 6, "adaln": 4}  # outputs of a block's adaLN regression, in units of D


def check_block(block):
    if block not in BLOCK_TYPES:
        raise ValueError(f"unknown block type {block!r}; choose one of: {', '.join(BLOCK_TYPES)}")
    return block


# ----------------------------------------------------------------------------------------------
# Parameter shapes, counts and FLOPs: all derived from the config without allocating anything
# ----------------------------------------------------------------------------------------------
def param_shapes(cfg: DiTConfig, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1, block="adaln-zero"):
    """name -> shape for every parameter, in the official state_dict order (other block types: the same names
    for what they share, cross_attn.{q,kv,proj} for the cross-attention layer)."""
    check_block(block)
    D, p, C = cfg.hidden_size, cfg.patch_size, in_channels
    T = (input_size // p) ** 2
    out_c = 2 * C if learn_sigma else C
    hidden = int(D * cfg.mlp_ratio)
    table_rows = num_classes + (1 if class_dropout_prob > 0 else 0)  # + the null class used by guidance
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, FREQ_DIM),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (table_rows, D),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (D, hidden), b + "mlp.fc2.bias": (D,),
        })
        if block == "cross-attention":
            shapes.update({b + "cross_attn.q.weight": (D, D), b + "cross_attn.q.bias": (D,),
                           b + "cross_attn.kv.weight": (2 * D, D), b + "cross_attn.kv.bias": (2 * D,),
                           b + "cross_attn.proj.weight": (D, D), b + "cross_attn.proj.bias": (D,)})
        if block in ADA_CHUNKS:
            k = ADA_CHUNKS[block]
            shapes.update({b + "adaLN_modulation.1.weight": (k * D, D), b + "adaLN_modulation.1.bias": (k * D,)})
    shapes.update({
        "final_layer.linear.weight": (p * p * out_c, D),
        "final_layer.linear.bias": (p * p * out_c,),
    })
    if block in ADA_CHUNKS:
        shapes.update({"final_layer.adaLN_modulation.1.weight": (2 * D, D),
                       "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    return shapes


FROZEN = ("pos_embed",)  # a frozen Parameter in the official model: in the state_dict, never trained


def forward_macs(cfg: DiTConfig, input_size=32, in_channels=4, learn_sigma=True, block="adaln-zero"):
    """Multiply-accumulates of one forward pass per image: the paper's "Gflops" column x 1e9.

    Counts matmuls only (patch conv, linears, the attention matmuls), as the paper does;
    LayerNorm, softmax, activations and the label lookup are not counted.
    """
    check_block(block)
    D, p, C = cfg.hidden_size, cfg.patch_size, in_channels
    T = (input_size // p) ** 2
    out_c = 2 * C if learn_sigma else C
    hidden = int(D * cfg.mlp_ratio)
    patch = T * C * p * p * D
    t_mlp = FREQ_DIM * D + D * D
    L = T + 2 if block == "in-context" else T  # tokens inside the blocks
    per_block = (L * D * 3 * D       # qkv
                 + 2 * L * L * D     # q k^T and a v, over all heads
                 + L * D * D         # proj
                 + 2 * L * D * hidden)  # fc1, fc2
    if block in ADA_CHUNKS:
        per_block += D * ADA_CHUNKS[block] * D  # the adaLN regression, once per image
    if block == "cross-attention":  # q and proj per token, k v of the 2 condition tokens, T x 2 attention
        per_block += 2 * T * D * D + 2 * D * 2 * D + 2 * T * 2 * D
    final = T * D * p * p * out_c + (D * 2 * D if block in ADA_CHUNKS else 0)
    return patch + t_mlp + cfg.depth * per_block + final


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class BlockCache(NamedTuple):
    block: str  # the block type
    ada: Any  # LinearCache of adaLN_modulation.1 (input: silu(c)); None without adaLN
    ln1: Any
    mod1: Any  # None without adaLN
    attn: Any
    gate1: Any  # None unless adaln-zero
    lnx: Any  # cross-attention's LayerNorm and layer; None for the other types
    cross: Any
    ln2: Any
    mod2: Any
    mlp: Any
    gate2: Any


def residual_forward(x, gate, h):
    """x + gate * h (adaLN-Zero), or x + h when gate is None."""
    return gated_residual_forward(x, gate, h) if gate is not None else (x + h, None)


def residual_backward(dout, cache):
    """Returns dx, dgate (None without a gate), dh."""
    return gated_residual_backward(dout, cache) if cache is not None else (dout, None, dout)


def block_forward(x, cond, P, prefix, num_heads, block="adaln-zero"):
    """One DiT block. x (N, T, D); P the params; prefix 'blocks.i.'; cond depends on the block type:
    silu(c) (N, D) for adaln-zero and adaln, the condition tokens [t, y] (N, 2, D) for cross-attention, None for
    in-context (whose condition tokens are part of x).

    adaln-zero:  shift1, scale1, gate1, shift2, scale2, gate2 = Linear(silu(c))     (this chunk order)
                 x = x + gate1 * attn(modulate(LN(x), shift1, scale1))
                 x = x + gate2 * mlp(modulate(LN(x), shift2, scale2))
    adaln:       shift1, scale1, shift2, scale2 = Linear(silu(c));  the same without the gates
    cross-attention:  x = x + attn(LN(x));  x = x + cross_attn(LN(x), [t, y]);  x = x + mlp(LN(x))
    in-context:       x = x + attn(LN(x));  x = x + mlp(LN(x))
    """
    D = x.shape[2]
    c_ada = c_mod1 = c_mod2 = c_lnx = c_cross = None
    gate1 = gate2 = None
    if block in ADA_CHUNKS:
        ada, c_ada = linear_forward(cond, P[prefix + "adaLN_modulation.1.weight"],
                                    P[prefix + "adaLN_modulation.1.bias"])
        chunks = [ada[:, i * D:(i + 1) * D] for i in range(ADA_CHUNKS[block])]
        if block == "adaln-zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = chunks
        else:
            shift1, scale1, shift2, scale2 = chunks
    h, c_ln1 = layernorm_forward(x)
    if c_ada is not None:
        h, c_mod1 = modulate_forward(h, shift1, scale1)
    h, c_attn = attention_forward(h, P[prefix + "attn.qkv.weight"], P[prefix + "attn.qkv.bias"],
                                  P[prefix + "attn.proj.weight"], P[prefix + "attn.proj.bias"], num_heads)
    x, c_g1 = residual_forward(x, gate1, h)
    if block == "cross-attention":
        h, c_lnx = layernorm_forward(x)
        h, c_cross = cross_attention_forward(h, cond, *(P[prefix + "cross_attn." + n] for n in (
            "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias")), num_heads)
        x = x + h
    h, c_ln2 = layernorm_forward(x)
    if c_ada is not None:
        h, c_mod2 = modulate_forward(h, shift2, scale2)
    h, c_mlp = mlp_forward(h, P[prefix + "mlp.fc1.weight"], P[prefix + "mlp.fc1.bias"],
                           P[prefix + "mlp.fc2.weight"], P[prefix + "mlp.fc2.bias"])
    x, c_g2 = residual_forward(x, gate2, h)
    return x, BlockCache(block, c_ada, c_ln1, c_mod1, c_attn, c_g1, c_lnx, c_cross, c_ln2, c_mod2, c_mlp, c_g2)


def block_backward(dout, cache, prefix, grads):
    """Backward of block_forward: writes the block's parameter gradients into `grads`; returns dx, dcond
    (the gradient of the cond argument: dsilu(c) (N, D), d[t, y] (N, 2, D), or None for in-context)."""
    xp = get_xp(dout)
    dx, dgate2, dh = residual_backward(dout, cache.gate2)
    dh, grads[prefix + "mlp.fc1.weight"], grads[prefix + "mlp.fc1.bias"], \
        grads[prefix + "mlp.fc2.weight"], grads[prefix + "mlp.fc2.bias"] = mlp_backward(dh, cache.mlp)
    if cache.mod2 is not None:
        dh, dshift2, dscale2 = modulate_backward(dh, cache.mod2)
    dx = dx + layernorm_backward(dh, cache.ln2)  # the residual path plus the branch
    dcond = None
    if cache.cross is not None:
        dh, dcond, *dparams = cross_attention_backward(dx, cache.cross)
        for n, g in zip(("q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"), dparams):
            grads[prefix + "cross_attn." + n] = g
        dx = dx + layernorm_backward(dh, cache.lnx)
    dx, dgate1, dh = residual_backward(dx, cache.gate1)
    dh, grads[prefix + "attn.qkv.weight"], grads[prefix + "attn.qkv.bias"], \
        grads[prefix + "attn.proj.weight"], grads[prefix + "attn.proj.bias"] = attention_backward(dh, cache.attn)
    if cache.mod1 is not None:
        dh, dshift1, dscale1 = modulate_backward(dh, cache.mod1)
    dx = dx + layernorm_backward(dh, cache.ln1)
    if cache.ada is not None:
        chunks = ([dshift1, dscale1, dgate1, dshift2, dscale2, dgate2] if cache.block == "adaln-zero"
                  else [dshift1, dscale1, dshift2, dscale2])
        dcond, grads[prefix + "adaLN_modulation.1.weight"], grads[prefix + "adaLN_modulation.1.bias"] = \
            linear_backward(xp.concatenate(chunks, axis=1), cache.ada)  # (N, 6D) or (N, 4D) -> (N, D)
    return dx, dcond


class FinalCache(NamedTuple):
    ada: Any  # None without adaLN
    ln: Any
    mod: Any
    lin: Any


def final_layer_forward(x, c_act, P):
    """shift, scale = Linear(silu(c)) (shift first; no gate); out = Linear(modulate(LN(x), shift, scale)).
    c_act None (the blocks without adaLN): out = Linear(LN(x))."""
    c_ada = c_mod = None
    h, c_ln = layernorm_forward(x)
    if c_act is not None:
        ada, c_ada = linear_forward(c_act, P["final_layer.adaLN_modulation.1.weight"],
                                    P["final_layer.adaLN_modulation.1.bias"])
        D = x.shape[2]
        h, c_mod = modulate_forward(h, ada[:, :D], ada[:, D:])
    out, c_lin = linear_forward(h, P["final_layer.linear.weight"], P["final_layer.linear.bias"])  # (N, T, p*p*C_out)
    return out, FinalCache(c_ada, c_ln, c_mod, c_lin)


def final_layer_backward(dout, cache, grads):
    """Returns dx and dc_act (None without adaLN)."""
    xp = get_xp(dout)
    dh, grads["final_layer.linear.weight"], grads["final_layer.linear.bias"] = linear_backward(dout, cache.lin)
    dc_act = None
    if cache.ada is not None:
        dh, dshift, dscale = modulate_backward(dh, cache.mod)
        dc_act, grads["final_layer.adaLN_modulation.1.weight"], grads["final_layer.adaLN_modulation.1.bias"] = \
            linear_backward(xp.concatenate([dshift, dscale], axis=1), cache.ada)
    return layernorm_backward(dh, cache.ln), dc_act


class DiTCache(NamedTuple):
    patch: Any
    t_fc1: Any
    t_silu: Any
    t_fc2: Any
    y_emb: Any
    c_silu: Any
    blocks: list
    final: Any


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class DiT:
    """Diffusion Transformer with the official parameter names, shapes, initialisation and forward.

        model = DiT("S/2", input_size=32, in_channels=4, num_classes=1000, seed=0)
        out, cache = model.forward(x, t, y, train=False)   # (N, C, H, W), (N,), (N,) -> (N, 2C, H, W)
        grads = model.backward(dout, cache)                # name -> gradient, every trainable parameter

    On a multi-core CPU, minidit.threads.ShardedDiT runs the same two calls on shards of the batch at once.
    """

    def __init__(self, variant="S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1, seed=0, dtype=np.float32, backend="numpy", block="adaln-zero"):
        self.variant = variant if isinstance(variant, DiTConfig) else str(variant)
        self.block = check_block(block)
        self.config = cfg = get_config(variant)
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if cfg.hidden_size % 4:
            raise ValueError(f"hidden size {cfg.hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
        if input_size % cfg.patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {cfg.patch_size}; "
                             f"use an input size that is a multiple of {cfg.patch_size} or another variant")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma, self.class_dropout_prob = learn_sigma, class_dropout_prob
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads, self.depth = cfg.patch_size, cfg.num_heads, cfg.depth
        self.num_patches = (input_size // cfg.patch_size) ** 2
        self.dtype = np.dtype(dtype)
        self.xp = get_backend(backend)
        self.rng = np.random.default_rng(seed)  # label dropout when forward(train=True) gets no rng
        self.params = {k: to_device(v, self.xp) for k, v in self.init_params(seed).items()}

    # -- parameters ------------------------------------------------------------------------------
    def param_shapes(self):
        return param_shapes(self.config, self.input_size, self.in_channels, self.num_classes, self.learn_sigma,
                            self.class_dropout_prob, self.block)

    def init_params(self, seed):
        """The official initialize_weights(), on the host in numpy:
        xavier-uniform for every Linear (and the patch conv viewed as (D, C*p*p)), zero biases;
        N(0, 0.02) for the label table and the timestep MLP; fixed sin-cos pos_embed;
        zeros for every adaLN modulation and for the final linear, so the output is exactly 0.
        Other block types: the "adaln" blocks' modulation is initialised like any Linear (only the final layer's is
        zero), and the cross-attention linears are xavier-uniform too."""
        rng = np.random.default_rng(seed)
        params = {}
        for name, shape in self.param_shapes().items():
            zero_ada = "adaLN_modulation" in name and (self.block == "adaln-zero" or name.startswith("final_layer"))
            if name.endswith(".bias") or zero_ada or name.startswith("final_layer.linear"):
                w = np.zeros(shape)
            elif name == "pos_embed":
                w = get_2d_sincos_pos_embed(shape[2], int(math.isqrt(shape[1])))[None]
            elif name.startswith(("y_embedder", "t_embedder")):
                w = rng.normal(0.0, 0.02, size=shape)
            else:  # xavier-uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
                fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
                a = math.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-a, a, size=shape)
            params[name] = w.astype(self.dtype)
        return params

    def using(self, params):
        """This model reading another parameter dict (shared, not copied), e.g. the EMA weights."""
        view = copy.copy(self)
        view.params = params
        return view

    def trainable(self):
        """Names of the parameters that receive gradients (all but the frozen pos_embed)."""
        return [k for k in self.params if k not in FROZEN]

    def num_params(self, trainable_only=False):
        shapes = self.param_shapes()
        return sum(math.prod(s) for k, s in shapes.items() if not (trainable_only and k in FROZEN))

    def gmacs(self):
        """Forward multiply-accumulates per image, in billions (the paper's "Gflops")."""
        return forward_macs(self.config, self.input_size, self.in_channels, self.learn_sigma, self.block) / 1e9

    def state_dict(self):
        """name -> array (the model's own arrays, not copies), official names and shapes."""
        return dict(self.params)

    def load_state_dict(self, state):
        """Strict load: every key present, none extra, every shape equal; values copied in place
        (cast to the model's dtype and backend), so arrays held by an optimizer stay valid."""
        expected = self.param_shapes()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                     for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
        if missing or unexpected or misshaped:
            lines = [f"state dict does not match DiT {self.variant} (input_size={self.input_size}, "
                     f"in_channels={self.in_channels}, num_classes={self.num_classes}, learn_sigma={self.learn_sigma}, "
                     f"block={self.block}):"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            if misshaped:
                lines.append(f"  mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
            lines.append("  build the model with the variant and options the checkpoint was trained with")
            raise ValueError("\n".join(lines))
        for k, v in state.items():
            self.params[k][...] = to_backend(v, self.xp, self.dtype)

    # -- forward / backward ----------------------------------------------------------------------
    def check_inputs(self, x, t, y):
        """Clear errors for inputs of the wrong shape, dtype or range (before any deep traceback)."""
        S, C = self.input_size, self.in_channels
        if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"x must have shape (N, {C}, {S}, {S}) for this model, got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model is {self.dtype}; cast it with "
                            f"x.astype(np.{self.dtype})")
        N = x.shape[0]
        for name, a in (("t", t), ("y", y)):
            if getattr(a, "shape", None) != (N,):
                raise ValueError(f"{name} must have shape ({N},) (one per image), got {tuple(getattr(a, 'shape', ()))}")
            if a.dtype.kind not in "iu":
                raise TypeError(f"{name} must be an integer array, got {a.dtype}")
        for name, a in (("x", x), ("t", t), ("y", y)):
            if get_xp(a) is not self.xp:
                raise TypeError(f"{name} is a {type(a).__module__} array but the model lives on "
                                f"{self.xp.__name__}; move inputs with minidit.backend.to_device")
        if self.xp is np and N:  # value checks read the data: done on the host only, never a device sync
            top = self.num_classes + (1 if self.class_dropout_prob > 0 else 0)
            if y.min() < 0 or y.max() >= top:
                raise ValueError(f"labels must lie in [0, {top - 1}] ({self.num_classes} classes"
                                 + (f", {self.num_classes} = the null class" if top > self.num_classes else "")
                                 + f"), got min {y.min()} max {y.max()}")
            if t.min() < 0:
                raise ValueError(f"timesteps must be >= 0, got {t.min()}")

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """x (N, C, H, W) float, t (N,) int timesteps, y (N,) int labels -> (out (N, C_out, H, W), cache).

        cache=False (sampling): no activations are kept for a backward pass, so memory holds one block's worth at a
        time instead of all of them; the returned cache is None.

        train=True applies label dropout (prob class_dropout_prob, labels replaced by the null class
        num_classes) with `rng` (a numpy Generator; the model's own if None); force_drop_ids (N,) of
        0/1 drops exactly those labels, as the official code does for guidance.
        """
        self.check_inputs(x, t, y)
        P, xp = self.params, self.xp
        # label dropout -> the null class
        if force_drop_ids is None and train:
            force_drop_ids = self.label_dropout(x.shape[0], rng)
        if force_drop_ids is not None:
            y = xp.where(xp.asarray(force_drop_ids) == 1, self.num_classes, y)

        h, c_patch = patch_embed_forward(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], self.patch_size)
        h += P["pos_embed"]  # (N, T, D)
        # timestep: sinusoid -> Linear -> SiLU -> Linear
        temb = timestep_embedding(t, FREQ_DIM).astype(self.dtype)  # (N, 256)
        temb, c_t1 = linear_forward(temb, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])
        temb, c_tsilu = silu_forward(temb)
        temb, c_t2 = linear_forward(temb, P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
        yemb, c_y = embedding_forward(y, P["y_embedder.embedding_table.weight"])
        c_act = c_csilu = cond = None
        if self.block in ADA_CHUNKS:
            # Every adaLN_modulation is Sequential(SiLU, Linear) applied to c = t + y: the SiLU is computed once here.
            c_act, c_csilu = silu_forward(temb + yemb)  # (N, D)
            cond = c_act
        elif self.block == "cross-attention":
            cond = xp.stack([temb, yemb], axis=1)  # (N, 2, D): the tokens every block attends to
        else:  # in-context: [t, y, patches...] (N, 2 + T, D)
            h = xp.concatenate([temb[:, None], yemb[:, None], h], axis=1)
        block_caches = []
        for i in range(self.depth):
            h, bc = block_forward(h, cond, P, f"blocks.{i}.", self.num_heads, self.block)
            if cache:
                block_caches.append(bc)
        if self.block == "in-context":
            h = h[:, 2:]  # the condition tokens are dropped before decoding
        h, c_final = final_layer_forward(h, c_act, P)
        out = unpatchify(h, self.patch_size, self.out_channels)
        if not cache:
            return out, None
        return out, DiTCache(c_patch, c_t1, c_tsilu, c_t2, c_y, c_csilu, block_caches, c_final)

    def label_dropout(self, n, rng=None):
        """The training-time label dropout of n samples: (n,) bool on the host, True = replaced by the null class,
        each with probability class_dropout_prob, drawn from `rng` (a numpy Generator; the model's own if None).
        None when the model has no dropout."""
        if self.class_dropout_prob <= 0:
            return None
        return (rng or self.rng).random(n) < self.class_dropout_prob

    def backward(self, dout, cache, return_dx=False, release=False):
        """dout (N, C_out, H, W) -> grads: name -> gradient for every trainable parameter
        (and the input gradient dx too, as (grads, dx), when return_dx=True).

        release=True drops each block's activations from `cache` as soon as its backward is done, so memory falls
        while the gradients fill up (a training step then peaks lower); the cache cannot be used again."""
        xp = get_xp(dout)
        grads = {}
        dh = unpatchify_backward(dout, self.patch_size)
        dh, dcond = final_layer_backward(dh, cache.final, grads)  # dcond: d silu(c) from the final layer, or None
        if self.block == "in-context":  # the dropped condition tokens get no gradient from the final layer
            dh = xp.concatenate([xp.zeros_like(dh[:, :2]), dh], axis=1)
        for i in reversed(range(self.depth)):
            dh, dcond_i = block_backward(dh, cache.blocks[i], f"blocks.{i}.", grads)
            if release:
                cache.blocks[i] = None
            if dcond is None:  # the final layer had no adaLN (cross-attention, in-context)
                dcond = dcond_i
            elif dcond_i is not None:
                dcond += dcond_i  # the condition feeds every block: its gradients add up (in place, as before)
        if self.block in ADA_CHUNKS:
            dyemb = dtemb = silu_backward(dcond, cache.c_silu)  # c = temb + yemb, so both receive dc
        elif self.block == "cross-attention":
            dtemb, dyemb = dcond[:, 0], dcond[:, 1]
        else:
            dtemb, dyemb, dh = dh[:, 0], dh[:, 1], dh[:, 2:]
        grads["y_embedder.embedding_table.weight"] = embedding_backward(dyemb, cache.y_emb)
        dtemb, grads["t_embedder.mlp.2.weight"], grads["t_embedder.mlp.2.bias"] = linear_backward(dtemb, cache.t_fc2)
        dtemb = silu_backward(dtemb, cache.t_silu)
        _, grads["t_embedder.mlp.0.weight"], grads["t_embedder.mlp.0.bias"] = linear_backward(dtemb, cache.t_fc1)
        dx, grads["x_embedder.proj.weight"], grads["x_embedder.proj.bias"] = patch_embed_backward(dh, cache.patch)
        grads = {k: grads[k] for k in self.trainable()}  # official order
        return (grads, dx) if return_dx else grads
