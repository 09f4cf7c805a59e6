"""mAP and friends, batched over heads and classes (docs/protocol.md section 6).

Average precision is scikit-learn's step-wise ``average_precision_score`` (not
interpolated): with the scores of one class sorted in descending order and tied scores
grouped, AP = sum over groups of (recall gain) * (precision at the group's end). The
batched version sorts once per (head, class) column and replaces sklearn's per-class loop.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def average_precision(
    scores: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """AP per column: ``scores`` ``[..., N, L]``, ``labels`` ``[N, L]`` (or broadcastable) 0/1.

    Returns ``[..., L]`` in [0, 1]. Parity: a class with no positive scores AP = 0, and it
    still counts in the mean (sklearn warns and returns 0 there too). With ``known`` (bool,
    like ``labels``: the verified entries of a partially labelled set), each class's AP is
    computed over its verified entries alone, as OpenImages is evaluated: the others add
    neither a hit nor a rank.
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device)
    if known is not None:
        known = torch.as_tensor(known, device=scores.device).to(torch.bool)
        if known.dim() == 2 and labels.dim() == 2 and scores.shape[-2] > 0 and not known.all():
            return _verified_average_precision(scores, labels, known)
    labels = labels.to(scores.dtype).expand_as(scores)
    n = scores.shape[-2]
    if n == 0:
        return torch.zeros(scores.shape[:-2] + scores.shape[-1:], device=scores.device)
    order = torch.argsort(scores, dim=-2, descending=True)
    sorted_scores = torch.gather(scores, -2, order)
    hits = torch.gather(labels, -2, order)
    if known is None:
        true_pos = torch.cumsum(hits, dim=-2)
        rank = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)
        precision = true_pos / rank.view(*([1] * (scores.dim() - 2)), n, 1)
    else:
        # An unknown entry keeps its place in the order but counts for nothing: the rank is
        # the number of verified entries so far (cumulated integers: exact, so an all-true
        # mask gives the unmasked numbers bit for bit).
        known = torch.as_tensor(known, device=scores.device).to(scores.dtype).expand_as(scores)
        verified = torch.gather(known, -2, order)
        hits = hits * verified
        true_pos = torch.cumsum(hits, dim=-2)
        precision = true_pos / torch.cumsum(verified, dim=-2).clamp(min=1)
    # Tied scores form one threshold: every member takes the precision at the group's end.
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[..., :-1, :] = sorted_scores[..., :-1, :] != sorted_scores[..., 1:, :]
    index = torch.arange(n, device=scores.device).view(*([1] * (scores.dim() - 2)), n, 1)
    end = torch.where(last, index.expand_as(last), torch.full_like(order, n))
    end = torch.flip(torch.cummin(torch.flip(end, [-2]), dim=-2).values, [-2])
    precision_at_end = torch.gather(precision, -2, end)
    positives = hits.sum(dim=-2)
    total = (hits * precision_at_end).sum(dim=-2)
    return torch.where(positives > 0, total / positives.clamp(min=1), torch.zeros_like(total))


def _verified_average_precision(
    scores: torch.Tensor, labels: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """:func:`average_precision` over the verified entries alone, sorting only those: on a
    sparsely verified split (OpenImages: a few verified classes per image) the verified
    entries are a few per thousand, and sorting every column of ``[heads, N, L]`` scores
    cost ~100 times the matrix product that made them. The same arithmetic per class as the
    masked dense computation (integer counts, precision at the end of each tie group); the
    per-class sums agree with it to rounding."""
    lead, (n, num_classes) = scores.shape[:-2], scores.shape[-2:]
    known = known.expand(n, num_classes)
    cols, rows = known.t().nonzero(as_tuple=True)  # grouped by class, rows ascending
    flat = scores.reshape(-1, n, num_classes)[:, rows, cols]  # [B, M]
    hits_flat = labels.expand(n, num_classes)[rows, cols].to(scores.dtype)
    # Each class's entries by descending score: sort by score, then (stably) by class.
    by_score = torch.argsort(flat, dim=-1, descending=True, stable=True)
    order = by_score.gather(-1, torch.argsort(cols[by_score], dim=-1, stable=True))
    sorted_scores = flat.gather(-1, order)
    hits = hits_flat[order]  # [B, M]; the classes' segments are cols, as before sorting
    m = cols.numel()
    counts = torch.bincount(cols, minlength=num_classes)
    start = (torch.cumsum(counts, 0) - counts)[cols]  # each entry's class segment start
    position = torch.arange(m, device=scores.device)
    hit_count = torch.cumsum(hits.to(torch.int64), dim=-1)
    before = torch.where(start > 0, hit_count[:, (start - 1).clamp(min=0)], 0)
    true_pos = (hit_count - before).to(scores.dtype)
    precision = true_pos / (position - start + 1).to(scores.dtype)
    # Tied scores within a class form one threshold: each takes the precision at its end.
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:, :-1] = (sorted_scores[:, :-1] != sorted_scores[:, 1:]) | (cols[:-1] != cols[1:])
    end = torch.where(last, position.expand_as(last), m)
    end = torch.flip(torch.cummin(torch.flip(end, [-1]), dim=-1).values, [-1])
    weighted = hits * precision.gather(-1, end)
    total = scores.new_zeros(weighted.shape[0], num_classes).index_add_(1, cols, weighted)
    positives = scores.new_zeros(weighted.shape[0], num_classes).index_add_(1, cols, hits)
    ap = torch.where(positives > 0, total / positives.clamp(min=1), torch.zeros_like(total))
    return ap.reshape(*lead, num_classes)


def mean_average_precision(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int | None = None,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """100 x mean AP over all classes; ``scores`` ``[H, N, L]`` gives ``[H]`` (one per head).

    ``chunk`` bounds memory by scoring that many heads at a time. With ``known`` (a
    partially labelled test set) the mean is :func:`verified_mean_average_precision`'s.
    """
    if known is not None:
        return verified_mean_average_precision(scores, labels, known, chunk=chunk).map
    scores = torch.as_tensor(scores)
    if scores.dim() == 2:
        return mean_average_precision(scores[None], labels, chunk=chunk)[0]
    chunk = chunk or scores.shape[0]
    parts = [
        average_precision(scores[i : i + chunk], labels).mean(dim=-1)
        for i in range(0, scores.shape[0], chunk)
    ]
    return 100.0 * torch.cat(parts)


class VerifiedMAP(NamedTuple):
    """mAP on a partially labelled test set: ``map`` per head (``[H]``, or a scalar for
    ``[N, L]`` scores), ``classes_left_out`` (no verified positive in the set) and
    ``evaluated`` (bool ``[L]``: the classes in the mean)."""

    map: torch.Tensor
    classes_left_out: int
    evaluated: torch.Tensor


def verified_mean_average_precision(
    scores: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, *, chunk: int | None = None
) -> VerifiedMAP:
    """100 x mean AP over the classes with a verified positive, each class's AP over its
    verified entries only (:func:`average_precision` with ``known``), as OpenImages is
    evaluated; classes with no verified positive are left out of the mean and counted.

    ``labels`` 0/1 (unknown entries may hold anything: they are masked), ``known`` bool,
    both ``[N, L]``. With an all-true mask and a positive in every class this is
    :func:`mean_average_precision` bit for bit; a class without any positive scores 0 and
    counts there (the paper's rule) but is left out here. No class with a verified
    positive gives NaN.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() == 2:
        result = verified_mean_average_precision(scores[None], labels, known, chunk=chunk)
        return result._replace(map=result.map[0])
    labels = torch.as_tensor(labels, device=scores.device)
    known = torch.as_tensor(known, device=scores.device).to(torch.bool)
    evaluated = ((labels == 1) & known).any(dim=0)
    chunk = chunk or scores.shape[0]
    parts = [
        average_precision(scores[i : i + chunk], labels, known)[..., evaluated].mean(dim=-1)
        for i in range(0, scores.shape[0], chunk)
    ]
    left_out = int((~evaluated).sum())
    return VerifiedMAP(100.0 * torch.cat(parts), left_out, evaluated)


def precision_recall_at_k(
    scores: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[float, float]:
    """Mean over images of precision@k and recall@k (recall over images with a positive)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.float64)
    k = min(k, scores.shape[-1])
    top = torch.topk(scores, k, dim=-1).indices
    hits = torch.gather(labels, -1, top).sum(-1)
    precision = (hits / k).mean().item()
    positives = labels.sum(-1)
    has = positives > 0
    recall = (hits[has] / positives[has]).mean().item() if has.any() else 0.0
    return precision, recall


def probability_histogram(
    probabilities: torch.Tensor, mask: torch.Tensor, bins: int = 20
) -> np.ndarray:
    """Counts of ``probabilities[..., mask]`` in ``bins`` equal bins of [0, 1], per head.

    ``probabilities`` ``[H, N, L]``, ``mask`` ``[N, L]`` bool (e.g. y=1 and z=0: the
    unobserved positives of the paper's figure). Returns ``[H, bins]`` int64.
    """
    selected = probabilities[:, mask]
    index = (selected * bins).long().clamp_(0, bins - 1)
    offsets = torch.arange(selected.shape[0], device=selected.device)[:, None] * bins
    counts = torch.bincount((index + offsets).flatten(), minlength=selected.shape[0] * bins)
    return counts.view(selected.shape[0], bins).cpu().numpy()
