"""The built-in data: digits 0-9 rendered with Pillow's bundled font, varied in size, slant, rotation, position and
stroke, and warped a little like handwriting. Deterministic from a seed; no download. minidit.data caches them.

    images, labels = render_digits(n_per_class=1000, image_size=16, seed=0)   # uint8 (N, H, W), int64 (N,)

Needs Pillow >= 10.1 (the scalable bundled font behind `ImageFont.load_default(size=...)`).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

DIGITS_VERSION = 1  # part of the cache file name: bump it whenever the renderer changes
_DIGITS_STREAM = 1  # digit shapes come from default_rng([seed, 0, 1]) (see the stream tags in minidit.data)

# The random variation of each rendered digit (uniform ranges). Tuned by eye on data/digits_preview.png:
# every digit stays legible, no two samples are alike.
DIGIT_RANGES = dict(
    height=(0.55, 0.80),      # ink height as a fraction of the image side
    aspect=(0.85, 1.15),      # extra horizontal stretch
    rotation=(-12.0, 12.0),   # degrees, counter-clockwise
    shear=(-0.20, 0.20),      # horizontal shear, > 0 leans the top to the right: slanted "handwriting"
    shift=(-0.6, 0.6),        # fraction of the free margin on each side, per axis
    stroke=(0.0, 0.032),      # extra stroke width as a fraction of the font size (rounded to whole pixels)
    warp=(0.0, 0.025),        # std of the smooth random displacement, as a fraction of the image side
    blur=(0.0, 0.5),          # Gaussian blur radius in output pixels
    brightness=(0.80, 1.00),  # peak intensity of the (white) digit on black
)
_SUPERSAMPLE = 2  # each digit is drawn at 2x the output size and BOX-reduced (anti-aliasing)
_WARP_GRID = 4    # the smooth displacement is bilinear between (4+1) x (4+1) random nodes


def _master_glyphs(font_size):
    """{(digit, stroke): (glyph as a PIL "L" image, ink center (x, y), ink height)} for every stroke width in
    whole pixels that DIGIT_RANGES allows at this font size."""
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError as e:  # Pillow < 10.1: load_default() takes no size
        raise RuntimeError("the digits dataset needs Pillow >= 10.1 for its scalable bundled font: "
                           "pip install -U pillow") from e
    side = 2 * font_size
    glyphs = {}
    for digit in range(10):
        for stroke in range(round(DIGIT_RANGES["stroke"][1] * font_size) + 1):
            img = Image.new("L", (side, side), 0)
            draw = ImageDraw.Draw(img)
            draw.text((side / 2, side / 2), str(digit), fill=255, font=font, anchor="mm",
                      stroke_width=stroke, stroke_fill=255)
            if digit == 1:
                _add_foot(img, draw)
            x0, y0, x1, y1 = img.getbbox()  # ink bounding box
            glyphs[digit, stroke] = (img, ((x0 + x1) / 2, (y0 + y1) / 2), y1 - y0)
    return glyphs


def _add_foot(img, draw):
    """Give the font's "1" a base bar, as in many handwritten and printed 1s: the bundled font's 1 has a long flag,
    and once slanted and rotated a bare 1 is easily taken for a 7."""
    x0, y0, x1, y1 = img.getbbox()
    row = np.asarray(img)[y1 - 2]                      # second-lowest ink row: crosses only the stem, (side,)
    stem = np.flatnonzero(row >= row.max() / 2)
    center, width = (stem[0] + stem[-1] + 1) / 2, stem[-1] + 1 - stem[0]
    half = 0.27 * (y1 - y0)                            # the foot spans about half the digit's height
    draw.rectangle((center - half, y1 - 0.85 * width, center + half, y1 - 1), fill=255)


def _sample_digit_params(rng, n):
    """Draw the random variation of n digits at once, so the result does not depend on rendering order."""
    p = {name: rng.uniform(*DIGIT_RANGES[name], size=n)
         for name in ("height", "aspect", "rotation", "shear", "stroke", "warp", "blur", "brightness")}
    p["shift"] = rng.uniform(*DIGIT_RANGES["shift"], size=(n, 2))
    p["warp_noise"] = rng.standard_normal(size=(n, _WARP_GRID + 1, _WARP_GRID + 1, 2))
    return p


def _render_one(glyph, center, ink_height, image_size, p, i):
    """One digit: warp the master glyph onto a supersampled canvas with a single PIL mesh transform, reduce, blur."""
    side = image_size * _SUPERSAMPLE  # canvas side
    # Forward map, glyph -> canvas: q = A (g - center) + t, with A = rotation @ shear @ scale.
    sy = p["height"][i] * side / ink_height
    sx = sy * p["aspect"][i]
    th = math.radians(p["rotation"][i])
    rot = np.array([[math.cos(th), math.sin(th)], [-math.sin(th), math.cos(th)]])  # y points down: ccw on screen
    shear = np.array([[1.0, -p["shear"][i]], [0.0, 1.0]])  # x -= shear * y; y grows downward, so the top moves right
    A = rot @ shear @ np.diag([sx, sy])                                                # (2, 2)
    margin = (1.0 - p["height"][i]) / 2 * side
    t = side / 2 + p["shift"][i] * margin                                              # (2,) canvas position
    # Inverse map at the mesh nodes, canvas -> glyph; the random node displacement makes the warp "elastic".
    nodes = np.linspace(0, side, _WARP_GRID + 1)
    q = np.stack(np.meshgrid(nodes, nodes, indexing="xy"), axis=-1)                    # (G+1, G+1, 2) as (x, y)
    q = q + p["warp_noise"][i] * p["warp"][i] * side
    g = (q - t) @ np.linalg.inv(A).T + np.asarray(center)                              # (G+1, G+1, 2) glyph coords
    mesh = []
    step = side / _WARP_GRID
    for r in range(_WARP_GRID):
        for c in range(_WARP_GRID):
            box = (round(c * step), round(r * step), round((c + 1) * step), round((r + 1) * step))
            # source quad corners in PIL's order: upper-left, lower-left, lower-right, upper-right
            quad = (*g[r, c], *g[r + 1, c], *g[r + 1, c + 1], *g[r, c + 1])
            mesh.append((box, quad))
    img = glyph.transform((side, side), Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR)
    img = img.reduce(_SUPERSAMPLE)  # BOX filter down to image_size
    if p["blur"][i] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(float(p["blur"][i])))
    return (np.asarray(img, dtype=np.float32) * p["brightness"][i]).round().astype(np.uint8)  # (H, W)


def digit_params(n_per_class, seed=0):
    """The per-image variation render_digits(n_per_class, image_size, seed) draws, without rendering anything:
    (params, labels), params = name -> (N,) array (shift: (N, 2) as (x, y) fractions of the free margin; warp_noise:
    (N, G+1, G+1, 2)), labels int64 (N,) cycling 0..9. The same for every image_size (the stroke width in pixels is
    round(stroke * font_size), font_size = digit_font_size(image_size)). The 7s' lean is already folded in."""
    n = 10 * n_per_class
    labels = np.tile(np.arange(10, dtype=np.int64), n_per_class)  # (N,)
    params = _sample_digit_params(np.random.default_rng([seed, 0, _DIGITS_STREAM]), n)
    # A 7 whose top leans left stands its diagonal stroke upright and starts to look like a 1: 7s only lean right.
    seven = labels == 7
    params["rotation"][seven] = -np.abs(params["rotation"][seven])  # clockwise
    params["shear"][seven] = np.abs(params["shear"][seven])         # top to the right
    return params, labels


def digit_font_size(image_size):
    """The font size of the master glyphs at this output size (they are about as large as the digits they become)."""
    return _SUPERSAMPLE * image_size


def render_digits(n_per_class, image_size=32, seed=0, progress=True):
    """Render n_per_class images of each digit 0-9 (white on black), deterministically from seed.

    Returns images uint8 (N, H, W) and labels int64 (N,) with N = 10 * n_per_class; labels cycle 0, 1, ..., 9, 0, ...
    """
    if image_size < 8 or n_per_class < 1:
        raise ValueError(f"digits need image_size >= 8 and n_per_class >= 1, got {image_size} and {n_per_class}")
    n = 10 * n_per_class
    params, labels = digit_params(n_per_class, seed)
    font_size = digit_font_size(image_size)
    glyphs = _master_glyphs(font_size)
    strokes = np.round(params["stroke"] * font_size).astype(int)  # (N,) whole pixels
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    for i in tqdm(range(n), desc="rendering digits", unit="img", delay=2, disable=not progress):
        glyph, center, ink_height = glyphs[int(labels[i]), int(strokes[i])]
        images[i] = _render_one(glyph, center, ink_height, image_size, params, i)
    return images, labels


# ----------------------------------------------------------------------------------------------------------------
# Clips: one digit moving in a straight line and bouncing off the borders; some also rotate or grow
# ----------------------------------------------------------------------------------------------------------------
CLIPS_VERSION = 1  # part of the clips cache's file name: bump it whenever the clip renderer changes
_CLIPS_STREAM = 6  # the motion of clip i comes from default_rng([seed, 0, 6])
CLIP_RANGES = dict(
    height=(0.55, 0.68),   # ink height at the first frame, as a fraction of the side (the still digits': 0.55-0.80)
    speed=(0.12, 0.30),    # per frame, in units of the free margin on each side (1 = from the centre to a border)
    spin=(1.5, 3.0),       # degrees per frame, for the clips that rotate (either way)
    growth=(0.008, 0.015),  # relative growth of the height per frame, for the clips that grow
)
MOTIONS = ("moving", "rotating", "growing")  # every clip moves; a third of them also rotate, a third grow


def bounce(x):
    """Reflect positions into [-1, 1]: a point moving at constant speed between two walls."""
    return 1 - np.abs((x + 1) % 4 - 2)


def clip_motion(n_per_class, num_frames, seed=0):
    """The motion of each clip, a pure function of its arguments: dict of float arrays (N, F) height, rotation (deg,
    added to the digit's own), shift (N, F, 2) in units of the free margin, and motion int64 (N,) indexing MOTIONS."""
    n = 10 * n_per_class
    rng = np.random.default_rng([seed, 0, _CLIPS_STREAM])
    start = rng.uniform(-0.8, 0.8, size=(n, 2))
    angle = rng.uniform(0, 2 * np.pi, size=n)
    speed = rng.uniform(*CLIP_RANGES["speed"], size=n)
    motion = rng.integers(0, len(MOTIONS), size=n)
    spin = rng.uniform(*CLIP_RANGES["spin"], size=n) * rng.choice([-1.0, 1.0], size=n) * (motion == 1)
    growth = rng.uniform(*CLIP_RANGES["growth"], size=n) * (motion == 2)
    height = rng.uniform(*CLIP_RANGES["height"], size=n)
    k = np.arange(num_frames, dtype=np.float64)  # (F,)
    velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (N, 2)
    shift = bounce(start[:, None, :] + k[None, :, None] * velocity[:, None, :])  # (N, F, 2)
    return dict(height=height[:, None] * (1 + growth[:, None]) ** k, rotation=spin[:, None] * k, shift=shift,
                motion=motion.astype(np.int64))


def render_clips(n_per_class, num_frames=16, image_size=16, seed=0, progress=True):
    """n_per_class clips of each digit: uint8 (N, F, H, W), labels int64 (N,) cycling 0..9, and motion (N,) indexing
    MOTIONS. Each clip's digit has its own shape (the digits' variation, drawn as render_digits draws it) and moves
    as clip_motion says."""
    if image_size < 8 or n_per_class < 1 or num_frames < 1:
        raise ValueError(f"clips need image_size >= 8, n_per_class >= 1 and num_frames >= 1, got {image_size}, "
                         f"{n_per_class} and {num_frames}")
    n = 10 * n_per_class
    params, labels = digit_params(n_per_class, seed + 1)  # other digit shapes than the still digits' of this seed
    m = clip_motion(n_per_class, num_frames, seed)
    font_size = digit_font_size(image_size)
    glyphs = _master_glyphs(font_size)
    strokes = np.round(params["stroke"] * font_size).astype(int)
    clips = np.empty((n, num_frames, image_size, image_size), dtype=np.uint8)
    frame = dict(params)  # the digit's parameters with the motion of one frame swapped in
    for i in tqdm(range(n), desc="rendering clips", unit="clip", delay=2, disable=not progress):
        glyph, center, ink_height = glyphs[int(labels[i]), int(strokes[i])]
        for k in range(num_frames):
            frame["height"] = m["height"][:, k]
            frame["rotation"] = params["rotation"] + m["rotation"][:, k]
            frame["shift"] = m["shift"][:, k]
            clips[i, k] = _render_one(glyph, center, ink_height, image_size, frame, i)
    return clips, labels, m["motion"]
