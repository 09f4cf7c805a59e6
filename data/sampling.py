"""The paper's train/val split and single-positive label sampling (paper.md section 2)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from spl.data.common import SplError
from spl.data.protocol import LABEL_SEED, SPLIT_SEED, VAL_FRACTION, observed_set_name

DEFAULT_SEED = LABEL_SEED
DEFAULT_VAL_FRACTION = VAL_FRACTION
__all__ = [
    "DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "check_fraction", "check_observed_counts",
    "observe_uniform", "observed_set_name", "split_train_val",
]  # fmt: skip


def check_fraction(value: float, option: str) -> None:
    """Refuse a split fraction outside the open interval (0, 1), NaN included, naming the
    option as the user typed it: 0 or 1 would leave one side of the split empty."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 < number < 1.0:
        raise SplError(f"{option} must be a fraction in the open interval (0, 1); got {value}")


def check_observed_counts(num_pos: int, num_neg: int) -> None:
    """Refuse observed-label counts no loss can train on, naming the option as typed.

    A set without an observed positive is useless to every single-positive loss, so
    ``num_pos`` is >= 1 (or -1, all); ``num_neg`` may be 0.
    """
    for option, value, least in (("--num-pos", num_pos, 1), ("--num-neg", num_neg, 0)):
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not integral or not (value >= least or value == -1):
            raise SplError(f"{option} must be >= {least}, or -1 for all; got {value}")


def split_train_val(
    num_rows: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split the official training file into (train rows, val rows), both sorted.

    Parity: one ``RandomState(seed).permutation``; val takes the *last* round(f*N) entries.
    5,717 VOC rows give 4,574 / 1,143.
    """
    check_fraction(val_fraction, "--val-fraction")
    rng = np.random.RandomState(seed)
    perm = rng.permutation(num_rows)
    n_val = int(np.round(val_fraction * num_rows))
    n_train = num_rows - n_val
    train = np.sort(perm[:n_train])
    val = np.sort(perm[num_rows - n_val :]) if n_val else np.zeros(0, dtype=perm.dtype)
    return train.astype(np.int64), val.astype(np.int64)


def observe_uniform(
    labels: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """Observed labels in {-1, 0, +1}: per row, ``num_pos`` random positives, ``num_neg`` negatives.

    Parity with the reference formatting: a fresh ``RandomState(seed)`` per label file; per
    row, shuffle the positive indices in place and keep the first ``num_pos``, then shuffle
    the negative indices (this consumes RNG state even when ``num_neg == 0``) and keep the
    first ``num_neg``. ``-1`` keeps all of them. Rows without positives stay all zero.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a [rows, classes] matrix, got shape {labels.shape}")
    check_observed_counts(num_pos, num_neg)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.int8)
    keep_pos = None if num_pos == -1 else num_pos
    keep_neg = None if num_neg == -1 else num_neg
    for row in range(labels.shape[0]):
        positives = np.nonzero(labels[row] == 1)[0]
        rng.shuffle(positives)
        observed[row, positives[:keep_pos]] = 1
        negatives = np.nonzero(labels[row] != 1)[0]
        rng.shuffle(negatives)
        observed[row, negatives[:keep_neg]] = -1
    return observed
