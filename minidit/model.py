"""The DiT model (facebookresearch/DiT `models.py`) with a hand-written backward pass: adaLN-Zero, as published.

Parameters live in one flat dict named exactly like the official state_dict (`blocks.3.attn.qkv.weight`,
Linear weights stored (out, in)), so official checkpoints load by name and every gradient has a name.

    x (N, C, H, W) --patch embed--> (N, T, D) + pos_embed
    t (N,)  --sinusoid(256)--> Linear -> SiLU -> Linear --> (N, D) \
                                                                    +--> c (N, D)
    y (N,)  --label table (null class = num_classes)-----> (N, D) /
    depth x adaLN-Zero block (x, c); final layer (x, c); unpatchify --> (N, C_out, H, W)

The paper's three other ways of feeding t and y to the blocks (adaLN, cross-attention, in-context) are
minidit.conditioning.ConditioningDiT.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from .layers import (
    FREQ_DIM, adaln_backward, adaln_forward, adaln_zero_mlp_backward, adaln_zero_mlp_forward, attention_backward,
    attention_forward, chunks, embedding_backward, embedding_forward, final_layer_backward, final_layer_forward,
    get_2d_sincos_pos_embed, linear_backward, linear_forward, patch_embed_backward, patch_embed_forward, silu_backward,
    silu_forward, timestep_embedder_backward, timestep_embedder_forward, unpatchify, unpatchify_backward,
)
from .contract import Model, Spec, check_array
from .params import LINEAR, linear_shapes, named, take, xavier_uniform
from .xp import get_xp


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The transformer's size: what a variant name such as "S/2" stands for."""
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
    """'S/2', 'DiT-S/2' (official spelling), a DiTConfig or its dict -> DiTConfig."""
    if isinstance(variant, DiTConfig):
        return variant
    if isinstance(variant, dict):
        return DiTConfig(**variant)
    name = str(variant)
    if name.startswith("DiT-"):
        name = name[len("DiT-"):]
    if name not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of: {', '.join(VARIANTS)} "
                         "(the 'DiT-' prefix is optional)")
    return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class DiTSpec(Spec):
    """Every argument that decides a DiT's parameters: stored in each checkpoint, so that one loader rebuilds the
    model (nanoGPT's `GPT(GPTConfig(**checkpoint['model_args']))`)."""
    variant: Any = "S/2"  # a name in VARIANTS ("DiT-" prefix optional) or a DiTConfig (a dict of its fields in JSON)
    input_size: int = 32  # image or latent side H = W
    in_channels: int = 4
    num_classes: int = 1000  # 0: unconditional (no label table, c = t_emb, y None)
    learn_sigma: bool = True  # output 2C channels: noise and the variance interpolation
    class_dropout_prob: float = 0.1  # > 0 adds the null class that guidance uses

    kind = "dit"  # the model family, as checkpoints name it (a class attribute, not a field)

    def __post_init__(self):
        variant = DiTConfig(**self.variant) if isinstance(self.variant, dict) else self.variant
        object.__setattr__(self, "variant", variant if isinstance(variant, DiTConfig) else str(variant))
        cfg = self.config  # an unknown variant name: a clear error here
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if cfg.hidden_size % 4:
            raise ValueError(f"hidden size {cfg.hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
        if self.input_size % cfg.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by the patch size {cfg.patch_size}; "
                             f"use an input size that is a multiple of {cfg.patch_size} or another variant")
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {self.num_classes!r}")

    @property
    def config(self) -> DiTConfig:
        return get_config(self.variant)

    @property
    def out_channels(self):
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self):
        return (self.input_size // self.config.patch_size) ** 2


# ----------------------------------------------------------------------------------------------
# Parameter shapes, counts and FLOPs: all derived from the spec without allocating anything
# ----------------------------------------------------------------------------------------------
def embedder_shapes(spec):
    """The parameters every design shares: patch embedding, pos_embed, timestep MLP, label table (none for an
    unconditional model, num_classes = 0: Latte's extras=1)."""
    s = DiTSpec.of(spec)
    D, p, C = s.config.hidden_size, s.config.patch_size, s.in_channels
    shapes = {
        "pos_embed": (1, s.num_patches, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, FREQ_DIM), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
    }
    if s.num_classes:
        shapes[LABELS] = (s.num_classes + (1 if s.class_dropout_prob > 0 else 0), D)  # + the null class of guidance
    return shapes


def attention_mlp_shapes(prefix, cfg):
    """attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of one block."""
    D, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    return {prefix + "attn.qkv.weight": (3 * D, D), prefix + "attn.qkv.bias": (3 * D,),
            prefix + "attn.proj.weight": (D, D), prefix + "attn.proj.bias": (D,),
            prefix + "mlp.fc1.weight": (hidden, D), prefix + "mlp.fc1.bias": (hidden,),
            prefix + "mlp.fc2.weight": (D, hidden), prefix + "mlp.fc2.bias": (D,)}


def param_shapes(spec, **overrides):
    """name -> shape for every parameter of a DiT, in the official state_dict order.
    spec: a DiTSpec, or a variant name / DiTConfig with the other fields given by keyword."""
    s = DiTSpec.of(spec, **overrides)
    cfg = s.config
    D, p = cfg.hidden_size, cfg.patch_size
    shapes = embedder_shapes(s)
    for i in range(cfg.depth):
        shapes.update(attention_mlp_shapes(f"blocks.{i}.", cfg))
        shapes.update(linear_shapes(f"blocks.{i}.adaLN_modulation.1.", 6 * D, D))
    shapes.update(linear_shapes("final_layer.linear.", p * p * s.out_channels, D))
    shapes.update(linear_shapes("final_layer.adaLN_modulation.1.", 2 * D, D))
    return shapes


def block_macs(cfg, L):
    """Multiply-accumulates of one block's attention and MLP on L tokens."""
    D, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    return (L * D * 3 * D  # qkv
            + 2 * L * L * D  # q k^T and a v, over all heads
            + L * D * D  # proj
            + 2 * L * D * hidden)  # fc1, fc2


def embedder_macs(spec):
    """The patch conv and the timestep MLP, per image."""
    s = DiTSpec.of(spec)
    D, p = s.config.hidden_size, s.config.patch_size
    return s.num_patches * s.in_channels * p * p * D + FREQ_DIM * D + D * D


def forward_macs(spec, **overrides):
    """Multiply-accumulates of one forward pass per image: the paper's "Gflops" column x 1e9.

    Counts matmuls only (patch conv, linears, the attention matmuls), as the paper does;
    LayerNorm, softmax, activations and the label lookup are not counted.
    """
    s = DiTSpec.of(spec, **overrides)
    cfg, T = s.config, s.num_patches
    D, p = cfg.hidden_size, cfg.patch_size
    per_block = block_macs(cfg, T) + D * 6 * D  # + the adaLN regression, once per image
    final = T * D * p * p * s.out_channels + D * 2 * D
    return embedder_macs(s) + cfg.depth * per_block + final


def init_params(shapes, seed, zero_names=("adaLN_modulation", "final_layer.linear")):
    """The official initialize_weights(), on the host in float64 numpy, for the shapes of any design:
    xavier-uniform for every Linear (and the patch conv viewed as (D, C*p*p)), zero biases; N(0, 0.02) for the label
    table and the timestep MLP; fixed sin-cos pos_embed; zeros for every parameter whose name contains one of
    `zero_names` (DiT: every adaLN modulation and the final linear, so every block starts as the identity and the
    output is exactly 0)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        if name.endswith(".bias") or any(z in name for z in zero_names):
            w = np.zeros(shape)
        elif name == "pos_embed":
            w = get_2d_sincos_pos_embed(shape[2], int(math.isqrt(shape[1])))[None]
        elif name.startswith(("y_embedder", "t_embedder")):
            w = rng.normal(0.0, 0.02, size=shape)
        else:
            w = xavier_uniform(rng, shape)
        params[name] = w
    return params


# ----------------------------------------------------------------------------------------------
# The adaLN-Zero block (DiTBlock.forward):
#     shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6, dim=1)
#     x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
#     x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
# ----------------------------------------------------------------------------------------------
ATTN = "attn.qkv.weight attn.qkv.bias attn.proj.weight attn.proj.bias"
MLP = "mlp.fc1.weight mlp.fc1.bias mlp.fc2.weight mlp.fc2.bias"


class BlockCache(NamedTuple):
    modulation: Any  # LinearCache of adaLN_modulation.1, whose input is silu(c) (N, D)
    norm1: Any  # AdaLNCache: LayerNorm, then modulate with shift_msa, scale_msa
    attn: Any  # AttentionCache
    mlp: Any  # AdaLNZeroMLPCache: the attention's gated residual, then the MLP branch


def block_forward(x, c_act, P, prefix, num_heads, head_mask=None, hidden_mask=None):
    """One adaLN-Zero block: x (N, T, D), c_act = silu(c) (N, D), P the params, prefix 'blocks.i.' -> (N, T, D).

    head_mask, hidden_mask (N, NH), optional (Dynamic DiT's gates): the attention's head mask, and the MLP's hidden
    mask over NH groups of 4D / NH units (minidit.layers.attention_forward, mlp_forward)."""
    mod, mod_cache = linear_forward(c_act, *take(P, prefix + "adaLN_modulation.1.", LINEAR))  # (N, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks(mod, 6)
    h, norm1_cache = adaln_forward(x, shift_msa, scale_msa)
    h, attn_cache = attention_forward(h, *take(P, prefix, ATTN), num_heads, head_mask)
    x, mlp_cache = adaln_zero_mlp_forward(x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, *take(P, prefix, MLP),
                                          hidden_mask)
    return x, BlockCache(mod_cache, norm1_cache, attn_cache, mlp_cache)


def block_backward(dout, cache, prefix, grads):
    """Backward of block_forward: writes the block's parameter gradients into `grads`; returns dx, dc_act, and
    dhead_mask, dhidden_mask when the forward had them."""
    dx, dh, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp, *dmlp = adaln_zero_mlp_backward(dout, cache.mlp)
    grads.update(named(prefix, MLP, dmlp[:4]))
    dh, *dattn = attention_backward(dh, cache.attn)
    grads.update(named(prefix, ATTN, dattn[:4]))
    dh, dshift_msa, dscale_msa = adaln_backward(dh, cache.norm1)
    dx = dx + dh  # the residual path plus the branch
    dmod = get_xp(dout).concatenate([dshift_msa, dscale_msa, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp], axis=1)
    dc_act, *dlin = linear_backward(dmod, cache.modulation)  # (N, 6D) -> (N, D)
    grads.update(named(prefix + "adaLN_modulation.1.", LINEAR, dlin))
    return dx, dc_act, *dattn[4:], *dmlp[4:]  # [4:]: the masks' gradients, when given


EMBED_T = "t_embedder.mlp.0.weight t_embedder.mlp.0.bias t_embedder.mlp.2.weight t_embedder.mlp.2.bias"
PATCH = "x_embedder.proj.weight x_embedder.proj.bias"
FINAL = "final_layer.adaLN_modulation.1.weight final_layer.adaLN_modulation.1.bias " \
        "final_layer.linear.weight final_layer.linear.bias"
LABELS = "y_embedder.embedding_table.weight"


class DiTCache(NamedTuple):
    patch: Any  # PatchEmbedCache
    t_embedder: Any  # MLPCache of the timestep embedder
    y_embedder: Any  # EmbeddingCache: the labels after dropout
    c_silu: Any  # SiLUCache of c = t + y
    blocks: list  # one BlockCache per block
    final: Any  # FinalLayerCache


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class DiT(Model):
    """Diffusion Transformer with the official parameter names, shapes, initialisation and forward.

        model = DiT(DiTSpec("S/2", input_size=32, in_channels=4, num_classes=1000), seed=0)
        model = DiT("S/2", input_size=32, in_channels=4, num_classes=1000, seed=0)   # the same
        out, cache = model.forward(x, t, y, train=False)   # (N, C, H, W), (N,), (N,) -> (N, 2C, H, W)
        grads = model.backward(dout, cache)                # name -> gradient, every trainable parameter

    On a multi-core CPU, minidit.threads.ShardedDiT runs the same two calls on shards of the batch at once.
    """

    Spec = DiTSpec
    FROZEN = ("pos_embed",)  # a frozen Parameter in the official model: in the state_dict, never trained
    CLI_NAME = "dit"

    # views on the spec that every forward reads
    config = property(lambda self: self.spec.config)
    depth = property(lambda self: self.spec.config.depth)
    num_heads = property(lambda self: self.spec.config.num_heads)
    patch_size = property(lambda self: self.spec.config.patch_size)
    out_channels = property(lambda self: self.spec.out_channels)

    # -- parameters ------------------------------------------------------------------------------
    def param_shapes(self):
        return param_shapes(self.spec)

    def init_params(self, seed):
        return init_params(self.param_shapes(), seed)

    def gmacs(self):
        """Forward multiply-accumulates per image, in billions (the paper's "Gflops")."""
        return forward_macs(self.spec) / 1e9

    def describe(self):
        return f"{type(self).__name__} {self.spec.variant}"

    @classmethod
    def spec_from_options(cls, args, data):
        return cls.Spec(variant=args.variant, input_size=data.image_size, in_channels=data.channels,
                        num_classes=data.num_classes, learn_sigma=args.learn_sigma,
                        class_dropout_prob=args.class_dropout_prob)

    # -- forward / backward ----------------------------------------------------------------------
    def check_inputs(self, x, t, y):
        """Clear errors for inputs of the wrong shape, dtype, backend or range (before any deep traceback)."""
        s = self.spec
        check_array("x", x, ("N", s.in_channels, s.input_size, s.input_size), self)
        N = x.shape[0]
        check_array("t", t, (N,), self, kinds="iuf")
        self.check_labels(y, N)
        if self.xp is np and N and t.min() < 0:  # value checks read the data: on the host only, never a device sync
            raise ValueError(f"timesteps must be >= 0, got {t.min()}")

    def check_labels(self, y, N):
        """y (N,) labels in [0, num_classes] (num_classes: the null class), or None for an unconditional model."""
        s = self.spec
        if not s.num_classes:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes 0): give y=None")
            return
        check_array("y", y, (N,), self, kinds="iu")
        if self.xp is np and N:  # value checks read the data: done on the host only, never a device sync
            top = s.num_classes + (1 if s.class_dropout_prob > 0 else 0)
            if y.min() < 0 or y.max() >= top:
                raise ValueError(f"labels must lie in [0, {top - 1}] ({s.num_classes} classes"
                                 + (f", {s.num_classes} = the null class" if top > s.num_classes else "")
                                 + f"), got min {y.min()} max {y.max()}")

    def embed(self, x, t, y, train, force_drop_ids, rng):
        """What every design does first. Returns the patch tokens (N, T, D) + pos_embed, the timestep and label
        embeddings (N, D) each, and the three caches.

        Label dropout (Model.drop_condition): train=True replaces each label by the null class num_classes with
        probability class_dropout_prob, drawn from `rng`; force_drop_ids (N,) of 0/1 drops exactly those labels, as
        the official code does for guidance."""
        self.check_inputs(x, t, y)
        P = self.params
        h, patch_cache = patch_embed_forward(x, *take(P, "", PATCH), self.patch_size)
        h += P["pos_embed"]  # (N, T, D)
        temb, yemb, t_cache, y_cache = self.embed_conditions(t, y, train, force_drop_ids, rng)
        return h, temb, yemb, (patch_cache, t_cache, y_cache)

    def embed_conditions(self, t, y, train, force_drop_ids, rng):
        """t (N,) -> temb (N, D) by the timestep MLP; y (N,) -> yemb (N, D) by the label table, after label dropout
        (zeros for an unconditional model, whose c is t alone); and their caches."""
        P = self.params
        temb, t_cache = timestep_embedder_forward(t, *take(P, "", EMBED_T))  # (N, D)
        if not self.spec.num_classes:
            return temb, get_xp(temb).zeros_like(temb), t_cache, None
        y = self.drop_condition(y, train, force_drop_ids, rng)
        yemb, y_cache = embedding_forward(y, P[LABELS])  # (N, D)
        return temb, yemb, t_cache, y_cache

    def embed_conditions_backward(self, dtemb, dyemb, t_cache, y_cache, grads):
        """The timestep MLP's and the label table's gradients (into grads) from those of temb and yemb."""
        if y_cache is not None:
            grads[LABELS] = embedding_backward(dyemb, y_cache)
        grads.update(named("", EMBED_T, timestep_embedder_backward(dtemb, t_cache)))

    def embed_backward(self, dh, dtemb, dyemb, caches, grads):
        """Gradients of embed's parameters from those of its outputs; returns dx (N, C, H, W)."""
        patch_cache, t_cache, y_cache = caches
        self.embed_conditions_backward(dtemb, dyemb, t_cache, y_cache, grads)
        dx, *dpatch = patch_embed_backward(dh, patch_cache)
        grads.update(named("", PATCH, dpatch))
        return dx

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """x (N, C, H, W) float, t (N,) timesteps (DDPM's integer steps, or rectified flow's 1000 t), y (N,) int labels
        -> (out (N, C_out, H, W), cache).

        cache=False (sampling): no activations are kept for a backward pass, so memory holds one block's worth at a
        time instead of all of them; the returned cache is None. Label dropout: see `embed`.
        """
        P = self.params
        h, temb, yemb, embed_caches = self.embed(x, t, y, train, force_drop_ids, rng)
        # c = t + y; every adaLN_modulation is Sequential(SiLU, Linear), so the SiLU is computed once here
        c_act, c_silu_cache = silu_forward(temb + yemb)  # (N, D)
        blocks = []
        for i in range(self.depth):
            h, block_cache = block_forward(h, c_act, P, f"blocks.{i}.", self.num_heads)
            if cache:
                blocks.append(block_cache)
        h, final_cache = final_layer_forward(h, c_act, *take(P, "", FINAL))  # (N, T, p*p*C_out)
        out = unpatchify(h, self.patch_size, self.out_channels)
        return out, (DiTCache(*embed_caches, c_silu_cache, blocks, final_cache) if cache else None)

    def backward(self, dout, cache, return_dx=False, release=False):
        """dout (N, C_out, H, W) -> grads: name -> gradient for every trainable parameter
        (and the input gradient dx too, as (grads, dx), when return_dx=True).

        release=True drops each block's activations from `cache` as soon as its backward is done, so memory falls
        while the gradients fill up (a training step then peaks lower); the cache cannot be used again."""
        grads = {}
        dh = unpatchify_backward(dout, self.patch_size)
        dh, dc_act, *dfinal = final_layer_backward(dh, cache.final)
        grads.update(named("", FINAL, dfinal))
        for i in reversed(range(self.depth)):
            dh, dc_act_i = block_backward(dh, cache.blocks[i], f"blocks.{i}.", grads)
            if release:
                cache.blocks[i] = None
            dc_act += dc_act_i  # c feeds every block: its gradients add up
        dc = silu_backward(dc_act, cache.c_silu)  # c = temb + yemb, so both receive dc
        dx = self.embed_backward(dh, dc, dc, (cache.patch, cache.t_embedder, cache.y_embedder), grads)
        grads = {k: grads[k] for k in self.trainable()}  # official order
        return (grads, dx) if return_dx else grads
