"""Text prompts -> images: a tiny learned text encoder and the MM-DiT (minidit.mmdit) that reads it.

    ids = tokenize_all(["a small, bold 7", "the digit three"])  # minidit.text: int64 (N, L), 0 = padding
    model = CaptionMMDiT(CaptionMMDiTSpec(num_layers=2), seed=0)
    out, cache = model.forward(x, t, ids)                       # (N, C, H, W), (N,), (N, L) token ids

Text encoder (in place of SD3's CLIP and T5): a learned table (V, E) of token embeddings,

    context = table[ids]                                     (N, L, E)   padding included (row 0, learned)
    pooled  = sum_l m_l table[ids_l] / max(1, sum_l m_l)     (N, E)      m_l = [ids_l != 0]: the words' mean

and the all-padding caption (context = row 0 everywhere, pooled = 0) is the null condition of classifier-free
guidance: caption dropout replaces the whole caption by padding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from .backend import get_backend
from .layers import embedding_backward, embedding_forward
from .mmdit import MMDiT, MMDiTSpec, POS
from .params import Model
from .text import MAX_LENGTH, PAD, VOCAB
from .xp import get_xp, to_device


# ----------------------------------------------------------------------------------------------
# The text encoder: a learned token table; context = the rows, pooled = the words' mean
# ----------------------------------------------------------------------------------------------
class TextEncoderCache(NamedTuple):
    embedding: Any  # EmbeddingCache of the flattened ids (N*L,)
    mask: Any  # (N, L, 1) 1.0 for a word, 0.0 for padding
    count: Any  # (N, 1) max(1, number of words)


def text_encoder_forward(ids, table):
    """ids (N, L) int, table (V, E) -> context (N, L, E) = table[ids], pooled (N, E) = mean of the words' rows
    (zeros for an all-padding caption), cache."""
    xp = get_xp(table)
    N, L = ids.shape
    rows, emb_cache = embedding_forward(ids.reshape(N * L), table)  # (N*L, E)
    context = rows.reshape(N, L, -1)
    mask = (ids != PAD).astype(table.dtype)[:, :, None]  # (N, L, 1)
    count = xp.maximum(mask.sum(axis=1), 1)  # (N, 1)
    pooled = (context * mask).sum(axis=1) / count  # (N, E)
    return context, pooled, TextEncoderCache(emb_cache, mask, count)


def text_encoder_backward(dcontext, dpooled, cache):
    """dtable (V, E) = onehot(ids)^T (dcontext + m dpooled / count), summed over every occurrence of a token."""
    N, L, E = dcontext.shape
    drows = dcontext + cache.mask * (dpooled / cache.count)[:, None, :]  # (N, L, E)
    return embedding_backward(drows.reshape(N * L, E), cache.embedding)


# ----------------------------------------------------------------------------------------------
# The model: the text encoder + MM-DiT
# ----------------------------------------------------------------------------------------------
TOKENS = "text_encoder.token_embedding.weight"


@dataclasses.dataclass(frozen=True)
class CaptionMMDiTSpec:
    """An MM-DiT (MMDiTSpec's fields, its text widths set to embed_dim) reading token ids through a learned table."""
    sample_size: int = 16
    patch_size: int = 4
    in_channels: int = 1
    num_layers: int = 6
    attention_head_dim: int = 64
    num_attention_heads: int = 3
    pos_embed_max_size: int = 4  # = sample_size // patch_size: DiT's integer-grid sin-cos table
    qk_norm: Any = None
    vocab_size: int = len(VOCAB)
    max_length: int = MAX_LENGTH
    embed_dim: int = 64  # E: the token embeddings' width (MMDiT's joint_attention_dim and pooled_projection_dim)
    caption_dropout_prob: float = 0.1  # > 0: captions replaced by padding, the null condition guidance uses

    kind = "mmdit-captions"

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.caption_dropout_prob < 1:
            raise ValueError(f"caption_dropout_prob must lie in [0, 1), got {self.caption_dropout_prob}")
        self.mmdit_spec  # MMDiTSpec.check: clear errors for the transformer's fields

    @property
    def mmdit_spec(self):
        inner = self.num_attention_heads * self.attention_head_dim
        return MMDiTSpec(sample_size=self.sample_size, patch_size=self.patch_size, in_channels=self.in_channels,
                         num_layers=self.num_layers, attention_head_dim=self.attention_head_dim,
                         num_attention_heads=self.num_attention_heads, joint_attention_dim=self.embed_dim,
                         caption_projection_dim=inner, pooled_projection_dim=self.embed_dim,
                         out_channels=self.in_channels, pos_embed_max_size=self.pos_embed_max_size,
                         qk_norm=self.qk_norm)

    @classmethod
    def of(cls, spec=None, **overrides):
        if spec is None:
            spec = cls()
        elif isinstance(spec, dict):
            spec = cls(**{k: v for k, v in spec.items() if k != "kind"})
        return dataclasses.replace(spec, **overrides) if overrides else spec

    def to_dict(self):
        return {"kind": self.kind, **dataclasses.asdict(self)}


class CaptionCache(NamedTuple):
    text: TextEncoderCache
    mmdit: Any  # MMDiTCache


class CaptionMMDiT(Model):
    """Text prompts -> images: token ids (N, L) through the learned table, then MM-DiT. The same methods as DiT
    (check_inputs, label_dropout, forward(x, t, y, ...), backward), with y the token ids, so minidit.threads,
    minidit.train and minidit.sample drive it as they drive DiT.

        model = CaptionMMDiT(CaptionMMDiTSpec(num_layers=2), seed=0)
        out, cache = model.forward(x, t, tokenize_all(["a 3", "a large 7"]), train=False)
        grads = model.backward(dout, cache)
    """

    FROZEN = (POS,)
    learn_sigma = False  # the velocity (or the noise) alone

    def __init__(self, spec=None, seed=0, dtype=np.float32, backend="numpy", **fields):
        self.spec = s = CaptionMMDiTSpec.of(spec, **fields)
        self.mmdit = MMDiT(s.mmdit_spec, seed=seed, dtype=dtype, backend=backend)
        self.dtype, self.xp = self.mmdit.dtype, get_backend(backend)
        self.in_channels = self.out_channels = s.in_channels
        self.input_size, self.patch_size = s.sample_size, s.patch_size
        self.max_length, self.vocab_size = s.max_length, s.vocab_size
        self.class_dropout_prob = s.caption_dropout_prob  # what guidance checks
        self.rng = np.random.default_rng(seed)  # caption dropout when forward(train=True) gets no rng
        # PyTorch's nn.Embedding default N(0, 1), from its own stream so the transformer's init is MMDiT's own
        table = np.random.default_rng([seed, 1]).standard_normal((s.vocab_size, s.embed_dim))
        self.params = {TOKENS: to_device(table.astype(self.dtype), self.xp), **self.mmdit.params}

    @classmethod
    def from_spec(cls, spec, seed=0, dtype=np.float32, backend="numpy"):
        return cls(CaptionMMDiTSpec.of(spec), seed=seed, dtype=dtype, backend=backend)

    def param_shapes(self):
        return {TOKENS: (self.spec.vocab_size, self.spec.embed_dim), **self.mmdit.param_shapes()}

    @property
    def variant(self):
        s = self.spec
        return (f"{s.num_layers} layers, {s.num_attention_heads} heads of {s.attention_head_dim}, patch {s.patch_size},"
                f" text {s.max_length} x {s.embed_dim}")

    @property
    def null_condition(self):
        """The unconditional caption: all padding, (L,) int64 (guidance's second half)."""
        return np.zeros(self.max_length, dtype=np.int64)

    def gmacs(self):
        """Forward multiply-accumulates per image of the matmuls (the transformer's Linears and attention), in
        billions: per block and token of either stream 12 D^2 (qkv 3, out 1, FF 8), attention 2 (T + L)^2 D."""
        s = self.spec
        D, T, L = s.num_attention_heads * s.attention_head_dim, (s.sample_size // s.patch_size) ** 2, s.max_length
        per_block = 12 * D * D * (T + L) + 2 * (T + L) ** 2 * D + 12 * D * D  # + the modulations (6D x D, twice)
        io = T * s.in_channels * s.patch_size ** 2 * D * 2 + L * s.embed_dim * D
        return (s.num_layers * per_block + io) / 1e9

    def _transformer(self):
        """The MMDiT reading this model's current parameters (the EMA's too, through `using`)."""
        return self.mmdit.using({k: v for k, v in self.params.items() if k != TOKENS})

    def check_inputs(self, x, t, y):
        """Clear errors for token ids of the wrong shape, dtype, range or backend (x and t: MMDiT checks them)."""
        N = getattr(x, "shape", (None,))[0]
        if getattr(y, "shape", None) != (N, self.max_length):
            raise ValueError(f"y must be token ids of shape ({N}, {self.max_length}) (minidit.text.tokenize_all), "
                             f"got {tuple(getattr(y, 'shape', ()))}")
        if y.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got {y.dtype}")
        if get_xp(y) is not self.xp:
            raise TypeError(f"y is a {type(y).__module__} array but the model lives on {self.xp.__name__}")
        if self.xp is np and y.size and (y.min() < 0 or y.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size - 1}], got min {y.min()} max {y.max()}")

    def label_dropout(self, n, rng=None):
        """Caption dropout: (n,) bool on the host, True = the caption replaced by padding (None without dropout)."""
        if self.class_dropout_prob <= 0:
            return None
        return (rng or self.rng).random(n) < self.class_dropout_prob

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """x (N, C, H, W), t (N,), y (N, L) token ids -> (out (N, C, H, W), cache). train=True applies caption dropout
        (drawn from rng); force_drop_ids (N,) of 0/1 drops exactly those captions."""
        self.check_inputs(x, t, y)
        xp = self.xp
        if force_drop_ids is None and train:
            force_drop_ids = self.label_dropout(x.shape[0], rng)
        if force_drop_ids is not None:
            y = xp.where(xp.asarray(force_drop_ids)[:, None] == 1, PAD, y)
        context, pooled, text_cache = text_encoder_forward(y, self.params[TOKENS])
        out, mm_cache = self._transformer().forward(x, t, context, pooled, cache=cache)
        return out, (CaptionCache(text_cache, mm_cache) if cache else None)

    def backward(self, dout, cache, return_dx=False, release=False):
        """dout (N, C, H, W) -> grads for every trainable parameter ((grads, dx) with return_dx); release as
        MMDiT.backward's."""
        grads, d = self._transformer().backward(dout, cache.mmdit, return_dx=True, release=release)
        grads[TOKENS] = text_encoder_backward(d["context"], d["pooled"], cache.text)
        grads = {k: grads[k] for k in self.trainable()}
        return (grads, d["x"]) if return_dx else grads
