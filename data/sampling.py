"""The paper's train/val split and single-positive label sampling (paper.md section 2)."""

from __future__ import annotations

import numpy as np

DEFAULT_SEED = 1200
DEFAULT_VAL_FRACTION = 0.2


def split_train_val(
    num_rows: int, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split the official training file into (train rows, val rows), both sorted.

    Parity: one ``RandomState(seed).permutation``; val takes the *last* round(f*N) entries.
    5,717 VOC rows give 4,574 / 1,143.
    """
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
    for name, value in (("num_pos", num_pos), ("num_neg", num_neg)):
        if value < -1:
            raise ValueError(f"{name} must be >= 0, or -1 for all; got {value}")
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


def observed_set_name(num_pos: int, num_neg: int, seed: int) -> str:
    """Name of an observed-label set in labels.h5, e.g. ``uniform-p1-n0-s1200``."""
    pos = "all" if num_pos == -1 else str(num_pos)
    neg = "all" if num_neg == -1 else str(num_neg)
    return f"uniform-p{pos}-n{neg}-s{seed}"
