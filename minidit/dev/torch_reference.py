"""The official DiT and Latte in PyTorch eager, written from the facts (docs/dit-facts.md: facebookresearch/DiT
models.py and diffusion/; maxin-cn/Latte models/latte.py's forward, as TorchLatte's docstring states it): references
to test minidit against and to time it against. Not used by minidit itself; needs `pip install -e ".[torch]"`.

    tm = build_torch_dit(model, torch.float64)     # same architecture and weights as a minidit DiT
    out = tm(x, t, y)                               # (N, C, H, W), (N,), (N,) -> (N, C_out, H, W)
    terms = TorchDiffusion().training_losses(tm, x_start, t, dict(y=y), noise)   # official loss, autograd

    tv = build_torch_latte(video_model, torch.float64)   # a minidit VideoDiT in Latte's layout, the same weights
    out = tv(x, t, y)                               # (N, F, C, H, W) (Latte's layout; minidit's is (N, C, F, H, W))
    terms = TorchDiffusion(channel_dim=2).training_losses(tv, x_start, t, dict(y=y), noise)

TorchLatte is built from the same pieces as TorchDiT (DiTBlock, PatchEmbed, TimestepEmbedder, LabelEmbedder,
FinalLayer, the sin-cos tables), with Latte's parameter names, so an official Latte state dict loads strictly;
unconditional (Latte's extras=1: no label table) when num_classes is 0.

What is the same as facebookresearch/DiT `models.py` + timm: module tree and state_dict names (strict load of a
minidit state dict or an official checkpoint), Conv2d patch embed, qkv laid out [q | k | v] with contiguous heads,
GELU(tanh), LayerNorm(elementwise_affine=False, eps=1e-6), adaLN-Zero blocks, final layer, unpatchify,
the label table with the null class, initialize_weights(), forward_with_cfg() (3 guided channels).
What differs, on purpose (in both models):
  * attention is the manual softmax(q k^T * scale) v (timm's non-fused path), not F.scaled_dot_product_attention,
    so float64 works and the arithmetic is the textbook one;
  * the timestep sinusoid is computed in float32 (official) and then cast to the weights' dtype (the official
    code would fail on a float64 model);
  * forward() takes an optional force_drop_ids (the official forward reaches it only through y_embedder);
  * the diffusion tables are cast to the input's dtype (official: always .float()), so float64 stays float64.

It also writes the test fixture that checks minidit against this reference without torch (llm.c's
gpt2_124M_debug_state.bin):

    python -m minidit.dev.torch_reference --write-fixture tests/fixtures/tiny_dit_f64.npz

Torch is imported at the top of this module: import the module only where torch is wanted (minidit's core never does).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('minidit.dev.torch_reference needs PyTorch: pip install -e ".[torch]"') from e

from ..xp import to_numpy
from ..model import DiTConfig, get_config
from ..video import frame_code, grid_code


# ----------------------------------------------------------------------------------------------
# Pieces (timm's PatchEmbed / Attention / Mlp with plain torch ops)
# ----------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    """x (N, T, D), shift/scale (N, D): x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv2d(C, D, kernel p, stride p) -> (N, D, h, w) -> (N, T, D), tokens row-major."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h*w) -> (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3, NH, hs)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, N, NH, T, hs)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (N, NH, T, T)
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(N, T, D)  # (N, NH, T, hs) -> (N, T, NH, hs) -> (N, T, D)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """float32 [cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / half); a zero column if dim is odd."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label table with one extra row, the null class `num_classes`, when dropout_prob > 0."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero: x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x)))."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # shift first
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class TorchDiT(nn.Module):
    """The official DiT; arguments as minidit.DiT (variant 'S/2', 'DiT-S/2' or a DiTConfig)."""

    def __init__(self, variant="S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1):
        super().__init__()
        cfg = get_config(variant)
        D, p = cfg.hidden_size, cfg.patch_size
        self.learn_sigma, self.in_channels = learn_sigma, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads = p, cfg.num_heads
        self.x_embedder = PatchEmbed(p, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        num_patches = (input_size // p) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, D), requires_grad=False)  # frozen, in state_dict
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        initialize_weights(self)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x, t, y, force_drop_ids=None):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Official guidance: the batch is [cond; uncond], only x's first half is used, channels 0..2 guided."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class TorchLatte(nn.Module):
    """The official Latte (maxin-cn/Latte models/latte.py, class Latte: DiT's blocks over the tokens of one frame and
    over the frames at one position in turn), written from its forward:

        x (N, F, C, H, W) -> (N F, C, H, W) -> patch conv + pos_embed (2-D sin-cos, frozen)   -> (N F, S, D)
        c = t_emb (+ y_emb)  (N, D): per frame (rows (n, f)) for spatial blocks, per position (rows (n, s)) for temporal
        blocks 2i on (N F, S, D); '(b f) t d -> (b t) f d'; after block 0 only + temp_embed (1-D sin-cos over frames,
        frozen); blocks 2i+1 on (N S, F, D); back to (N F, S, D)
        final layer per frame with the spatial c, DiT's unpatchify per frame            -> (N, F, C_out, H, W)

    Arguments as minidit.VideoDiT's; num_classes 0 is Latte's extras=1 (unconditional: no y_embedder, forward takes
    y=None), num_classes > 0 its extras=2 (class-conditional, a null label when class_dropout_prob > 0). The depth
    must be even (the blocks come in spatial-temporal pairs). Parameter names and shapes are Latte's, so a Latte state
    dict loads strictly. Differences from the official code are TorchDiT's (manual attention, float32 sinusoid cast to
    the weights' dtype, forward takes force_drop_ids; Latte's attention_mode "math" scales q k^T where this scales q,
    a difference of rounding); Latte's text-to-video extras (78) and fp16 path are not here."""

    def __init__(self, variant="S/2", input_size=32, num_frames=16, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1):
        super().__init__()
        cfg = get_config(variant)
        if cfg.depth % 2:
            raise ValueError(f"Latte's blocks come in spatial-temporal pairs: depth {cfg.depth} is odd")
        D, p = cfg.hidden_size, cfg.patch_size
        self.in_channels, self.out_channels = in_channels, 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads = p, cfg.num_heads
        self.x_embedder = PatchEmbed(p, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob) if num_classes else None  # extras 2 / 1
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // p) ** 2, D), requires_grad=False)  # (1, S, D)
        self.temp_embed = nn.Parameter(torch.zeros(1, num_frames, D), requires_grad=False)  # (1, F, D)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, self.out_channels)
        initialize_weights(self)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (N, F, C, H, W), t (N,), y (N,) (None when unconditional) -> (N, F, C_out, H, W)."""
        N, F, _, H, W = x.shape
        x = self.x_embedder(x.flatten(0, 1)) + self.pos_embed  # (N F, S, D), rows (n, f)
        S, D = x.shape[1], x.shape[2]
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        elif y is not None:
            raise ValueError("an unconditional Latte (num_classes 0, extras=1) takes no labels: pass y=None")
        c_spatial = c.repeat_interleave(F, dim=0)  # (N F, D), rows (n, f)
        c_temporal = c.repeat_interleave(S, dim=0)  # (N S, D), rows (n, s)
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, c_spatial)  # attention within each frame
            x = x.reshape(N, F, S, D).transpose(1, 2).reshape(N * S, F, D)  # '(b f) t d -> (b t) f d'
            if i == 0:
                x = x + self.temp_embed  # (1, F, D) over (N S, F, D)
            x = self.blocks[i + 1](x, c_temporal)  # attention across the frames at each position
            x = x.reshape(N, S, F, D).transpose(1, 2).reshape(N * F, S, D)  # '(b t) f d -> (b f) t d'
        x = unpatchify(self.final_layer(x, c_spatial), self.patch_size, self.out_channels)  # (N F, C_out, H, W)
        return x.reshape(N, F, self.out_channels, H, W)


def unpatchify(x, p, c):
    """(N, T, p*p*c) -> (N, c, H, W), T = (H/p)^2; each token's vector ordered (p_row, p_col, c)."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


def initialize_weights(model):
    """The official order (DiT's initialize_weights; Latte's is the same plus temp_embed): xavier Linear + zero bias;
    sin-cos pos_embed (and temp_embed where the model has one); xavier patch conv (as (D, C p p)); N(0, 0.02) label
    table (where there is one) and t-MLP weights; zero adaLN modulations; zero final linear."""
    def _basic_init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    model.apply(_basic_init)
    D, T = model.pos_embed.shape[2], model.pos_embed.shape[1]
    model.pos_embed.data.copy_(torch.from_numpy(_sincos_2d(D, int(math.isqrt(T)))).float().unsqueeze(0))
    if hasattr(model, "temp_embed"):
        F = model.temp_embed.shape[1]
        model.temp_embed.data.copy_(torch.from_numpy(_sincos_1d(D, np.arange(F))).float().unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    if getattr(model, "y_embedder", None) is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def _sincos_1d(E, pos):
    """MAE's 1-D sin-cos code (len(pos), E), float64: [sin(pos w), cos(pos w)], w_k = 10000^(-k / (E/2))."""
    omega = 1.0 / 10000 ** (np.arange(E // 2, dtype=np.float64) / (E / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _sincos_2d(D, g):
    """MAE's 2-D sin-cos table (g*g, D), float64: first D/2 dims the 1-D code of the column index, last D/2 of the
    row."""
    grid_w, grid_h = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))  # 'xy': w first
    return np.concatenate([_sincos_1d(D // 2, grid_w), _sincos_1d(D // 2, grid_h)], axis=1)


def build_torch_dit(minidit_model, dtype=torch.float32, device="cpu"):
    """A TorchDiT with minidit_model's architecture and (copied) weights, strictly loaded by name."""
    m, s = minidit_model, minidit_model.spec
    tm = TorchDiT(s.config, input_size=s.input_size, in_channels=s.in_channels, num_classes=s.num_classes,
                  learn_sigma=s.learn_sigma, class_dropout_prob=s.class_dropout_prob).to(dtype=dtype)
    tm.load_state_dict({k: torch.from_numpy(np.array(to_numpy(v))) for k, v in m.params.items()}, strict=True)
    return tm.to(device)


def build_torch_latte(minidit_video_model, dtype=torch.float32, device="cpu"):
    """A TorchLatte with a minidit VideoDiT's architecture and (copied) weights, strictly loaded by Latte's names:
    the (D, C, 1, p, p) patch weight becomes Latte's (D, C, p, p) Conv2d weight, pos_embed and temp_embed are
    minidit's tables (video.grid_code, video.frame_code) at the spec's input_size and num_frames. Only the Latte
    layout has a Latte: temporal_patch 1, factorised attention, frame_code "after-block-0", an even depth."""
    m, s = minidit_video_model, minidit_video_model.spec
    wrong = [f"{name} {got!r} (Latte: {want!r})" for name, got, want in (
        ("temporal_patch", getattr(s, "temporal_patch", None), 1),
        ("attention", getattr(s, "attention", None), "factorised"),
        ("frame_code", getattr(s, "frame_code", None), "after-block-0")) if got != want]
    if wrong:
        raise ValueError("build_torch_latte: this model is not Latte's layout, it has " + ", ".join(wrong))
    D, p = s.config.hidden_size, s.config.patch_size
    tm = TorchLatte(s.config, input_size=s.input_size, num_frames=s.num_frames, in_channels=s.in_channels,
                    num_classes=s.num_classes, learn_sigma=s.learn_sigma,
                    class_dropout_prob=s.class_dropout_prob).to(dtype=dtype)
    state = {k: np.array(to_numpy(v)) for k, v in m.params.items()}
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]  # (D, C, 1, p, p) -> (D, C, p, p)
    g = s.input_size // p
    state["pos_embed"] = grid_code(D, g, g)[None]  # (1, S, D)
    state["temp_embed"] = frame_code(D, s.num_frames)[None, :, 0]  # (1, F, D)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return tm.to(device)


# ----------------------------------------------------------------------------------------------
# The official training loss (GaussianDiffusion.training_losses, loss_type MSE, EPSILON, LEARNED_RANGE)
# ----------------------------------------------------------------------------------------------
def mean_flat(a):
    return a.mean(dim=list(range(1, a.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log of the probability of x's bin (half-width 1/255) under N(means, exp(log_scales)^2); edges open."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class TorchDiffusion:
    """create_diffusion(timestep_respacing="") for training: linear betas 1e-4..0.02 over 1000 steps, no respacing.
    channel_dim: the axis of the channels, which the learned-sigma output splits on: 1 for DiT's (N, C, H, W), 2 for
    Latte's (N, F, C, H, W) clips (Latte's copy of the diffusion code splits on dim 2)."""

    def __init__(self, num_timesteps=1000, channel_dim=1):
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
        ab = np.cumprod(1.0 - betas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.num_timesteps, self.channel_dim = num_timesteps, channel_dim
        self.tables = {
            "sqrt_ab": np.sqrt(ab), "sqrt_1m_ab": np.sqrt(1.0 - ab),
            "sqrt_recip_ab": np.sqrt(1.0 / ab), "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
            "post_logvar_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "post_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "post_coef2": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
            "log_betas": np.log(betas),
        }

    def _extract(self, name, t, like):
        """tables[name][t] as (N, 1, 1, 1) in like's dtype (official: float32 always)."""
        vals = torch.from_numpy(self.tables[name]).to(like.device)[t].to(like.dtype)
        return vals.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x_start, t, noise):
        return self._extract("sqrt_ab", t, x_start) * x_start + self._extract("sqrt_1m_ab", t, x_start) * noise

    def q_posterior(self, x_start, x_t, t):
        mean = self._extract("post_coef1", t, x_t) * x_start + self._extract("post_coef2", t, x_t) * x_t
        return mean, self._extract("post_logvar_clipped", t, x_t)

    def p_mean_variance(self, model_output, x_t, t):
        """Learned range variance, eps prediction, clip_denoised=False."""
        C = x_t.shape[self.channel_dim]
        eps, v = torch.split(model_output, C, dim=self.channel_dim)
        min_log = self._extract("post_logvar_clipped", t, x_t)
        max_log = self._extract("log_betas", t, x_t)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._extract("sqrt_recip_ab", t, x_t) * x_t - self._extract("sqrt_recipm1_ab", t, x_t) * eps
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_var

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, true_logvar = self.q_posterior(x_start, x_t, t)
        mean, log_var = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, log_var)) / math.log(2.0)
        logp = discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_var)
        nll = -mean_flat(logp) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample terms {"mse", "vb", "loss"} (each (N,)); the training loss is terms["loss"].mean()."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        return self.losses_from_output(model(x_t, t, **(model_kwargs or {})), x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise):
        """The body of training_losses after the network call (split out so a benchmark can time it apart)."""
        cd = self.channel_dim
        C = x_t.shape[cd]
        assert model_output.shape[cd] == 2 * C, "the official loss with learn_sigma: the output is [eps | v]"
        eps, v = torch.split(model_output, C, dim=cd)
        frozen_out = torch.cat([eps.detach(), v], dim=cd)  # vb trains the variance channels only
        terms = {"vb": self.vb_terms_bpd(frozen_out, x_start, x_t, t), "mse": mean_flat((noise - eps) ** 2)}
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """ema = decay * ema + (1 - decay) * param, for every named parameter (pos_embed included)."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


# ----------------------------------------------------------------------------------------------
# The fixture: a tiny float64 DiT at random parameters, everything the tests compare, written by this reference
# ----------------------------------------------------------------------------------------------
FIXTURE = dict(depth=2, hidden_size=8, num_heads=2, patch_size=2, input_size=8, in_channels=3, num_classes=5)
FIXTURE_STEPS, FIXTURE_LR, FIXTURE_WD = 5, 1e-3, 0.01


def numpy_sinusoid(t, dim, max_period=10000):
    """The official TimestepEmbedder.timestep_embedding in float32 NumPy: torch's and NumPy's float32 exp and cos
    differ by an ulp (up to ~6e-5 in the embedding at t ~ 1000), so the fixture fixes NumPy's, and what it checks
    is everything after the sinusoid. t: a torch tensor; returns a float32 torch tensor (N, dim)."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    args = t.numpy().astype(np.float32)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return torch.from_numpy(emb)


def write_fixture(path, seed=0):
    """Inputs, weights, output, loss terms, d loss / d output, every parameter gradient and the input gradient of a
    tiny float64 DiT at random parameters, and the losses of FIXTURE_STEPS torch.optim.AdamW steps on that batch."""
    c = FIXTURE
    cfg = DiTConfig(c["depth"], c["hidden_size"], c["num_heads"], c["patch_size"])
    rng = np.random.default_rng(seed)
    tm = TorchDiT(cfg, input_size=c["input_size"], in_channels=c["in_channels"], num_classes=c["num_classes"])
    tm = tm.double().eval()  # eval: no random label dropout (the null class is given as a label instead)
    with torch.no_grad():  # random parameters: at the adaLN-Zero init almost every gradient is exactly zero
        for name, p in tm.named_parameters():
            if name != "pos_embed":
                std = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(math.prod(p.shape[1:]))
                p.copy_(torch.from_numpy(rng.normal(0.0, std, size=tuple(p.shape))))
    params = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    N, C, S = 4, c["in_channels"], c["input_size"]
    x0 = rng.uniform(-1, 1, size=(N, C, S, S))
    x0[0, 0, 0, :2] = [-1.0, 1.0]  # pixels at both edges of [-1, 1]: the t = 0 likelihood's open bins
    noise = rng.standard_normal((N, C, S, S))
    t = np.array([0, 1, 500, 999])  # t = 0 and t > 0: both branches of the variational bound
    y = np.array([0, c["num_classes"], 2, 2])  # the null class and a repeated label
    saved = TimestepEmbedder.timestep_embedding
    TimestepEmbedder.timestep_embedding = staticmethod(numpy_sinusoid)
    try:
        diffusion = TorchDiffusion()
        tt, ty, tx0, tnoise = (torch.from_numpy(a) for a in (t, y, x0, noise))
        x_t = diffusion.q_sample(tx0, tt, tnoise)
        x_in = x_t.clone().requires_grad_(True)  # the network's input: its gradient is the one through the network
        out = tm(x_in, tt, ty)
        out.retain_grad()
        terms = diffusion.losses_from_output(out, tx0, x_t, tt, tnoise)
        loss = terms["loss"].mean()
        loss.backward()
        grads = {f"grad.{k}": p.grad.numpy().copy() for k, p in tm.named_parameters() if p.requires_grad}
        arrays = {"x0": x0, "noise": noise, "t": t, "y": y, "x_t": x_t.detach().numpy(), "out": out.detach().numpy(),
                  "dout": out.grad.numpy(), "dx_t": x_in.grad.numpy(), "loss": loss.detach().numpy(),
                  **{f"terms.{k}": v.detach().numpy() for k, v in terms.items()},
                  **{f"param.{k}": v for k, v in params.items()}, **grads}
        tm.zero_grad()
        opt = torch.optim.AdamW(tm.parameters(), lr=FIXTURE_LR, weight_decay=FIXTURE_WD)
        losses = []
        for _ in range(FIXTURE_STEPS):  # the same batch every step, as llm.c's expected_losses
            opt.zero_grad()
            step_loss = diffusion.training_losses(tm, tx0, tt, {"y": ty}, tnoise)["loss"].mean()
            step_loss.backward()
            opt.step()
            losses.append(step_loss.item())
        arrays["losses"] = np.array(losses)
    finally:
        TimestepEmbedder.timestep_embedding = saved
    meta = dict(c, steps=FIXTURE_STEPS, lr=FIXTURE_LR, weight_decay=FIXTURE_WD, seed=seed, torch=torch.__version__,
                written_by="python -m minidit.dev.torch_reference --write-fixture")
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.dev.torch_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-fixture", metavar="PATH", required=True,
                    help="write the float64 reference fixture (tests/fixtures/tiny_dit_f64.npz) to PATH")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    arrays = write_fixture(args.write_fixture, args.seed)
    n = sum(1 for k in arrays if k.startswith("param."))
    print(f"wrote {args.write_fixture} ({os.path.getsize(args.write_fixture) / 1024:.0f} KiB): {n} parameters, "
          f"loss {float(arrays['loss']):.6f}, {FIXTURE_STEPS} AdamW losses {np.round(arrays['losses'], 6).tolist()}")


__all__ = ["TorchDiT", "build_torch_dit", "TorchLatte", "build_torch_latte", "TorchDiffusion", "update_ema",
           "write_fixture"]

if __name__ == "__main__":
    main()
