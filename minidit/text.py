"""Captions of the built-in digits and their tokenizer: captions read off the renderer's own parameters, a
word-level vocabulary, prompts to token ids and back.

    params, labels = digit_params(n_per_class, seed)            # minidit.digits: what render_digits draws
    captions = caption_digits(params, labels, image_size, rng)  # ["a large 3 on the left", "the digit three", ...]
    ids = tokenize("a small, bold 7")                           # int64 (L,), 0 = padding

Captions. Every attribute a caption states is true of the image, read from the parameters render_digits drew:

    size    from height (the ink height / image side, U(0.55, 0.80)): < 0.63 small, > 0.72 large, else not said
    weight  from the stroke width in whole pixels s = round(stroke * font_size), s_max its largest value:
            s = 0 thin, 2 s > s_max bold, else not said
    tilt    lean = rotation - atan(shear) in degrees (> 0: the top leans left; a shear > 0 moves the top right):
            > 6 tilted left, < -6 tilted right, |lean| < 2.5 upright, else not said
    place   shift (x, y) as fractions of the free margin (y down): x < -0.3 left, > 0.3 right; y < -0.3 top,
            > 0.3 bottom; central: not said

Each attribute has several phrasings, some before the digit ("a small bold 3"), some after ("a 3 with thick strokes,
at the top"); each stated attribute is kept with probability 3/4, and the order of the words before the digit and
of the phrases after it is random, so no attribute has a fixed position. The digit is "3" or "three", after "a",
"an", "the" or nothing, and "digit" or "number" or nothing.

Tokenizer: lowercase, commas dropped, split on spaces; each word's index in VOCAB (index 0 is padding), padded with 0
to MAX_LENGTH. An unknown word or a prompt longer than MAX_LENGTH words is a ValueError.
"""
from __future__ import annotations

import numpy as np

from .digits import DIGIT_RANGES, digit_font_size

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = ("<pad>",  # index 0: padding
         "a", "an", "the", "digit", "number", *(str(d) for d in range(10)), *DIGIT_WORDS,
         "small", "tiny", "large", "big", "written", "thin", "light", "bold", "thick", "with", "strokes", "in",
         "tilted", "leaning", "left", "right", "upright", "straight", "standing", "on", "at", "near", "top", "bottom")
PAD = 0
MAX_LENGTH = 16  # the longest caption caption_digits writes: "the digit three written small with thick strokes ..."
_WORD_INDEX = {w: i for i, w in enumerate(VOCAB)}

# attribute -> value -> (words before the digit, phrases after it)
PHRASES = {
    "size": {"small": (("small", "tiny"), ("written small",)),
             "large": (("large", "big"), ("written large",))},
    "weight": {"thin": (("thin", "light"), ("with thin strokes",)),
               "bold": (("bold", "thick"), ("with thick strokes", "in bold"))},
    "tilt": {"left": ((), ("tilted left", "leaning left")),
             "right": ((), ("tilted right", "leaning right")),
             "upright": (("upright", "straight"), ("standing upright",))},
    "x": {"left": ((), ("on the left", "at the left")),
          "right": ((), ("on the right", "at the right"))},
    "y": {"top": ((), ("at the top", "near the top")),
          "bottom": ((), ("at the bottom", "near the bottom"))},
}
THRESHOLDS = dict(small=0.63, large=0.72, lean=6.0, upright=2.5, shift=0.3)
KEEP_PROB = 0.75  # each true attribute is stated with this probability


def digit_attributes(params, image_size):
    """name -> (N,) array of str, "" where the attribute is not said: size, weight, tilt, x, y (see the module
    docstring for the rules). params: minidit.digits.digit_params's."""
    th = THRESHOLDS
    h = params["height"]
    size = np.where(h < th["small"], "small", np.where(h > th["large"], "large", ""))
    font_size = digit_font_size(image_size)
    s = np.round(params["stroke"] * font_size).astype(int)  # as render_digits rounds it
    s_max = round(DIGIT_RANGES["stroke"][1] * font_size)
    weight = np.where(s == 0, "thin", np.where(2 * s > s_max, "bold", ""))
    lean = params["rotation"] - np.degrees(np.arctan(params["shear"]))  # > 0: top to the left
    tilt = np.where(lean > th["lean"], "left", np.where(lean < -th["lean"], "right",
                                                        np.where(np.abs(lean) < th["upright"], "upright", "")))
    sx, sy = params["shift"][:, 0], params["shift"][:, 1]
    x = np.where(sx < -th["shift"], "left", np.where(sx > th["shift"], "right", ""))
    y = np.where(sy < -th["shift"], "top", np.where(sy > th["shift"], "bottom", ""))
    return dict(size=size, weight=weight, tilt=tilt, x=x, y=y)


def caption(digit, attributes, rng):
    """One caption of `digit` stating some of `attributes` (name -> value, "" = not said), phrasings and order drawn
    from rng."""
    pre, post = [], []
    for name, value in attributes.items():
        if not value or rng.random() >= KEEP_PROB:
            continue
        before, after = PHRASES[name][value]
        options = [("pre", w) for w in before] + [("post", p) for p in after]
        where, words = options[rng.integers(len(options))]
        (pre if where == "pre" else post).append(words)
    rng.shuffle(pre)
    rng.shuffle(post)
    noun = ("", "digit", "number")[rng.integers(3)]
    word = str(digit) if rng.random() < 0.5 else DIGIT_WORDS[digit]
    head = [w for w in (*pre, noun, word) if w]
    article = ("a", "the", "")[rng.integers(3)]
    if article == "a" and head[0][0] in "aeiou8":  # "an eight", "an upright 3", "an 8"
        article = "an"
    text = " ".join(([article] if article else []) + head)
    for phrase in post:
        text += (", " if rng.random() < 0.5 else " ") + phrase
    return text


def caption_digits(params, labels, image_size, rng, variants=1):
    """variants captions of each image: a list (N,) of lists (variants,) of str, drawn from rng in image order."""
    attrs = digit_attributes(params, image_size)
    return [[caption(int(labels[i]), {k: str(v[i]) for k, v in attrs.items()}, rng) for _ in range(variants)]
            for i in range(len(labels))]


def tokenize(text, max_length=MAX_LENGTH):
    """A prompt -> int64 (max_length,) token ids: lowercase, commas dropped, split on spaces, padded with 0."""
    words = str(text).lower().replace(",", " ").split()
    unknown = [w for w in words if w not in _WORD_INDEX or w == VOCAB[PAD]]
    if unknown:
        raise ValueError(f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in the prompt "
                         f"{text!r}; the vocabulary is: {' '.join(VOCAB[1:])}")
    if len(words) > max_length:
        raise ValueError(f"the prompt {text!r} has {len(words)} words; at most {max_length} fit")
    ids = np.zeros(max_length, dtype=np.int64)
    ids[:len(words)] = [_WORD_INDEX[w] for w in words]
    return ids


def tokenize_all(texts, max_length=MAX_LENGTH):
    """Prompts (K,) -> int64 (K, max_length)."""
    return np.stack([tokenize(t, max_length) for t in texts]) if len(texts) else np.zeros((0, max_length), np.int64)


def detokenize(ids):
    """int (L,) token ids -> the words, padding left out."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD)


def prompt_digit(text):
    """The one digit a prompt names (as "3" or "three"); a ValueError unless it names exactly one."""
    words = str(text).lower().replace(",", " ").split()
    found = [int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in words if w.isdigit() or w in DIGIT_WORDS]
    if len(found) != 1:
        raise ValueError(f"the prompt {text!r} names {len(found)} digits ({found}); name exactly one (as '3' or "
                         f"'three') so that the samples can be labelled")
    return found[0]
