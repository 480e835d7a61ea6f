"""What every command line shares: flag types that refuse nonsense while parsing, output paths checked before the
work starts, and one way a user mistake ends a command: one line `error: ...` naming the problem and the fix, exit
status 1, no traceback. (A bug inside minidit still shows its traceback: only the exceptions below mean "your input".)

    ap.add_argument("--steps", type=positive_int, ...)
    out = output_file(args.out, (".png",), "--out")          # before minutes of sampling, not after
    sys.exit(run(main_body, args))
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys

# What a user's input can raise: bad values, files that are missing, unreadable, of the wrong kind, or a disk that is
# full or read-only (OSError), a missing optional dependency or device (RuntimeError), a diverging run.
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)


def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer (>= 1)")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer (>= 0)")
positive_float = _number(float, lambda v: v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0, "a non-negative number")
probability = _number(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
sampling_steps = _number(int, lambda v: 2 <= v <= 1000, "a number of sampling steps in [2, 1000]")


def output_file(path, suffixes, flag):
    """Check, before any work, that `path` can be written as a file of one of `suffixes`; returns it.

    Refuses a folder, a name with another suffix, and a folder that is missing or not writable (naming which)."""
    if path is None:
        return None
    if os.path.isdir(path):
        example = os.path.join(path, "out" + suffixes[0])
        raise IsADirectoryError(f"{flag} {path!r} is a folder; give a file name, e.g. {example!r}")
    if not path.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{flag} {path!r} must end in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the nearest existing parent decides whether the folders can be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{flag} {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"{flag} {path!r}: the folder {existing!r} is not writable; choose another place")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path!r} exists and is not writable")
    return path


def describe(exc):
    """One line for a user error: the message, with what a full or read-only disk means for the user."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{exc}: the disk is full; free some space or write somewhere else (a finished checkpoint is kept)"
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES) and exc.filename:
        return f"{exc}: that place cannot be written; choose another output folder"
    return str(exc)


def run(body, *args, **kwargs):
    """body(*args, **kwargs); a user error becomes `error: <one line>` on stderr and exit status 1 (SystemExit)."""
    try:
        return body(*args, **kwargs)
    except USER_ERRORS as e:
        sys.exit(f"error: {describe(e)}")
