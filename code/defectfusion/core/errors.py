"""User-facing errors.

A `UserError` is a problem with the user's input (a path, a file, a config, a
checkpoint). The CLI prints its message as one line and exits non-zero, with no
traceback. Anything else is a bug and keeps its traceback.
"""

import math


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit code 2."""


# What every reader of an untrusted value (a checkpoint's meta, an export record, a metrics
# file, a COCO record) asks first. JSON's true/false are Python bools, which are ints: a
# count or a size that is a bool is as wrong as one that is a string.


def is_int(v: object) -> bool:
    """An integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float, not a bool (no NaN, no infinity)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# Sane limits on what an untrusted file may ask to allocate (a checkpoint's meta, an export
# record, a text-embeddings file): these values size the model and the evaluation batches.
MAX_CLASSES = 1000
MAX_IMAGE_SIZE = 2048
MAX_TEXT_DIM = 8192
