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
    attention_backward, attention_forward, embedding_backward, embedding_forward, gated_residual_backward,
    gated_residual_forward, get_2d_sincos_pos_embed, layernorm_backward, layernorm_forward, linear_backward,
    linear_forward, mlp_backward, mlp_forward, modulate_backward, modulate_forward, patch_embed_backward,
    patch_embed_forward, silu_backward, silu_forward, timestep_embedding, unpatchify, unpatchify_backward,
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
    **{f"mini/{p}": DiTConfig(6, 192, 3, p) for p in (2, 4)},
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


# ----------------------------------------------------------------------------------------------
# Parameter shapes, counts and FLOPs: all derived from the config without allocating anything
# ----------------------------------------------------------------------------------------------
def param_shapes(cfg: DiTConfig, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1):
    """name -> shape for every parameter, in the official state_dict order."""
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
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * out_c, D),
        "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return shapes


FROZEN = ("pos_embed",)  # a frozen Parameter in the official model: in the state_dict, never trained


def forward_macs(cfg: DiTConfig, input_size=32, in_channels=4, learn_sigma=True):
    """Multiply-accumulates of one forward pass per image: the paper's "Gflops" column x 1e9.

    Counts matmuls only (patch conv, linears, the two attention matmuls), as the paper does;
    LayerNorm, softmax, activations and the label lookup are not counted.
    """
    D, p, C = cfg.hidden_size, cfg.patch_size, in_channels
    T = (input_size // p) ** 2
    out_c = 2 * C if learn_sigma else C
    hidden = int(D * cfg.mlp_ratio)
    patch = T * C * p * p * D
    t_mlp = FREQ_DIM * D + D * D
    block = (T * D * 3 * D          # qkv
             + 2 * T * T * D        # q k^T and a v, over all heads
             + T * D * D            # proj
             + 2 * T * D * hidden   # fc1, fc2
             + D * 6 * D)           # adaLN modulation
    final = D * 2 * D + T * D * p * p * out_c
    return patch + t_mlp + cfg.depth * block + final


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class BlockCache(NamedTuple):
    ada: Any  # LinearCache of adaLN_modulation.1 (input: silu(c))
    ln1: Any
    mod1: Any
    attn: Any
    gate1: Any
    ln2: Any
    mod2: Any
    mlp: Any
    gate2: Any


def block_forward(x, c_act, P, prefix, num_heads):
    """adaLN-Zero DiT block. x (N, T, D); c_act = silu(c) (N, D); P the params; prefix 'blocks.i.'.

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(silu(c))     (this chunk order)
        x = x + gate1 * attn(modulate(LN(x), shift1, scale1))
        x = x + gate2 * mlp(modulate(LN(x), shift2, scale2))
    """
    ada, c_ada = linear_forward(c_act, P[prefix + "adaLN_modulation.1.weight"], P[prefix + "adaLN_modulation.1.bias"])
    shift1, scale1, gate1, shift2, scale2, gate2 = (ada[:, i * x.shape[2]:(i + 1) * x.shape[2]] for i in range(6))
    h, c_ln1 = layernorm_forward(x)
    h, c_mod1 = modulate_forward(h, shift1, scale1)
    h, c_attn = attention_forward(h, P[prefix + "attn.qkv.weight"], P[prefix + "attn.qkv.bias"],
                                  P[prefix + "attn.proj.weight"], P[prefix + "attn.proj.bias"], num_heads)
    x, c_g1 = gated_residual_forward(x, gate1, h)
    h, c_ln2 = layernorm_forward(x)
    h, c_mod2 = modulate_forward(h, shift2, scale2)
    h, c_mlp = mlp_forward(h, P[prefix + "mlp.fc1.weight"], P[prefix + "mlp.fc1.bias"],
                           P[prefix + "mlp.fc2.weight"], P[prefix + "mlp.fc2.bias"])
    x, c_g2 = gated_residual_forward(x, gate2, h)
    return x, BlockCache(c_ada, c_ln1, c_mod1, c_attn, c_g1, c_ln2, c_mod2, c_mlp, c_g2)


def block_backward(dout, cache, prefix, grads):
    """Backward of block_forward: writes the block's parameter gradients into `grads`; returns dx, dc_act."""
    xp = get_xp(dout)
    dx, dgate2, dh = gated_residual_backward(dout, cache.gate2)
    dh, grads[prefix + "mlp.fc1.weight"], grads[prefix + "mlp.fc1.bias"], \
        grads[prefix + "mlp.fc2.weight"], grads[prefix + "mlp.fc2.bias"] = mlp_backward(dh, cache.mlp)
    dh, dshift2, dscale2 = modulate_backward(dh, cache.mod2)
    dx = dx + layernorm_backward(dh, cache.ln2)  # the residual path plus the branch
    dx, dgate1, dh = gated_residual_backward(dx, cache.gate1)
    dh, grads[prefix + "attn.qkv.weight"], grads[prefix + "attn.qkv.bias"], \
        grads[prefix + "attn.proj.weight"], grads[prefix + "attn.proj.bias"] = attention_backward(dh, cache.attn)
    dh, dshift1, dscale1 = modulate_backward(dh, cache.mod1)
    dx = dx + layernorm_backward(dh, cache.ln1)
    dada = xp.concatenate([dshift1, dscale1, dgate1, dshift2, dscale2, dgate2], axis=1)  # (N, 6D)
    dc_act, grads[prefix + "adaLN_modulation.1.weight"], grads[prefix + "adaLN_modulation.1.bias"] = \
        linear_backward(dada, cache.ada)
    return dx, dc_act


class FinalCache(NamedTuple):
    ada: Any
    ln: Any
    mod: Any
    lin: Any


def final_layer_forward(x, c_act, P):
    """shift, scale = Linear(silu(c)) (shift first; no gate); out = Linear(modulate(LN(x), shift, scale))."""
    ada, c_ada = linear_forward(c_act, P["final_layer.adaLN_modulation.1.weight"],
                                P["final_layer.adaLN_modulation.1.bias"])
    D = x.shape[2]
    shift, scale = ada[:, :D], ada[:, D:]
    h, c_ln = layernorm_forward(x)
    h, c_mod = modulate_forward(h, shift, scale)
    out, c_lin = linear_forward(h, P["final_layer.linear.weight"], P["final_layer.linear.bias"])  # (N, T, p*p*C_out)
    return out, FinalCache(c_ada, c_ln, c_mod, c_lin)


def final_layer_backward(dout, cache, grads):
    xp = get_xp(dout)
    dh, grads["final_layer.linear.weight"], grads["final_layer.linear.bias"] = linear_backward(dout, cache.lin)
    dh, dshift, dscale = modulate_backward(dh, cache.mod)
    dx = layernorm_backward(dh, cache.ln)
    dc_act, grads["final_layer.adaLN_modulation.1.weight"], grads["final_layer.adaLN_modulation.1.bias"] = \
        linear_backward(xp.concatenate([dshift, dscale], axis=1), cache.ada)
    return dx, dc_act


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
    """

    def __init__(self, variant="S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1, seed=0, dtype=np.float32, backend="numpy"):
        self.variant = variant if isinstance(variant, DiTConfig) else str(variant)
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
                            self.class_dropout_prob)

    def init_params(self, seed):
        """The official initialize_weights(), on the host in numpy:
        xavier-uniform for every Linear (and the patch conv viewed as (D, C*p*p)), zero biases;
        N(0, 0.02) for the label table and the timestep MLP; fixed sin-cos pos_embed;
        zeros for every adaLN modulation and for the final linear, so the output is exactly 0."""
        rng = np.random.default_rng(seed)
        params = {}
        for name, shape in self.param_shapes().items():
            if name.endswith(".bias") or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
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
        return forward_macs(self.config, self.input_size, self.in_channels, self.learn_sigma) / 1e9

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
                     f"in_channels={self.in_channels}, num_classes={self.num_classes}, learn_sigma={self.learn_sigma}):"]
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

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None):
        """x (N, C, H, W) float, t (N,) int timesteps, y (N,) int labels -> (out (N, C_out, H, W), cache).

        train=True applies label dropout (prob class_dropout_prob, labels replaced by the null class
        num_classes) with `rng` (a numpy Generator; the model's own if None); force_drop_ids (N,) of
        0/1 drops exactly those labels, as the official code does for guidance.
        """
        self.check_inputs(x, t, y)
        P, xp = self.params, self.xp
        # label dropout -> the null class (the mask is drawn on the host, N booleans)
        if force_drop_ids is not None:
            y = xp.where(xp.asarray(force_drop_ids) == 1, self.num_classes, y)
        elif train and self.class_dropout_prob > 0:
            drop = (rng or self.rng).random(x.shape[0]) < self.class_dropout_prob
            y = xp.where(to_device(drop, xp), self.num_classes, y)

        h, c_patch = patch_embed_forward(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], self.patch_size)
        h += P["pos_embed"]  # (N, T, D)
        # timestep: sinusoid -> Linear -> SiLU -> Linear
        temb = timestep_embedding(t, FREQ_DIM).astype(self.dtype)  # (N, 256)
        temb, c_t1 = linear_forward(temb, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])
        temb, c_tsilu = silu_forward(temb)
        temb, c_t2 = linear_forward(temb, P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
        yemb, c_y = embedding_forward(y, P["y_embedder.embedding_table.weight"])
        # Every adaLN_modulation is Sequential(SiLU, Linear) applied to c: the SiLU is computed once here.
        c_act, c_csilu = silu_forward(temb + yemb)  # (N, D)
        block_caches = []
        for i in range(self.depth):
            h, bc = block_forward(h, c_act, P, f"blocks.{i}.", self.num_heads)
            block_caches.append(bc)
        h, c_final = final_layer_forward(h, c_act, P)
        out = unpatchify(h, self.patch_size, self.out_channels)
        return out, DiTCache(c_patch, c_t1, c_tsilu, c_t2, c_y, c_csilu, block_caches, c_final)

    def backward(self, dout, cache, return_dx=False):
        """dout (N, C_out, H, W) -> grads: name -> gradient for every trainable parameter
        (and the input gradient dx too, as (grads, dx), when return_dx=True)."""
        grads = {}
        dh = unpatchify_backward(dout, self.patch_size)
        dh, dc_act = final_layer_backward(dh, cache.final, grads)
        for i in reversed(range(self.depth)):
            dh, dc_i = block_backward(dh, cache.blocks[i], f"blocks.{i}.", grads)
            dc_act += dc_i  # c feeds every block: its gradients add up
        dc = silu_backward(dc_act, cache.c_silu)  # c = temb + yemb, so both receive dc
        grads["y_embedder.embedding_table.weight"] = embedding_backward(dc, cache.y_emb)
        dtemb, grads["t_embedder.mlp.2.weight"], grads["t_embedder.mlp.2.bias"] = linear_backward(dc, cache.t_fc2)
        dtemb = silu_backward(dtemb, cache.t_silu)
        _, grads["t_embedder.mlp.0.weight"], grads["t_embedder.mlp.0.bias"] = linear_backward(dtemb, cache.t_fc1)
        dx, grads["x_embedder.proj.weight"], grads["x_embedder.proj.bias"] = patch_embed_backward(dh, cache.patch)
        grads = {k: grads[k] for k in self.trainable()}  # official order
        return (grads, dx) if return_dx else grads
