"""Batched mAP against scikit-learn's per-class average_precision_score."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from spl.evaluate.metrics import (
    average_precision,
    mean_average_precision,
    precision_recall_at_k,
    probability_histogram,
    verified_mean_average_precision,
)


def sklearn_map(scores, labels):
    aps = []
    for j in range(labels.shape[1]):
        if labels[:, j].sum() == 0:
            aps.append(0.0)  # the paper's rule: an empty class scores 0 and counts
            continue
        aps.append(average_precision_score(labels[:, j], scores[:, j]))
    return 100 * np.mean(aps), np.array(aps)


@pytest.mark.parametrize("seed", range(12))
def test_map_equals_sklearn_with_ties_and_empty_classes(seed):
    rng = np.random.RandomState(seed)
    heads, n, num_classes = 3, rng.randint(2, 300), rng.randint(1, 12)
    labels = (rng.rand(n, num_classes) < rng.uniform(0.05, 0.6)).astype(np.int64)
    labels[:, 0] = 0  # an empty class
    levels = rng.choice([2, 5, 50, 10**6])  # few levels: many ties
    scores = np.round(rng.rand(heads, n, num_classes) * levels) / levels
    ours = mean_average_precision(torch.tensor(scores), torch.tensor(labels), chunk=2).numpy()
    for h in range(heads):
        expected, per_class = sklearn_map(scores[h], labels)
        assert ours[h] == pytest.approx(expected, abs=1e-6)
        got = average_precision(torch.tensor(scores[h]), torch.tensor(labels)).numpy()
        np.testing.assert_allclose(got, per_class, atol=1e-8)


def test_sklearn_itself_scores_an_empty_class_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert average_precision_score([0, 0, 0], [0.1, 0.5, 0.2]) == 0


def test_float32_scores_and_perfect_ranking():
    labels = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.2]], dtype=torch.float32)
    assert mean_average_precision(scores, labels).item() == pytest.approx(100.0)
    reversed_ = mean_average_precision(-scores, labels).item()
    expected, _ = sklearn_map(-scores.numpy(), labels.numpy())
    assert reversed_ == pytest.approx(expected, abs=1e-5)


def test_precision_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9], [0.5, 0.4, 0.3]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 0]])
    precision, recall = precision_recall_at_k(scores, labels, 2)
    assert precision == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert recall == pytest.approx((1 / 2 + 1) / 2)  # the image with no positive is left out


def test_histogram_counts_masked_entries_per_head():
    probs = torch.tensor([[[0.05, 0.97], [0.5, 0.51]], [[1.0, 0.0], [0.25, 0.74]]])
    mask = torch.tensor([[True, True], [False, True]])
    counts = probability_histogram(probs, mask, bins=4)
    np.testing.assert_array_equal(counts, [[1, 0, 1, 1], [1, 0, 1, 1]])


def test_paper_metric_ranks_float32_probabilities_as_the_official_code():
    """Logits of standard deviation 10 saturate float32 sigmoids at 1.0: ranking them ties
    what logits keep apart. The run records both, each equal to sklearn on its scores."""
    from spl.evaluate.scoring import head_scores

    rng = np.random.RandomState(0)
    labels = (rng.rand(400, 6) < 0.3).astype(np.int64)
    logits = torch.tensor(rng.randn(400, 6) * 10 + labels * 8, dtype=torch.float32)
    (row,) = head_scores(logits[None], torch.tensor(labels))
    expected, _ = sklearn_map(logits.numpy(), labels)
    probabilities = torch.sigmoid(logits).numpy()  # float32, as the official code has them
    assert (probabilities == 1.0).any()
    paper, _ = sklearn_map(probabilities, labels)
    assert row["test_map"] == pytest.approx(expected, abs=1e-4)
    assert row["test_map_paper_metric"] == pytest.approx(paper, abs=1e-4)
    assert abs(row["test_map"] - row["test_map_paper_metric"]) > 0.5


# ------------------------------------------------ partially labelled test sets (OpenImages)


def sklearn_verified_map(scores, labels, known):
    """Per class, sklearn's AP on that class's verified entries; classes with no verified
    positive left out of the mean (and counted)."""
    aps, left_out = [], 0
    for j in range(labels.shape[1]):
        rows = known[:, j]
        if not (labels[rows, j] == 1).any():
            left_out += 1
            continue
        aps.append(average_precision_score(labels[rows, j], scores[rows, j]))
    return 100 * np.mean(aps), left_out


@pytest.mark.parametrize("seed", range(12))
def test_verified_map_equals_sklearn_on_each_class_verified_entries(seed):
    rng = np.random.RandomState(seed)
    heads, n, num_classes = 3, rng.randint(5, 300), rng.randint(2, 12)
    labels = (rng.rand(n, num_classes) < rng.uniform(0.05, 0.6)).astype(np.int64)
    known = rng.rand(n, num_classes) < rng.uniform(0.1, 0.9)
    known[:, 0] &= labels[:, 0] == 0  # a class with verified negatives only: left out
    labels[~known] = rng.randint(0, 2, (~known).sum())  # unknown entries must not count
    levels = rng.choice([2, 5, 50, 10**6])  # few levels: many ties
    scores = np.round(rng.rand(heads, n, num_classes) * levels) / levels
    result = verified_mean_average_precision(
        torch.tensor(scores), torch.tensor(labels), torch.tensor(known), chunk=2
    )
    masked = mean_average_precision(
        torch.tensor(scores), torch.tensor(labels), known=torch.tensor(known)
    )
    for h in range(heads):
        expected, left_out = sklearn_verified_map(scores[h], labels, known)
        assert result.map[h].item() == pytest.approx(expected, abs=1e-9)
        assert result.classes_left_out == left_out >= 1
        assert masked[h].item() == result.map[h].item()
    per_class = average_precision(
        torch.tensor(scores[0]), torch.tensor(labels), torch.tensor(known)
    )
    for j in np.flatnonzero(result.evaluated.numpy()):
        rows = known[:, j]
        expected = average_precision_score(labels[rows, j], scores[0][rows, j])
        assert per_class[j].item() == pytest.approx(expected, abs=1e-12)


def test_verified_map_by_hand():
    """One class: scores 0.9 (pos), 0.8 (unknown, labelled 1 in the array), 0.7 (neg), 0.6
    (pos): over the verified entries the ranking is pos, neg, pos: AP = (1 + 2/3) / 2."""
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]], dtype=torch.float64)
    labels = torch.tensor([[1], [1], [0], [1]])
    known = torch.tensor([[True], [False], [True], [True]])
    result = verified_mean_average_precision(scores, labels, known)
    assert result.map.item() == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result.classes_left_out == 0
    # unmasked, the unknown entry counts as a positive: precisions 1, 1, 3/4
    assert mean_average_precision(scores, labels).item() == pytest.approx(100 * (1 + 1 + 3 / 4) / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_all_true_mask_gives_todays_numbers_bit_for_bit(dtype):
    rng = np.random.RandomState(3)
    labels = (rng.rand(500, 9) < 0.3).astype(np.int64)
    labels[0] = 1  # every class has a positive, as the masked mean needs to keep them all
    scores = torch.tensor(np.round(rng.randn(4, 500, 9) * 20) / 10, dtype=dtype)  # ties
    today = mean_average_precision(scores, torch.tensor(labels), chunk=3)
    everything = torch.ones(500, 9, dtype=torch.bool)
    result = verified_mean_average_precision(scores, torch.tensor(labels), everything, chunk=3)
    assert torch.equal(result.map, today) and result.classes_left_out == 0
    assert torch.equal(
        average_precision(scores, torch.tensor(labels), everything),
        average_precision(scores, torch.tensor(labels)),
    )
    assert torch.equal(mean_average_precision(scores[1], torch.tensor(labels), known=everything),
                       today[1])  # fmt: skip


def test_classes_without_a_verified_positive_are_counted_not_scored():
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    known = torch.tensor([[True, True, False], [True, False, True], [True, True, True]])
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.7, 0.3, 0.6]])
    result = verified_mean_average_precision(scores, labels, known)
    # class 1's only positive and class 2's only positive are unknown
    assert result.classes_left_out == 2
    assert result.evaluated.tolist() == [True, False, False]
    assert result.map.item() == pytest.approx(100.0)
    nothing = verified_mean_average_precision(scores, labels, torch.zeros(3, 3, dtype=torch.bool))
    assert nothing.classes_left_out == 3 and torch.isnan(nothing.map)


def test_verified_ap_on_a_sparsely_verified_split_equals_sklearn():
    """OpenImages' shape: a few verified entries per thousand (only those are sorted),
    classes with one verified entry, with none, and verified entries tied with unknown ones."""
    rng = np.random.RandomState(7)
    heads, n, num_classes = 2, 3000, 40
    known = rng.rand(n, num_classes) < 0.005
    known[:, 1] = False  # no verified entry at all
    known[:, 2] = False
    known[17, 2] = True  # a single verified entry, a positive
    labels = (rng.rand(n, num_classes) < 0.5).astype(np.int64)
    labels[17, 2] = 1
    scores = np.round(rng.rand(heads, n, num_classes) * 20) / 20  # ties, also with unknowns
    per_class = average_precision(torch.tensor(scores), torch.tensor(labels), torch.tensor(known))
    for h in range(heads):
        for j in range(num_classes):
            rows = known[:, j]
            if not (labels[rows, j] == 1).any():
                assert per_class[h, j].item() == 0.0
                continue
            expected = average_precision_score(labels[rows, j], scores[h][rows, j])
            assert per_class[h, j].item() == pytest.approx(expected, abs=1e-12)
    assert per_class[0, 2].item() == 1.0
