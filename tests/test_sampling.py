"""The paper's split and single-positive sampling, checked against independent replays."""

import numpy as np
import pytest

from spl.data.sampling import observe_uniform, observed_set_name, split_train_val


def test_split_sizes_match_the_paper():
    train, val = split_train_val(5717)
    assert (len(train), len(val)) == (4574, 1143)
    assert len(split_train_val(82081)[1]) == 16416  # COCO: 65,665 / 16,416
    assert len(split_train_val(150000)[1]) == 30000


def test_split_replays_the_reference_permutation():
    n = 101
    perm = np.random.RandomState(1200).permutation(n)
    n_val = int(round(0.2 * n))
    train, val = split_train_val(n)
    np.testing.assert_array_equal(val, np.sort(perm[-n_val:]))
    np.testing.assert_array_equal(train, np.sort(perm[: n - n_val]))
    assert not set(train) & set(val) and len(train) + len(val) == n


def _replay(labels, num_pos, num_neg, seed):
    """Written from docs/protocol.md section 2, independently of the library."""
    rng = np.random.RandomState(seed)
    out = np.zeros(labels.shape, dtype=int)
    for i in range(labels.shape[0]):
        pos = [j for j in range(labels.shape[1]) if labels[i, j] == 1]
        pos = np.array(pos, dtype=np.int64)
        rng.shuffle(pos)
        for j in pos[:num_pos]:
            out[i, j] = 1
        neg = np.array([j for j in range(labels.shape[1]) if labels[i, j] == 0], dtype=np.int64)
        rng.shuffle(neg)
        for j in neg[:num_neg]:
            out[i, j] = -1
    return out


@pytest.mark.parametrize("num_pos,num_neg", [(1, 0), (1, 1), (2, 3)])
def test_observed_labels_equal_independent_replay(num_pos, num_neg):
    labels = (np.random.RandomState(0).rand(200, 12) < 0.3).astype(np.uint8)
    labels[:5] = 0  # rows without positives get no observed positive
    got = observe_uniform(labels, num_pos, num_neg, 1200)
    np.testing.assert_array_equal(got, _replay(labels, num_pos, num_neg, 1200))
    assert (got[:5] != 1).all()
    has_pos = labels.sum(1) > 0
    assert ((got == 1).sum(1)[has_pos] == np.minimum(labels.sum(1), num_pos)[has_pos]).all()
    assert ((got == 1) <= (labels == 1)).all() and ((got == -1) <= (labels == 0)).all()


def test_negative_shuffle_consumes_rng_state_even_without_negatives():
    labels = (np.random.RandomState(1).rand(50, 8) < 0.5).astype(np.uint8)
    got = observe_uniform(labels, 1, 0, 1200)
    # A sampler that skipped the negative shuffle would pick different positives.
    rng = np.random.RandomState(1200)
    skipped = np.zeros_like(got)
    for i in range(50):
        pos = np.nonzero(labels[i])[0]
        rng.shuffle(pos)
        skipped[i, pos[:1]] = 1
    assert not np.array_equal(got, skipped)


def test_minus_one_keeps_all_and_names():
    labels = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(observe_uniform(labels, -1, -1), [[1, -1, 1, -1]])
    assert observed_set_name(1, 0, 1200) == "uniform-p1-n0-s1200"
    assert observed_set_name(-1, 1, 7) == "uniform-pall-n1-s7"
