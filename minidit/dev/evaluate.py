"""An offline sample-quality score for the built-in digits: `python -m minidit.dev.evaluate samples.npz`.

    result = evaluate(images, labels)      # images uint8 (N, 32, 32, C), C = 1 or 3; labels int (N,) in 0..9
    print(format_table(result))

What it measures. A small digit classifier (an MLP built from minidit.layers, trained here with minidit's AdamW on
the built-in digits, seed 0) looks at each generated image and says which digit it sees:

  * per-class accuracy: the fraction of the images generated for class k that the classifier reads as k. The claim
    "at least 9 of 10 samples per class are recognisable" is `min(per_class_accuracy) >= 0.9`;
  * mean confidence: the mean probability the classifier gives to the *requested* class;
  * a Frechet distance between Gaussians fitted to the classifier's penultimate-layer features (256-d) of the
    samples and of 5 000 real held-out digits (renderer seed 1, never trained on):
        d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)
    (FID's formula, Heusel et al. 2017, on these features instead of Inception's), and the same distance between
    real held-out digits and the same reference set, with the samples' size and label mix: the reference floor.

Limits; read the numbers with these in mind:
  * This is NOT FID and its values are not comparable with any published FID: the features are a digit MLP's, not
    Inception-v3's, and the reference is this repository's rendered digits, not ImageNet.
  * "Recognisable" means recognisable to this classifier. It is trained on the very renderer that made the training
    data (plus shifts of up to 2 px and pixel noise), so it can accept off-manifold images that a person would not
    and reject legible digits in a style the renderer never draws. Its own held-out accuracy (about 99%, stored in
    the cached checkpoint and printed with the table) bounds how well it can tell: a per-class accuracy of 0.9 on
    a few dozen samples is well resolved, 0.99 vs 1.0 is not.
  * The Frechet distance is biased upward at small N (a covariance estimated from N samples in 256-d is noisy; below
    257 samples it is singular), so only compare it with the floor at the same N, or between runs at the same N.
    Features trained to separate classes are insensitive to variation the classifier ignores (texture, exact stroke
    width, colour: images are reduced to gray by the channel mean), so a small distance does not prove the samples
    are diverse or sharp, only that their features are distributed like real digits'.
  * Only 32x32 digit images, 10 classes (other square sizes are resized to 32x32).

Clips (arr_0 uint8 N x F x H x W x C, from a video model): every frame is scored as an image, and the motion of the
clips (their centre of mass's frame-to-frame jumps, the pixels' change) is set against that of real rendered clips:
motion like the real clips' means moving digits, much larger means independent frames flickering, zero a still.

The classifier is trained on first use (1 500 AdamW steps: 30-60 s on 2 CPU cores, with a progress bar) and cached next to the
digits cache as digits-classifier-v{CLASSIFIER_VERSION}-digits-v{DIGITS_VERSION}.npz; afterwards an evaluation
takes well under a second.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import layers as L
from ..checkpoint import CheckpointError, add_prefix, load_checkpoint, save_checkpoint, split_prefix
from ..cli import run
from ..data import default_cache_dir, load_dataset, read_npz
from ..digits import DIGITS_VERSION
from ..optim import AdamW
from ..threads import single_threaded_blas
from ..xp import get_xp

Array = Any  # numpy.ndarray or cupy.ndarray

CLASSIFIER_VERSION = 1  # part of the cache file name: bump it whenever the classifier or its training changes
IMAGE_SIZE = 32
NUM_CLASSES = 10
HELDOUT_SEED = 1  # renderer seed of the held-out digits (training uses seed 0)
_AUG_STREAM = 3   # random stream tag of the augmentation, [seed, step, 3] (data.py uses tags 1 and 2)

# Training recipe of the cached classifier (changing any of these needs a new CLASSIFIER_VERSION).
TRAIN_DEFAULTS = dict(hidden=256, steps=1500, batch_size=128, lr=2e-3, weight_decay=1e-4, warmup=100,
                      max_shift=2, max_noise=0.15, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy: loss = mean_n [ logsumexp(z_n) - z_n[y_n] ]
# ------------------------------------------------------------------------------------------------------------------
class CrossEntropyCache(NamedTuple):
    probs: Array   # (N, K) softmax(z)
    onehot: Array  # (N, K) onehot(y), in the logits' dtype


def cross_entropy_forward(logits, labels):
    """logits (N, K), labels int (N,) -> mean negative log-likelihood (a 0-d array), cache.

    log p_n = z_n[y_n] - m_n - log sum_k exp(z_nk - m_n), m_n = max_k z_nk (shifted so exp never overflows).
    """
    xp = get_xp(logits)
    N, K = logits.shape
    onehot = (labels[:, None] == xp.arange(K)[None, :]).astype(logits.dtype)  # (N, K)
    shifted = logits - logits.max(axis=-1, keepdims=True)                      # (N, K)
    probs = xp.exp(shifted)
    total = probs.sum(axis=-1, keepdims=True)                                   # (N, 1)
    loss = (xp.log(total[:, 0]) - (shifted * onehot).sum(axis=-1)).mean()       # ()
    probs /= total                                                              # softmax(z)
    return loss, CrossEntropyCache(probs, onehot)


def cross_entropy_backward(dloss, cache):
    """dz = dloss * (softmax(z) - onehot(y)) / N: d logsumexp / dz = softmax(z), d z[y] / dz = onehot(y)."""
    probs, onehot = cache
    return (probs - onehot) * (dloss / probs.shape[0])


# ------------------------------------------------------------------------------------------------------------------
# The classifier: x (N, 1024) -> fc1 (N, H) -> GELU -> fc2 (N, H) -> GELU = features -> head (N, 10)
# ------------------------------------------------------------------------------------------------------------------
class ClassifierCache(NamedTuple):
    fc1: L.LinearCache
    gelu1: L.GELUCache
    fc2: L.LinearCache
    gelu2: L.GELUCache
    head: L.LinearCache  # head.x is the (N, H) penultimate features


def init_classifier(hidden=256, seed=0, dtype=np.float32):
    """Parameters named like a torch nn.Module's state_dict: fc1, fc2, head .weight (out, in) / .bias (out,).

    Weights ~ N(0, 1/fan_in) (LeCun normal: unit-variance pre-activations for unit-variance inputs), biases 0.
    """
    rng = np.random.default_rng(seed)
    shapes = {"fc1": (hidden, IMAGE_SIZE * IMAGE_SIZE), "fc2": (hidden, hidden), "head": (NUM_CLASSES, hidden)}
    params = {}
    for name, (fan_out, fan_in) in shapes.items():
        params[f"{name}.weight"] = (rng.standard_normal((fan_out, fan_in)) / math.sqrt(fan_in)).astype(dtype)
        params[f"{name}.bias"] = np.zeros(fan_out, dtype=dtype)
    return params


def classifier_forward(params, x):
    """x (N, 1024) -> logits (N, 10), cache (cache.head.x: the penultimate features (N, H))."""
    h, c1 = L.linear_forward(x, params["fc1.weight"], params["fc1.bias"])   # (N, H)
    h, g1 = L.gelu_forward(h)
    h, c2 = L.linear_forward(h, params["fc2.weight"], params["fc2.bias"])   # (N, H)
    h, g2 = L.gelu_forward(h)
    logits, c3 = L.linear_forward(h, params["head.weight"], params["head.bias"])  # (N, 10)
    return logits, ClassifierCache(c1, g1, c2, g2, c3)


def classifier_backward(dlogits, cache):
    """dlogits (N, 10) -> dict name -> gradient for every parameter (the input gradient is dropped)."""
    grads = {}
    dh, grads["head.weight"], grads["head.bias"] = L.linear_backward(dlogits, cache.head)
    dh = L.gelu_backward(dh, cache.gelu2)
    dh, grads["fc2.weight"], grads["fc2.bias"] = L.linear_backward(dh, cache.fc2)
    dh = L.gelu_backward(dh, cache.gelu1)
    _, grads["fc1.weight"], grads["fc1.bias"] = L.linear_backward(dh, cache.fc1)
    return grads


def preprocess(images):
    """uint8 (N, 32, 32, C), C = 1 or 3 -> float32 (N, 1024) in [-1, 1]: channel mean (gray), p / 127.5 - 1."""
    gray = images.astype(np.float32).mean(axis=-1)      # (N, H, W)
    return (gray / 127.5 - 1.0).reshape(len(images), -1)  # (N, H*W)


def predict(params, x, batch_size=2000):
    """x float (N, 1024) -> probabilities (N, 10) float64 and penultimate features (N, H) float64, in batches."""
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        logits, cache = classifier_forward(params, x[i:i + batch_size])
        p = L.softmax(logits)
        probs.append(p.astype(np.float64))
        feats.append(cache.head.x.astype(np.float64))
    if not probs:
        hidden = params["fc2.weight"].shape[0]
        return np.zeros((0, NUM_CLASSES)), np.zeros((0, hidden))
    return np.concatenate(probs), np.concatenate(feats)


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------
def augment(x, rng, max_shift=2, max_noise=0.15):
    """x float (B, H, W) in [-1, 1] -> a copy shifted by up to max_shift px per axis (the border filled with the black
    background -1), plus Gaussian noise of a per-image std ~ U(0, max_noise), clipped back to [-1, 1]."""
    B, H, W = x.shape
    s = max_shift
    padded = np.full((B, H + 2 * s, W + 2 * s), -1.0, dtype=x.dtype)  # (B, H+2s, W+2s)
    padded[:, s:s + H, s:s + W] = x
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, B))                  # crop offsets; s = no shift
    rows = dy[:, None] + np.arange(H)                                  # (B, H)
    cols = dx[:, None] + np.arange(W)                                  # (B, W)
    out = padded[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W)
    sigma = rng.uniform(0.0, max_noise, size=(B, 1, 1)).astype(x.dtype)
    out += sigma * rng.standard_normal(out.shape, dtype=x.dtype)
    return np.clip(out, -1.0, 1.0, out=out)


def heldout_digits(n_per_class=1000, cache_dir=None):
    """The held-out digits (renderer seed 1): uint8 (N, 32, 32, 1) and int64 labels (N,), labels cycling 0..9."""
    ds = load_dataset("digits", seed=HELDOUT_SEED, channels=1, n_per_class=n_per_class, cache_dir=cache_dir)
    return ds.data.transpose(0, 2, 3, 1), ds.labels  # (N, 1, H, W) -> (N, H, W, 1)


def accuracy(params, images, labels):
    """Fraction of uint8 (N, 32, 32, C) images the classifier assigns to their label."""
    probs, _ = predict(params, preprocess(images))
    return float((probs.argmax(axis=1) == labels).mean())


def train_classifier(hidden=256, steps=1500, batch_size=128, lr=2e-3, weight_decay=1e-4, warmup=100, max_shift=2,
                     max_noise=0.15, seed=0, n_per_class=1000, cache_dir=None, heldout=None, progress=True):
    """Train the digit classifier on the built-in digits (renderer seed 0) with AdamW and light augmentation.

    Learning rate: linear warm-up over `warmup` steps, then a cosine decay to 0. Deterministic given `seed`: batch
    k is ds.batch(k, batch_size, seed) and its augmentation comes from default_rng([seed, k, 3]).
    heldout: (images uint8 NHWC, labels) to measure accuracy on; default heldout_digits(n_per_class, cache_dir).
    Returns (params, info), info: held-out accuracy, training time in seconds, final training loss, recipe.
    """
    ds = load_dataset("digits", seed=0, channels=1, n_per_class=n_per_class, cache_dir=cache_dir)
    params = init_classifier(hidden, seed)
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="training the digits classifier", unit="step", disable=not progress)
    for step in bar:
        frac = (step - warmup) / max(1, steps - warmup)
        opt.lr = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        x, y = ds.batch(step, batch_size, seed)                          # (B, 1, H, W) in [-1, 1], (B,)
        x = augment(x[:, 0], np.random.default_rng([seed, step, _AUG_STREAM]), max_shift, max_noise)
        logits, cache = classifier_forward(params, x.reshape(batch_size, -1))
        loss, ce_cache = cross_entropy_forward(logits, y)
        opt.step(params, classifier_backward(cross_entropy_backward(1.0, ce_cache), cache))
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    train_seconds = time.perf_counter() - t0
    images, labels = heldout if heldout is not None else heldout_digits(n_per_class, cache_dir)
    info = dict(heldout_accuracy=accuracy(params, images, labels), heldout_n=int(len(labels)),
                train_seconds=round(train_seconds, 2), final_loss=float(loss),
                recipe=dict(hidden=hidden, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            warmup=warmup, max_shift=max_shift, max_noise=max_noise, seed=seed,
                            n_per_class=n_per_class))
    return params, info


def classifier_path(cache_dir=None):
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"digits-classifier-v{CLASSIFIER_VERSION}-digits-v{DIGITS_VERSION}.npz"


def load_classifier(cache_dir=None, progress=True):
    """The cached classifier (params, meta); trained with TRAIN_DEFAULTS and cached on first use.

    A damaged or mismatched cache file is retrained with a warning, as data.py does with its digits cache.
    """
    path = classifier_path(cache_dir)
    if path.exists():
        try:
            arrays, meta = load_checkpoint(path)
            params = split_prefix(arrays, "classifier.")
            want = init_classifier(meta["recipe"]["hidden"])
            if meta.get("version") != CLASSIFIER_VERSION or {k: v.shape for k, v in params.items()} != \
                    {k: v.shape for k, v in want.items()}:
                raise CheckpointError(f"unexpected version or shapes (meta {meta})")
            return params, meta
        except (CheckpointError, KeyError, TypeError) as e:
            warnings.warn(f"retraining the digits classifier cached at {path}: {e}")
    params, info = train_classifier(**TRAIN_DEFAULTS, cache_dir=cache_dir, progress=progress)
    meta = dict(version=CLASSIFIER_VERSION, digits_version=DIGITS_VERSION, **info)
    try:
        save_checkpoint(path, add_prefix(params, "classifier."), meta)
    except OSError as e:  # a read-only place: carry on without a cache
        warnings.warn(f"could not cache the digits classifier at {path}: {e}")
    return params, meta


# ------------------------------------------------------------------------------------------------------------------
# Frechet distance between Gaussians
# ------------------------------------------------------------------------------------------------------------------
def sqrtm_psd(a):
    """The symmetric PSD square root of a symmetric PSD matrix: a = V diag(w) V^T  ->  V diag(sqrt(w)) V^T.

    Eigenvalues that rounding made slightly negative are clipped to 0. float64.
    """
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh(0.5 * (a + a.T))  # symmetrise: eigh reads only one triangle
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def feature_stats(features):
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(f)}")
    mu = f.mean(axis=0)
    fc = f - mu
    return mu, fc.T @ fc / (len(f) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1=None):
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)

    sigma1 sigma2 is not symmetric, but it is similar to the symmetric PSD M = s sigma2 s with s = sigma1^1/2
    (the products AB and BA have the same eigenvalues; take A = s, B = s sigma2), so tr sqrt(sigma1 sigma2) = sum of
    sqrt(eigenvalues of M), found with eigh. This also holds for a singular sigma1 (fewer samples than dimensions).
    sqrt_sigma1: sqrtm_psd(sigma1) if already known (to compare many sets with one reference).
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    # One BLAS thread: the symmetric eigensolver makes many small BLAS calls, and with OpenBLAS threads on a machine
    # that other processes keep busy each call's hand-off can cost a scheduler time slice (a 256 x 256 eigh took 1 s
    # instead of 6 ms, OpenMathLib/OpenBLAS#5517). One thread is the fastest at this size anyway.
    with single_threaded_blas():
        s = sqrtm_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
        m = s @ sigma2 @ s
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------
def check_samples(images, labels):
    """Raise ValueError (with what was expected) unless images are uint8 (N, S, S, C), C in (1, 3), N >= 1, and
    labels are integers (N,) in 0..9. Square images of another size S are resized to the classifier's 32 x 32
    (bilinear), so that models trained on, say, 16 x 16 digits can be scored."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) with C = 1 or 3, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got {images.dtype} "
                         f"(convert float images in [-1, 1] with minidit.data.to_uint8_nhwc)")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"the digits classifier needs square images (it resizes them to {IMAGE_SIZE}x{IMAGE_SIZE}), "
                         f"got {images.shape[1]}x{images.shape[2]}")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if images.shape[1] != IMAGE_SIZE:
        images = np.stack([np.asarray(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im)
                                      .resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)).reshape(
                                          IMAGE_SIZE, IMAGE_SIZE, -1) for im in images])
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({len(images)},) to match the images, "
                         f"got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        bad = sorted(set(labels[(labels < 0) | (labels >= NUM_CLASSES)].tolist()))
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES - 1}] (the digit classes), found {bad[:10]}")
    return images, labels.astype(np.int64)


def evaluate(images, labels, classifier=None, heldout=None, num_reference=5000):
    """Score generated digits. images uint8 (N, 32, 32, C), C = 1 or 3; labels (N,) the classes they were asked for.

    classifier: (params, meta) as load_classifier returns; default: the cached one (trained on first use).
    heldout: real (images, labels) to compare with; default heldout_digits(). Its first half (at most num_reference
    images) is the reference set of the Frechet distance; the floor draws, from the disjoint second half, real
    images with the samples' labels (as many per class as the samples have, or as the second half holds).
    Returns a dict:
      n, per_class_n (10,), per_class_accuracy (10,) (None where a class has no sample), accuracy,
      min_class_accuracy, mean_confidence (mean probability of the requested class), frechet_distance,
      reference_frechet_distance (the floor), num_reference, num_floor (None for the distances when N < 2),
      classifier_heldout_accuracy.
    """
    images, labels = check_samples(images, labels)
    params, meta = classifier if classifier is not None else load_classifier()
    real_images, real_labels = heldout if heldout is not None else heldout_digits()

    probs, feats = predict(params, preprocess(images))
    correct = probs.argmax(axis=1) == labels  # (N,)
    per_class_n = np.bincount(labels, minlength=NUM_CLASSES)
    per_class_acc = [float(correct[labels == k].mean()) if per_class_n[k] else None for k in range(NUM_CLASSES)]

    half = len(real_labels) // 2
    ref = np.arange(min(half, num_reference))
    pool_labels = real_labels[half:]
    floor = np.concatenate([half + np.flatnonzero(pool_labels == k)[:per_class_n[k]] for k in range(NUM_CLASSES)])
    _, ref_feats = predict(params, preprocess(real_images[ref]))
    _, floor_feats = predict(params, preprocess(real_images[floor]))
    fd = fd_floor = None
    if len(images) >= 2 and len(floor) >= 2:
        mu_r, sigma_r = feature_stats(ref_feats)
        with single_threaded_blas():  # as in frechet_distance
            sqrt_r = sqrtm_psd(sigma_r)
        fd = frechet_distance(mu_r, sigma_r, *feature_stats(feats), sqrt_sigma1=sqrt_r)
        fd_floor = frechet_distance(mu_r, sigma_r, *feature_stats(floor_feats), sqrt_sigma1=sqrt_r)

    present = [a for a in per_class_acc if a is not None]
    return dict(
        n=int(len(labels)),
        per_class_n=per_class_n.tolist(),
        per_class_accuracy=per_class_acc,
        accuracy=float(correct.mean()),
        min_class_accuracy=float(min(present)),
        mean_confidence=float(probs[np.arange(len(labels)), labels].mean()),
        frechet_distance=fd,
        reference_frechet_distance=fd_floor,
        num_reference=int(len(ref)),
        num_floor=int(len(floor)),
        classifier_heldout_accuracy=meta.get("heldout_accuracy"),
    )


def format_table(r):
    """The result of `evaluate` as Markdown: one row per class, then the totals and the distances."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["| class | n | accuracy |", "| ---: | ---: | ---: |"]
    for k in range(NUM_CLASSES):
        lines.append(f"| {k} | {r['per_class_n'][k]} | {fmt(r['per_class_accuracy'][k])} |")
    lines.append(f"| **all** | **{r['n']}** | **{fmt(r['accuracy'])}** |")
    lines += ["", "| metric | value |", "| --- | ---: |",
              f"| overall accuracy | {fmt(r['accuracy'])} |",
              f"| lowest class accuracy | {fmt(r['min_class_accuracy'])} |",
              f"| mean confidence in the requested class | {fmt(r['mean_confidence'])} |",
              f"| Frechet distance (samples vs {r['num_reference']} real) | {fmt(r['frechet_distance'], '.2f')} |",
              f"| reference: {r['num_floor']} real vs the same {r['num_reference']} real "
              f"| {fmt(r['reference_frechet_distance'], '.2f')} |",
              f"| classifier's own held-out accuracy | {fmt(r['classifier_heldout_accuracy'], '.4f')} |"]
    return "\n".join(lines)


def centres_of_mass(clips):
    """uint8 clips (N, F, H, W, C) -> (N, F, 2) the ink's centre (x, y) in pixels of each frame (channel mean)."""
    ink = clips.astype(np.float64).mean(axis=-1)  # (N, F, H, W)
    total = ink.sum(axis=(2, 3)) + 1e-9
    ys, xs = np.arange(ink.shape[2]), np.arange(ink.shape[3])
    return np.stack([(ink.sum(axis=2) * xs).sum(axis=2) / total, (ink.sum(axis=3) * ys).sum(axis=2) / total], -1)


def motion_stats(clips):
    """Frame-to-frame motion of clips uint8 (N, F, H, W, C): the centre of mass's jumps in pixels (mean, 95th
    percentile) and the mean absolute change of the pixels (0..255) between consecutive frames."""
    jumps = np.linalg.norm(np.diff(centres_of_mass(clips), axis=1), axis=-1)  # (N, F-1)
    change = np.abs(np.diff(clips.astype(np.float64), axis=1)).mean()
    return dict(mean_jump=float(jumps.mean()), p95_jump=float(np.percentile(jumps, 95)), pixel_change=float(change))


def evaluate_clips(clips, labels, reference=None, classifier=None, heldout=None):
    """Score generated clips uint8 (N, F, H, W, C) of the digits `labels` (N,): `evaluate` on every frame (accuracy
    = the fraction of all frames read as the clip's digit), plus the motion of the samples against that of real
    clips of the same shape (`reference`: uint8 clips; default 200 rendered with seed 1, never trained on). Moving
    digits show jumps like the real ones; independent frames flicker (far larger jumps and pixel changes); a frozen
    clip shows none. The classifier reads still digits; its frame accuracy on the real clips (moving, rotated,
    grown) is reported as reference_accuracy, the ceiling to compare with; clip_accuracy is the fraction of clips
    read as their digit in every frame (and reference_clip_accuracy the real clips')."""
    clips, labels = np.asarray(clips), np.asarray(labels)
    if clips.ndim != 5 or len(clips) == 0 or clips.shape[1] < 2:
        raise ValueError(f"clips must be uint8 (N, F, H, W, C) with N >= 1 and F >= 2, got shape {clips.shape}")
    N, F, H, W, C = clips.shape
    classifier = classifier if classifier is not None else load_classifier()
    result = evaluate(clips.reshape(N * F, H, W, C), np.repeat(labels, F), classifier=classifier, heldout=heldout)
    result["clip_accuracy"] = float(frames_read(classifier, clips, labels).all(axis=1).mean())
    if reference is None:
        from ..digits import render_clips

        reference = render_clips(20, F, H, seed=1, progress=False)[0][..., None]  # labels cycle 0..9
    reference = np.asarray(reference)
    ref_labels = np.tile(np.arange(NUM_CLASSES), len(reference) // NUM_CLASSES + 1)[:len(reference)]
    ref_right = frames_read(classifier, reference, ref_labels)  # (rN, rF)
    result["reference_accuracy"] = float(ref_right.mean())
    result["reference_clip_accuracy"] = float(ref_right.all(axis=1).mean())
    result["motion"] = motion_stats(clips)
    result["reference_motion"] = motion_stats(reference)
    result["frames"] = int(F)
    return result


def frames_read(classifier, clips, labels):
    """bool (N, F): whether the classifier reads frame f of clip n (uint8 (N, F, H, W, C)) as the clip's digit."""
    N, F, H, W, C = clips.shape
    frames, frame_labels = check_samples(clips.reshape(N * F, H, W, C), np.repeat(labels, F))
    probs, _ = predict(classifier[0], preprocess(frames))
    return (probs.argmax(axis=1) == frame_labels).reshape(N, F)


def format_clip_table(r):
    """The result of `evaluate_clips` as Markdown: the frame scores, then the motion against real clips."""
    m, ref = r["motion"], r["reference_motion"]
    return "\n".join([format_table(r), "", f"Every frame of {r['n'] // r['frames']} clips of {r['frames']} frames "
                      f"scored; the same classifier reads {r['reference_accuracy']:.3f} of the frames of real clips. "
                      f"Clips read as their digit in every frame: {r['clip_accuracy']:.3f} (real clips: "
                      f"{r['reference_clip_accuracy']:.3f}).",
                      "", "| motion | samples | real clips |", "| --- | ---: | ---: |",
                      f"| mean jump of the centre of mass (px/frame) | {m['mean_jump']:.3f} | {ref['mean_jump']:.3f} |",
                      f"| 95th percentile jump (px/frame) | {m['p95_jump']:.3f} | {ref['p95_jump']:.3f} |",
                      f"| mean pixel change per frame (0..255) | {m['pixel_change']:.2f} | {ref['pixel_change']:.2f} |"])


SAMPLES_FORMAT = ("expected `arr_0` (uint8 N x 32 x 32 x C) and `labels` (N,), as `python -m minidit.sample --npz` "
                  "writes")


def load_samples_npz(path):
    """Read `arr_0` (uint8 N x H x W x C, or clips N x F x H x W x C) and `labels` (N,) from an .npz
    (`python -m minidit.sample --npz`); images are checked here, clips by evaluate_clips."""
    f = read_npz(path, ("arr_0", "labels"), SAMPLES_FORMAT)
    if np.ndim(f["arr_0"]) == 5:
        return np.asarray(f["arr_0"]), np.asarray(f["labels"])
    try:
        return check_samples(f["arr_0"], f["labels"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.dev.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", help=".npz with arr_0 (uint8 N x H x W x C, or clips N x F x H x W x C) and labels (N,)")
    args = ap.parse_args(argv)
    images, labels = run(load_samples_npz, args.samples)
    if images.ndim == 5:
        result = run(evaluate_clips, images, labels)
        print(format_clip_table(result))
    else:
        result = run(evaluate, images, labels)
        print(format_table(result))
    return result


if __name__ == "__main__":
    main()
