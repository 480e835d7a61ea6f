"""Data for minidit: three kinds of class-conditional dataset behind one interface, and image output.

    ds = load_dataset("digits")            # built in: rendered digits 0-9, generated once and cached (no download)
    ds = load_dataset("digits-captions")   # the same digits, y = token ids of captions (minidit.text)
    ds = load_dataset("path/to/folder")    # ImageFolder: one sub-folder per class, official DiT preprocessing
    ds = load_dataset("path/to/z.npz")     # precomputed latents: arrays `latents` (N, C, h, w) and `labels` (N,)
    x, y = ds.batch(step, batch_size, seed)   # x float32 (B, C, H, W), in [-1, 1] for images; y int64 (B,)

Everything is loaded into host memory at construction (datasets here are small) and `batch` is a pure function of
(step, batch_size, seed), so a resumed training run sees exactly the batches an uninterrupted one would have.

Official preprocessing (facebookresearch/DiT `train.py`): ADM `center_crop_arr` -> RandomHorizontalFlip ->
ToTensor -> Normalize(0.5, 0.5), i.e. pixels p in 0..255 become p / 127.5 - 1. Samples go back the way
`sample_ddp.py` does it: clamp(127.5 x + 128, 0, 255) -> uint8.

Needs Pillow >= 10.1 (the scalable bundled font behind `ImageFont.load_default(size=...)`) and tqdm.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .digits import CLIPS_VERSION, DIGITS_VERSION, MOTIONS, digit_params, render_clips, render_digits
from .text import MAX_LENGTH, caption_digits, tokenize_all
from .xp import to_numpy

BUILT_IN = ("digits", "digits-captions", "digits-clips")  # rendered here, 16 px by default (other data: 32)
KINDS = {"digits": "--data digits", "digits-captions": "--data digits-captions", "clips": "--data digits-clips",
         "folder": "an image folder", "latents": "latents (.npz)"}  # Dataset.kind -> what --data gives it
MAX_IMAGE_SIZE = 1024  # pixels: DiT's largest is 512; every image of a folder is held in memory at this size
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # as torchvision

# Random streams that never coincide: epoch permutations [seed, epoch], flips [seed, step, 2], digit shapes
# [seed, 0, 1] (minidit.digits), training noise [seed, step, 3] (minidit.train), caption variants [seed, step, 4],
# caption texts [seed, 0, 5]. The tags are non-zero because SeedSequence treats [s, e] and [s, e, 0] as one seed.
_FLIP_STREAM = 2
_CAPTION_CHOICE_STREAM = 4
_CAPTION_TEXT_STREAM = 5
_BUCKET_STREAM = 7


# ------------------------------------------------------------------------------------------------------------------
# The common interface
# ------------------------------------------------------------------------------------------------------------------

class Dataset:
    """An in-memory class-conditional dataset with deterministic, resumable batching.

    data:   uint8 (N, C, H, W) pixels for kind "digits" / "folder"; float32 (N, C, h, w) for kind "latents"
    labels: int64 (N,), values in 0..num_classes-1
    flip:   whether `batch` applies random horizontal flips (the official augmentation; off for digits, whose
            mirror images are not digits, and for latents, which the official pipeline flips before encoding)
    """

    def __init__(self, data, labels, class_names, kind, flip):
        assert data.ndim in (4, 5) and labels.shape == (data.shape[0],), (data.shape, labels.shape)
        self.data = data
        self.labels = labels.astype(np.int64)
        self.class_names = list(class_names)
        self.kind = kind
        self.flip = flip
        self._perm_memo = None  # (seed, epoch, permutation) of the last call: a cache, `batch` stays pure

    def __len__(self):
        return self.data.shape[0]

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def channels(self):
        return self.data.shape[1]

    @property
    def image_size(self):
        return self.data.shape[-1]  # square: H == W (pixel size for images, latent size for latents)

    def __repr__(self):
        return (f"{type(self).__name__}(kind={self.kind!r}, n={len(self)}, num_classes={self.num_classes}, "
                f"channels={self.channels}, image_size={self.image_size}, flip={self.flip})")

    def steps_per_epoch(self, batch_size):
        """Number of full batches per pass over the data (the last partial batch is dropped)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(self)} {self.kind} "
                             f"examples): use a batch size of at most {len(self)}")
        return len(self) // batch_size

    def _permutation(self, seed, epoch):
        if self._perm_memo is None or self._perm_memo[:2] != (seed, epoch):
            perm = np.random.default_rng([seed, epoch]).permutation(len(self))
            self._perm_memo = (seed, epoch, perm)
        return self._perm_memo[2]

    def batch_indices(self, step, batch_size, seed=0):
        """The examples of batch `step`: int (B,) indices, slice k of the permutation of epoch
        step // steps_per_epoch."""
        if step < 0 or seed < 0:
            raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
        epoch, k = divmod(int(step), self.steps_per_epoch(batch_size))
        return self._permutation(int(seed), epoch)[k * batch_size:(k + 1) * batch_size]

    def batch(self, step, batch_size, seed=0):
        """Batch number `step` (0, 1, 2, ...) of an endless shuffled stream; a pure function of its arguments.

        epoch = step // steps_per_epoch: each epoch is a fresh permutation from default_rng([seed, epoch]),
        cut into steps_per_epoch = len // batch_size batches (drop_last). Flips come from
        default_rng([seed, step, 2]). Returns x float32 (B, C, H, W) in [-1, 1] (latents: as stored), y int64 (B,).
        """
        idx = self.batch_indices(step, batch_size, seed)  # (B,)
        x = self.data[idx]    # (B, C, H, W), a copy
        y = self.labels[idx]  # (B,)
        if self.flip:
            flip = np.random.default_rng([seed, step, _FLIP_STREAM]).random(batch_size) < 0.5  # (B,) bool
            x[flip] = x[flip, ..., ::-1]  # mirror along W
        if self.kind == "latents":
            return x.astype(np.float32, copy=False), y
        return from_uint8(x), y


def load_dataset(spec="digits", image_size=32, seed=0, *, channels=3, n_per_class=1000, cache_dir=None, flip=None,
                 frames=None):
    """One entry point for all three kinds of dataset.

    spec: "digits" (the built-in rendered digits) | "digits-captions" (the same, y = caption token ids) |
    "digits-clips" (clips of a moving digit, x (B, C, F, H, W); `frames`: the frame-count buckets) | a folder
    with one sub-folder per class | a .npz of latents.
    image_size: output size for digits and folders (the clips: one or a list of sizes, the size buckets); latents
    keep the spatial size they were encoded at.
    seed: seeds the digit renderer (batch order has its own seed, given to `batch`).
    channels, n_per_class, cache_dir: digits only (the clips: CLIPS_PER_CLASS). flip: override the kind's default.
    """
    def check_size(limit, what):  # latents keep their own size
        for size in np.atleast_1d(image_size).tolist():
            if not 8 <= size <= limit:
                raise ValueError(f"--image-size {size} is out of range: {what} at 8 to {limit} pixels")

    if np.ndim(image_size) and spec != "digits-clips":
        if len(image_size) > 1:
            raise ValueError("several --image-size values are size buckets: they are for --data digits-clips; give "
                             "one size")
        image_size = image_size[0]

    if frames is not None and spec != "digits-clips":
        raise ValueError("--frames chooses the clips' frame counts: it is for --data digits-clips")
    if spec == "digits-clips":
        check_size(64, "the built-in clips are rendered")
        ds = DigitClips(image_size=image_size, cache_dir=cache_dir, seed=seed, frames=frames)
    elif spec in ("digits", "digits-captions"):
        check_size(256, "the built-in digits are rendered")
        kind = Digits if spec == "digits" else DigitCaptions
        ds = kind(image_size=image_size, channels=channels, n_per_class=n_per_class, seed=seed, cache_dir=cache_dir)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            check_size(MAX_IMAGE_SIZE, "image folders are cropped")
            ds = ImageFolder(path, image_size)
        elif path.is_file() and path.suffix == ".npz":
            ds = Latents(path)
        elif path.exists():
            raise ValueError(f"don't know how to read {path}: pass 'digits', a folder with one sub-folder of "
                             f"images per class, or a .npz file of latents")
        else:
            raise FileNotFoundError(f"no dataset at {path}: pass 'digits', a folder with one sub-folder of images "
                                    f"per class, or a .npz file of latents")
    if flip is not None:
        ds.flip = bool(flip)
    return ds


# ------------------------------------------------------------------------------------------------------------------
# 1. Built-in dataset: rendered digits (the renderer is minidit.digits), cached on first use
# ------------------------------------------------------------------------------------------------------------------

def default_cache_dir():
    """The repository's data/ folder if it exists and is writable, else ~/.cache/minidit."""
    repo_data = Path(__file__).resolve().parent.parent / "data"
    if repo_data.is_dir() and os.access(repo_data, os.W_OK):
        return repo_data
    cache = Path.home() / ".cache" / "minidit"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


class Digits(Dataset):
    """The built-in dataset: rendered digits 0-9, cached as data/digits-v1-32px-1000-seed0.npz (uint8 (N, H, W, 1)
    `images`, int64 `labels`). Grayscale, repeated to 3 channels unless channels=1."""

    def __init__(self, image_size=32, channels=3, n_per_class=1000, seed=0, cache_dir=None):
        if channels not in (1, 3):
            raise ValueError(f"digits have 1 or 3 channels, got {channels}")
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / f"digits-v{DIGITS_VERSION}-{image_size}px-{n_per_class}-seed{seed}.npz"
        images = labels = None
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    images, labels = f["images"], f["labels"]
                if images.shape != (10 * n_per_class, image_size, image_size, 1):
                    raise ValueError(f"unexpected shape {images.shape}")
            except Exception as e:  # a damaged cache is rebuilt, not fatal
                warnings.warn(f"rebuilding the digits cache {path}: {e}")
                images = labels = None
        if images is None:
            gray, labels = render_digits(n_per_class, image_size, seed)
            images = gray[..., None]  # (N, H, W, 1)
            try:
                _atomic_write(path, lambda f: np.savez_compressed(f, images=images, labels=labels))
            except OSError as e:  # a read-only place: carry on without a cache
                warnings.warn(f"could not cache the digits at {path}: {e}")
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, 1, H, W)
        if channels == 3:
            data = np.repeat(data, 3, axis=1)                        # (N, 3, H, W)
        super().__init__(data, labels, [str(d) for d in range(10)], kind="digits", flip=False)
        self.cache_path = path


class DigitCaptions(Digits):
    """The built-in digits with captions (minidit.text) instead of labels: `batch` returns x and y = token ids
    int64 (B, L), one of `variants` captions per image, chosen per sample from default_rng([seed, step, 4]).

    texts:  (N, variants) the captions, drawn once from default_rng([render seed, 0, 5]) from the renderer's own
            parameters (minidit.digits.digit_params), so every word is true of its image
    tokens: int64 (N, variants, L) their token ids;  labels: the digits (for evaluation), as Digits'
    """

    def __init__(self, image_size=32, channels=3, n_per_class=1000, seed=0, cache_dir=None, variants=4):
        super().__init__(image_size, channels, n_per_class, seed, cache_dir)
        params, labels = digit_params(n_per_class, seed)
        assert np.array_equal(labels, self.labels), "the digits cache does not match the renderer"
        rng = np.random.default_rng([seed, 0, _CAPTION_TEXT_STREAM])
        self.texts = np.array(caption_digits(params, labels, image_size, rng, variants), dtype=object)
        self.tokens = tokenize_all(self.texts.ravel()).reshape(len(labels), variants, MAX_LENGTH)
        self.kind, self.variants = "digits-captions", variants

    def batch(self, step, batch_size, seed=0):
        """x float32 (B, C, H, W) as Digits.batch, y int64 (B, L) token ids; a pure function of its arguments."""
        x, _ = super().batch(step, batch_size, seed)
        idx = self.batch_indices(step, batch_size, seed)
        pick = np.random.default_rng([seed, step, _CAPTION_CHOICE_STREAM]).integers(self.variants, size=batch_size)
        return x, self.tokens[idx, pick]

    def batch_labels(self, step, batch_size, seed=0):
        """The digits of batch `step` (B,), for evaluation."""
        return self.labels[self.batch_indices(step, batch_size, seed)]


CLIPS_PER_CLASS = 500  # the built-in video data: 5 000 clips (about a minute to render once, then cached)


class DigitClips(Dataset):
    """The built-in video data: clips of one moving digit (minidit.digits.render_clips), cached per frame size as
    data/clips-v1-16px-16f-500-seed0.npz (uint8 `clips` (N, F, H, W), int64 `labels`, `motion`); data (N, 1, F, H, W)
    at the largest size.

    Bucketing (Open-Sora's answer to variable duration and resolution): every batch has one shape, its frame count
    drawn per step from `frames` (default: all the clip's frames) and its size from `image_size` (one size or
    several), each clip a window of that many consecutive frames at a random start, all from
    default_rng([seed, step, 7]); the batch is (B, 1, F_step, S_step, S_step). The sizes hold the same clips (the
    same digits moving the same way), rendered at each resolution. No padding anywhere."""

    def __init__(self, image_size=16, num_frames=16, n_per_class=None, seed=0, cache_dir=None, frames=None):
        n_per_class = n_per_class or CLIPS_PER_CLASS
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.sizes = tuple(sorted(set(np.atleast_1d(image_size).tolist())))
        self.by_size, self.cache_paths = {}, []
        for size in self.sizes:
            path = cache_dir / f"clips-v{CLIPS_VERSION}-{size}px-{num_frames}f-{n_per_class}-seed{seed}.npz"
            self.by_size[size], labels, motion = self._load_or_render(path, n_per_class, num_frames, size, seed)
            self.cache_paths.append(path)
        super().__init__(self.by_size[self.sizes[-1]], labels, [str(d) for d in range(10)], kind="clips", flip=False)
        self.motion, self.motion_names = motion, MOTIONS
        self.frames = tuple(frames) if frames else (num_frames,)
        if max(self.frames) > num_frames or min(self.frames) < 1:
            raise ValueError(f"--frames {' '.join(map(str, self.frames))}: the built-in clips have {num_frames} frames; "
                             f"train on 1 to {num_frames}")

    @staticmethod
    def _load_or_render(path, n_per_class, num_frames, size, seed):
        """The cached clips of one size as uint8 (N, 1, F, S, S), labels, motion; rendered and cached if missing."""
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    clips, labels, motion = f["clips"], f["labels"], f["motion"]
                if clips.shape != (10 * n_per_class, num_frames, size, size):
                    raise ValueError(f"unexpected shape {clips.shape}")
                return clips[:, None], labels, motion
            except Exception as e:  # a damaged cache is rebuilt, not fatal
                warnings.warn(f"rebuilding the clips cache {path}: {e}")
        clips, labels, motion = render_clips(n_per_class, num_frames, size, seed)
        try:
            _atomic_write(path, lambda f: np.savez_compressed(f, clips=clips, labels=labels, motion=motion))
        except OSError as e:
            warnings.warn(f"could not cache the clips at {path}: {e}")
        return clips[:, None], labels, motion

    @property
    def num_frames(self):
        return self.data.shape[2]

    @property
    def shapes(self):
        """The (frames, size) buckets a batch is drawn from."""
        return [(f, s) for f in self.frames for s in self.sizes]

    def __repr__(self):
        return (f"DigitClips(n={len(self)}, frames={self.num_frames} (buckets {', '.join(map(str, self.frames))}), "
                f"image_size={' '.join(map(str, self.sizes))})")

    def batch(self, step, batch_size, seed=0):
        """x float32 (B, 1, F, S, S) in [-1, 1] with F and S from the buckets, y int64 (B,); a pure function of its
        arguments."""
        idx = self.batch_indices(step, batch_size, seed)  # (B,)
        rng = np.random.default_rng([seed, step, _BUCKET_STREAM])
        f = int(self.frames[rng.integers(len(self.frames))])
        start = rng.integers(0, self.num_frames - f + 1, size=batch_size)  # (B,)
        # one size draws nothing: a single-size run's batches do not depend on the bucketing draw
        size = self.sizes[rng.integers(len(self.sizes))] if len(self.sizes) > 1 else self.sizes[0]
        window = start[:, None] + np.arange(f)  # (B, f)
        x = self.by_size[size][idx[:, None], 0, window]  # (B, f, S, S) uint8
        return from_uint8(x[:, None]), self.labels[idx]


# ------------------------------------------------------------------------------------------------------------------
# 2. Image folder (official preprocessing)
# ------------------------------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM's center crop (guided-diffusion, used by DiT's train.py) -> uint8 (image_size, image_size, channels).

    Halve with a BOX filter while the short side is >= 2 * image_size, BICUBIC-resize the short side to
    image_size, then cut the central square with (dim - image_size) // 2 offsets.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil_image)  # (h, w[, C])
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _is_image_file(path):
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


class ImageFolder(Dataset):
    """root/<class_name>/**/<image>: sorted class names -> labels 0..K-1, images RGB, center_crop_arr'd to
    image_size, held in memory as uint8. Unreadable files are skipped with one warning."""

    def __init__(self, root, image_size=32):
        root = Path(root)
        layout = f"put each class's images in its own sub-folder: {root}/<class_name>/<image>.png"
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist; {layout}")
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder; {layout}")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = sorted(f for f in root.iterdir() if _is_image_file(f))
        if not class_dirs:
            if loose:
                raise ValueError(f"{root} holds {len(loose)} images but no class sub-folders; {layout} "
                                 f"(for a single class, move them all into one sub-folder)")
            raise ValueError(f"image folder {root} is empty; {layout}")
        if loose:
            warnings.warn(f"ignoring {len(loose)} images directly in {root}: only images in class sub-folders are used")

        files, labels = [], []
        for label, d in enumerate(class_dirs):
            found = sorted(f for f in d.rglob("*")
                           if _is_image_file(f) and not any(s.startswith(".") for s in f.relative_to(d).parts))
            files += found
            labels += [label] * len(found)
        if not files:
            raise ValueError(f"found no images ({', '.join(IMG_EXTENSIONS)}) in the sub-folders of {root}; {layout}")
        empty = [d.name for label, d in enumerate(class_dirs) if label not in set(labels)]
        if empty:
            raise ValueError(f"class sub-folders without images in {root}: {', '.join(empty)}; "
                             f"add images to them or remove them")

        images, kept, bad = [], [], []
        for f, label in zip(tqdm(files, desc=f"loading {root.name}", unit="img", delay=2), labels):
            try:
                with Image.open(f) as img:
                    images.append(center_crop_arr(img.convert("RGB"), image_size))  # (S, S, 3)
                kept.append(label)
            except (OSError, SyntaxError, ValueError) as e:  # corrupt, truncated or not really an image
                bad.append((f, e))
        if bad:
            f, e = bad[0]
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root}, e.g. {f} ({e})")
        if not images:
            raise ValueError(f"none of the {len(files)} image files in {root} could be read, e.g. {bad[0][0]}")
        data = np.stack(images).transpose(0, 3, 1, 2)  # (N, S, S, 3) -> (N, 3, S, S)
        super().__init__(np.ascontiguousarray(data), np.array(kept), [d.name for d in class_dirs],
                         kind="folder", flip=True)
        self.root = root


# ------------------------------------------------------------------------------------------------------------------
# 3. Precomputed latents
# ------------------------------------------------------------------------------------------------------------------

LATENTS_FORMAT = ("a latents file is an .npz with `latents` float (N, C, h, w) and `labels` int (N,) "
                  "(optional: scalar `num_classes`), e.g. np.savez(path, latents=z, labels=y)")


MAX_CLASSES = 100_000  # a label table larger than this is a mistake in the data, not a dataset (ImageNet: 1000)


def read_npz(path, required, what):
    """{key: array} of an .npz file with at least the `required` keys; a clear ValueError naming the file and what
    it should hold (`what`) for anything else: a missing file, not an .npz, a missing key, a pickled entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; {what}")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"could not read {path} as .npz ({type(e).__name__}: {e}); {what}") from None
    if not hasattr(f, "files"):
        raise ValueError(f"{path} is a single .npy array, not an .npz; {what}")
    with f:
        missing = [k for k in required if k not in f.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(repr(k) for k in missing)} (it has {f.files}); {what}")
        try:
            return {k: f[k] for k in f.files}
        except ValueError as e:  # an object array: np.load refuses to unpickle it
            raise ValueError(f"{path} holds a pickled (object) array, which minidit never loads ({e}); {what}") from None


class Latents(Dataset):
    """Precomputed latents (e.g. 0.18215 * VAE-encoded images), used as stored: no scaling, no flips."""

    def __init__(self, path):
        path = Path(path)
        f = read_npz(path, ("latents", "labels"), LATENTS_FORMAT)
        latents, labels = f["latents"], f["labels"]
        if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating):
            raise ValueError(f"{path}: `latents` must be float (N, C, h, w), got {latents.dtype} {latents.shape}; "
                             f"{LATENTS_FORMAT}")
        if latents.shape[2] != latents.shape[3]:
            raise ValueError(f"{path}: `latents` must be square (h == w), got shape {latents.shape}")
        if labels.shape != (latents.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: `labels` must be int (N,) with N = {latents.shape[0]} to match `latents`, "
                             f"got {labels.dtype} {labels.shape}; {LATENTS_FORMAT}")
        if len(labels) == 0:
            raise ValueError(f"{path} holds no latents")
        if labels.min() < 0:
            raise ValueError(f"{path}: `labels` must be >= 0, found {labels.min()}")
        if "num_classes" in f:
            k = f["num_classes"]
            if k.shape != () or not np.issubdtype(k.dtype, np.integer) or not 1 <= int(k) <= MAX_CLASSES:
                raise ValueError(f"{path}: `num_classes` must be one integer in [1, {MAX_CLASSES}], got {k!r}")
            num_classes = int(k)
            if labels.max() >= num_classes:
                raise ValueError(f"{path}: label {labels.max()} is out of range for num_classes={num_classes}")
        else:  # inferred from the labels: bounded before it sizes a label table
            num_classes = int(labels.max()) + 1
            if num_classes > min(MAX_CLASSES, len(labels)):
                raise ValueError(f"{path}: the largest label is {labels.max()}, but there are {len(labels)} latents"
                                 f"{'' if num_classes <= MAX_CLASSES else f' and at most {MAX_CLASSES} classes'}: "
                                 f"labels must be class numbers 0 .. K-1; store the count as `num_classes` if some "
                                 f"classes have no latents")
        bad = ~np.isfinite(latents)
        if bad.any():
            raise ValueError(f"{path}: `latents` holds {int(bad.sum())} NaN or Inf values (first at index "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}); encode the images again")
        super().__init__(np.ascontiguousarray(latents, dtype=np.float32), labels,
                         [str(k) for k in range(num_classes)], kind="latents", flip=False)
        self.path = path


# ------------------------------------------------------------------------------------------------------------------
# Image output
# ------------------------------------------------------------------------------------------------------------------

def from_uint8(x):
    """uint8 pixels 0..255 -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5): p / 127.5 - 1."""
    return x.astype(np.float32) / 127.5 - 1.0


def to_uint8_nhwc(x):
    """Float images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), as sample_ddp.py: clamp(127.5 x + 128, 0, 255)."""
    x = to_numpy(x)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {x.shape}")
    return np.clip(127.5 * x + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # truncates like .to(uint8)


def tile(imgs, nrow=8, padding=2, scale=None):
    """uint8 images (N, H, W, C) -> one uint8 grid (rows, cols, C): nrow tiles per row, `padding` black pixels between
    and around tiles (the layout of torchvision's save_image); each pixel scale x scale (default: enough to show
    small images at 32 px or more)."""
    scale = max(1, 32 // imgs.shape[1]) if scale is None else scale
    imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = imgs[i]
    return grid


def _pil(grid):
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_grid(x, path, nrow=8, padding=2, scale=None):
    """Write float images (N, C, H, W) in [-1, 1], C = 1 or 3, as one PNG grid (`tile`). Written atomically."""
    imgs = to_uint8_nhwc(x)  # (N, H, W, C)
    if imgs.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {imgs.shape[-1]}")
    img = _pil(tile(imgs, nrow, padding, scale))
    _atomic_write(path, lambda f: img.save(f, format="PNG"))


def clips_to_uint8(x):
    """Float clips (N, C, F, H, W) in [-1, 1] -> uint8 (N, F, H, W, C), each frame as to_uint8_nhwc."""
    x = to_numpy(x)
    if x.ndim != 5:
        raise ValueError(f"expected clips (N, C, F, H, W), got shape {x.shape}")
    N, C, F, H, W = x.shape
    return to_uint8_nhwc(x.transpose(0, 2, 1, 3, 4).reshape(N * F, C, H, W)).reshape(N, F, H, W, C)


def save_gif(x, path, nrow=8, padding=2, scale=None, frame_ms=125):
    """Write float clips (N, C, F, H, W) in [-1, 1] as one animated GIF: frame k is the grid (`tile`) of every
    clip's frame k; looping, frame_ms per frame. Written atomically."""
    clips = clips_to_uint8(x)  # (N, F, H, W, C)
    if clips.shape[-1] not in (1, 3):
        raise ValueError(f"save_gif needs 1 or 3 channels, got {clips.shape[-1]}")
    frames = [_pil(tile(clips[:, k], nrow, padding, scale)) for k in range(clips.shape[1])]
    _atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                 duration=frame_ms, loop=0))


def sample_file(stem, ndim):
    """The file samples of `ndim` axes are written to: stem.png for images (4 axes), stem.gif for clips (5)."""
    return stem + (".gif" if ndim == 5 else ".png")


def save_samples(x, path, nrow=8):
    """Images (N, C, H, W) as a PNG grid (save_grid), clips (N, C, F, H, W) as an animated GIF (save_gif)."""
    (save_gif if x.ndim == 5 else save_grid)(x, path, nrow=nrow)


def samples_to_uint8(x):
    """Images -> uint8 (N, H, W, C), clips -> uint8 (N, F, H, W, C): what sample --npz stores as arr_0."""
    return (clips_to_uint8 if np.ndim(x) == 5 else to_uint8_nhwc)(x)


def save_npz(path, **arrays):
    """np.savez to `path`, written atomically (what minidit.sample --npz and minidit.encode write)."""
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _atomic_write(path, write):
    """Call write(file) on a temporary file next to path, then rename it over path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    # python -m minidit.data: build the default digits and clips caches and (re)draw data/digits_preview.png (one row
    # per class, 16 samples each) and data/clips_preview.gif (one row per class, 6 clips each).
    data_dir = Path(__file__).resolve().parent.parent / "data"

    def first_per_class(ds, k):  # (10 k,) indices: the first k items of each class, class by class
        return np.concatenate([np.flatnonzero(ds.labels == c)[:k] for c in range(ds.num_classes)])

    ds, clips = load_dataset("digits"), load_dataset("digits-clips", image_size=16)
    save_grid(from_uint8(ds.data[first_per_class(ds, 16)]), data_dir / "digits_preview.png", nrow=16)
    save_gif(from_uint8(clips.data[first_per_class(clips, 6)]), data_dir / "clips_preview.gif", nrow=6)
    print(f"{ds}\ncache: {ds.cache_path}\n{clips}\ncache: {clips.cache_paths[0]}\npreviews: {data_dir}")
