"""Text prompts -> images: a tiny learned text encoder and the MM-DiT (minidit.mmdit) that reads it.

    ids = tokenize_all(["a small, bold 7", "the digit three"])  # minidit.text: int64 (N, L), 0 = padding
    model = CaptionMMDiT(CaptionMMDiTSpec(), seed=0)       # a 6-layer MM-DiT on 16 px digits, E = 64
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

from .cli import positive_int
from .contract import Model, Spec, check_array
from .layers import embedding_backward, embedding_forward
from .mmdit import MMDiT, MMDiTSpec, POS
from .model import get_config
from .text import MAX_LENGTH, PAD, VOCAB, prompt_digit, tokenize_all
from .xp import get_xp, to_numpy


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
class CaptionMMDiTSpec(Spec):
    """A token table of vocab_size rows of width E feeding an MM-DiT (`transformer`, whose joint_attention_dim and
    pooled_projection_dim are both E: the table gives the context and, as the words' mean, the pooled embedding)."""
    transformer: MMDiTSpec = MMDiTSpec(
        sample_size=16, patch_size=4, in_channels=1, out_channels=1, num_layers=6, attention_head_dim=64,
        num_attention_heads=3, caption_projection_dim=192, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=4)  # pos_embed_max_size = sample_size // patch_size: DiT's integer-grid sin-cos table
    vocab_size: int = len(VOCAB)
    max_length: int = MAX_LENGTH
    caption_dropout_prob: float = 0.1  # > 0: captions replaced by padding, the null condition guidance uses

    kind = "mmdit-captions"

    def __post_init__(self):
        object.__setattr__(self, "transformer", MMDiTSpec.of(self.transformer))  # JSON gives its dict
        t = self.transformer
        for name in ("vocab_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.caption_dropout_prob < 1:
            raise ValueError(f"caption_dropout_prob must lie in [0, 1), got {self.caption_dropout_prob}")
        if t.joint_attention_dim != t.pooled_projection_dim:
            raise ValueError(f"the transformer's joint_attention_dim {t.joint_attention_dim} and pooled_projection_dim "
                             f"{t.pooled_projection_dim} must be equal: one token table gives both")
        if t.out_dim != t.in_channels:
            raise ValueError(f"the transformer's out_channels {t.out_dim} must equal in_channels {t.in_channels}: a "
                             f"caption model predicts the noise or the velocity alone")

    @property
    def embed_dim(self):
        """E: the width of the token embeddings."""
        return self.transformer.joint_attention_dim


class CaptionCache(NamedTuple):
    text: TextEncoderCache
    mmdit: Any  # MMDiTCache


class CaptionMMDiT(Model):
    """Text prompts -> images: token ids (N, L) through the learned table, then MM-DiT. The same calls as DiT
    (forward(x, t, y, ...), backward), with y the token ids and the all-padding caption as the null condition.

        model = CaptionMMDiT(CaptionMMDiTSpec(), seed=0)
        out, cache = model.forward(x, t, tokenize_all(["a 3", "a large 7"]), train=False)
        grads = model.backward(dout, cache)
    """

    Spec = CaptionMMDiTSpec
    FROZEN = (POS,)
    CLI_NAME = "mmdit"
    OPTIONS = ("text_dim",)
    DATA = ("digits-captions",)
    LEARNS_SIGMA = False
    learn_sigma = False  # the velocity (or the noise) alone
    in_channels = property(lambda self: self.spec.transformer.in_channels)

    def __init__(self, spec=None, *, seed=0, dtype=np.float32, backend="numpy", **fields):
        spec = CaptionMMDiTSpec.of(spec, **fields)
        self.mmdit = MMDiT(spec.transformer, seed=seed, dtype=dtype, backend=backend)
        super().__init__(spec, seed=seed, dtype=dtype, backend=backend)

    def init_params(self, seed):
        """The token table: PyTorch's nn.Embedding default N(0, 1), from a stream of its own; the transformer: the
        values MMDiT gave self.mmdit from the same seed (not drawn again)."""
        s = self.spec
        table = np.random.default_rng([seed, 1]).standard_normal((s.vocab_size, s.embed_dim))
        return {TOKENS: table, **{k: to_numpy(v) for k, v in self.mmdit.params.items()}}

    def param_shapes(self):
        return {TOKENS: (self.spec.vocab_size, self.spec.embed_dim), **self.mmdit.param_shapes()}

    def describe(self):
        s, t = self.spec, self.spec.transformer
        return (f"{type(self).__name__} {t.num_layers} layers, {t.num_attention_heads} heads of "
                f"{t.attention_head_dim}, patch {t.patch_size}, text {s.max_length} x {s.embed_dim}")

    def gmacs(self):
        """Forward multiply-accumulates per image of the matmuls (the transformer's Linears and attention), in
        billions: per block and token of either stream 12 D^2 (qkv 3, out 1, FF 8), attention 2 (T + L)^2 D."""
        s, t = self.spec, self.spec.transformer
        D, T, L = t.inner_dim, (t.sample_size // t.patch_size) ** 2, s.max_length
        per_block = 12 * D * D * (T + L) + 2 * (T + L) ** 2 * D + 12 * D * D  # + the modulations (6D x D, twice)
        io = T * t.in_channels * t.patch_size ** 2 * D * 2 + L * s.embed_dim * D
        return (t.num_layers * per_block + io) / 1e9

    def sample_shape(self, n, frames=None, size=None):
        if frames is not None or size is not None:
            raise ValueError("--frames and --size are for a video model")
        side = self.spec.transformer.sample_size
        return (n, self.in_channels, side, side)

    # -- conditions: token ids, and the all-padding caption --------------------------------------
    @property
    def null_condition(self):
        """The unconditional caption: all padding, (L,) int64 (guidance's second half)."""
        return np.zeros(self.spec.max_length, dtype=np.int64)

    @property
    def condition_dropout_prob(self):
        return self.spec.caption_dropout_prob

    def check_conditions(self, y):
        if y.ndim != 2 or y.shape[0] == 0:
            raise ValueError("give at least one prompt (token ids of shape (N, L))")

    def conditions(self, class_labels=None, prompts=None, per_class=1, labelled=False):
        """The prompts (default "a 0" ... "a 9"), each per_class times, as token ids; with labelled=True also the
        digit each names (what minidit.dev.evaluate scores)."""
        if class_labels is not None:
            raise ValueError("this model reads text prompts: give --prompt TEXT (e.g. --prompt 'a large 3'), not "
                             "--class-labels")
        prompts = [p for p in (prompts or [f"a {d}" for d in range(10)]) for _ in range(per_class)]
        y = tokenize_all(prompts, self.spec.max_length)  # an unknown word or a long prompt: a clear error here
        return y, ([prompt_digit(p) for p in prompts] if labelled else None)

    # -- the command line ------------------------------------------------------------------------
    @classmethod
    def add_options(cls, ap):
        ap.add_argument("--text-dim", type=positive_int, default=64,
                        help="--model mmdit: the width E of the learned token embeddings")

    @classmethod
    def spec_from_options(cls, args, data):
        """SD3's MM-DiT sized from --variant (depth, heads of hidden / heads, patch), reading the digits' captions."""
        cfg = get_config(args.variant)
        if data.image_size % cfg.patch_size:
            raise ValueError(f"--variant {args.variant}: patch {cfg.patch_size} does not divide the image size "
                             f"{data.image_size}")
        E = args.text_dim
        transformer = MMDiTSpec(sample_size=data.image_size, patch_size=cfg.patch_size, in_channels=data.channels,
                                out_channels=data.channels, num_layers=cfg.depth,
                                attention_head_dim=cfg.hidden_size // cfg.num_heads, num_attention_heads=cfg.num_heads,
                                caption_projection_dim=cfg.hidden_size, joint_attention_dim=E, pooled_projection_dim=E,
                                pos_embed_max_size=data.image_size // cfg.patch_size)
        return CaptionMMDiTSpec(transformer, caption_dropout_prob=args.class_dropout_prob)

    # -- forward / backward ----------------------------------------------------------------------
    def _transformer(self):
        """The MMDiT reading this model's current parameters (the EMA's too, through `using`)."""
        return self.mmdit.using({k: v for k, v in self.params.items() if k != TOKENS})

    def check_inputs(self, x, t, y):
        """Clear errors for token ids of the wrong shape, dtype, range or backend (x and t: MMDiT checks them)."""
        N = getattr(x, "shape", (None,))[0]
        check_array("y", y, (N, self.spec.max_length), self, kinds="iu", what=" (token ids: minidit.text.tokenize_all)")
        if self.xp is np and y.size and (y.min() < 0 or y.max() >= self.spec.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size - 1}], got min {y.min()} max {y.max()}")

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """x (N, C, H, W), t (N,), y (N, L) token ids -> (out (N, C, H, W), cache). train=True applies caption dropout
        (drawn from rng); force_drop_ids (N,) of 0/1 drops exactly those captions."""
        self.check_inputs(x, t, y)
        y = self.drop_condition(y, train, force_drop_ids, rng)
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
