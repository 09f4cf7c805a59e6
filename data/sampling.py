"""The paper's train/val split and single-positive label sampling (docs/protocol.md section 2)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from spl.data.common import SplError
from spl.data.labels import CSR
from spl.data.protocol import LABEL_SEED, SPLIT_SEED, VAL_FRACTION, observed_set_name

DEFAULT_SEED = LABEL_SEED
DEFAULT_VAL_FRACTION = VAL_FRACTION
__all__ = [
    "DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "check_fraction", "check_observed_counts",
    "observe_uniform", "observe_uniform_csr", "observed_set_name", "split_train_val",
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
    labels: np.ndarray,
    num_pos: int = 1,
    num_neg: int = 0,
    seed: int = DEFAULT_SEED,
    *,
    known: np.ndarray | None = None,
) -> np.ndarray:
    """Observed labels in {-1, 0, +1}: per row, ``num_pos`` random positives, ``num_neg`` negatives.

    Parity with the reference formatting: a fresh ``RandomState(seed)`` per label file; per
    row, shuffle the positive indices in place and keep the first ``num_pos``, then shuffle
    the negative indices (this consumes RNG state even when ``num_neg == 0``) and keep the
    first ``num_neg``. ``-1`` keeps all of them. Rows without positives stay all zero.

    With ``known`` (a partially labelled file: ``labels`` in {-1, 0, +1}, ``known`` its
    verified entries) the negatives are the verified negatives only: an unknown entry is
    never observed. Without it every entry that is not positive is a negative.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a [rows, classes] matrix, got shape {labels.shape}")
    if known is not None and np.shape(known) != labels.shape:
        raise ValueError(f"known has shape {np.shape(known)}, labels {labels.shape}")
    check_observed_counts(num_pos, num_neg)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.int8)
    keep = (None if num_pos == -1 else num_pos, None if num_neg == -1 else num_neg)
    for row in range(labels.shape[0]):
        positives = np.nonzero(labels[row] == 1)[0]
        negative = labels[row] != 1 if known is None else (labels[row] != 1) & known[row]
        positives, negatives = _draw(rng, positives, np.nonzero(negative)[0], *keep)
        observed[row, positives] = 1
        observed[row, negatives] = -1
    return observed


def observe_uniform_csr(
    labels: CSR,
    num_pos: int = 1,
    num_neg: int = 0,
    seed: int = DEFAULT_SEED,
    *,
    partial: bool = False,
) -> CSR:
    """:func:`observe_uniform` on a sparse label matrix, with the same draws bit for bit.

    ``labels`` holds +1 for positives and, when ``partial``, -1 for verified negatives
    (absent entries unknown); without ``partial`` every absent entry is a negative. The
    result is the observed set as CSR; memory is in proportion to the stored entries
    (and one row of classes).
    """
    check_observed_counts(num_pos, num_neg)
    rng = np.random.RandomState(seed)
    num_rows, num_classes = labels.shape
    keep = (None if num_pos == -1 else num_pos, None if num_neg == -1 else num_neg)
    positives_per_row = labels.count_per_row(1)
    if partial:
        negatives_per_row = labels.count_per_row(-1)
    else:
        negatives_per_row = num_classes - positives_per_row
    kept = [
        np.minimum(count, k) if k is not None else count
        for count, k in zip((positives_per_row, negatives_per_row), keep, strict=True)
    ]
    indptr = np.concatenate([[0], np.cumsum(kept[0] + kept[1])]).astype(np.int64)
    columns = np.zeros(int(indptr[-1]), dtype=np.int32)
    values = np.zeros(int(indptr[-1]), dtype=np.int8)
    # Each row's positive (and verified negative) columns, ascending, as the dense draw
    # finds them with np.nonzero: split once here rather than masked row by row.
    is_positive = labels.values == 1
    positive_columns = labels.indices[is_positive].astype(np.int64)
    positive_ptr = np.concatenate([[0], np.cumsum(positives_per_row)])
    negative_columns = labels.indices[labels.values == -1].astype(np.int64)
    negative_ptr = np.concatenate([[0], np.cumsum(negatives_per_row)]) if partial else None
    not_positive = np.ones(num_classes, dtype=bool)
    for row in range(num_rows):
        positives = positive_columns[positive_ptr[row] : positive_ptr[row + 1]].copy()
        if partial:
            negatives = negative_columns[negative_ptr[row] : negative_ptr[row + 1]].copy()
        else:  # the complement, ascending, as np.nonzero gives it for a dense row
            not_positive[positives] = False
            negatives = np.flatnonzero(not_positive)
            not_positive[positives] = True
        positives, negatives = _draw(rng, positives, negatives, *keep)
        start, middle = indptr[row], indptr[row] + len(positives)
        columns[start:middle], values[start:middle] = positives, 1
        columns[middle : indptr[row + 1]], values[middle : indptr[row + 1]] = negatives, -1
    rows = np.repeat(np.arange(num_rows), np.diff(indptr))
    return CSR.from_entries(rows, columns, values, (num_rows, num_classes))


def _draw(
    rng: np.random.RandomState,
    positives: np.ndarray,
    negatives: np.ndarray,
    keep_pos: int | None,
    keep_neg: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One row's draw: shuffle the positives, then the negatives, keep the first of each
    (the order of the two shuffles is the reference's; both consume RNG state)."""
    rng.shuffle(positives)
    rng.shuffle(negatives)
    return positives[:keep_pos], negatives[:keep_neg]
