"""mAP and friends, batched over heads and classes (paper.md section 6).

Average precision is scikit-learn's step-wise ``average_precision_score`` (not
interpolated): with the scores of one class sorted in descending order and tied scores
grouped, AP = sum over groups of (recall gain) * (precision at the group's end). The
batched version sorts once per (head, class) column and replaces sklearn's per-class loop.
"""

from __future__ import annotations

import numpy as np
import torch


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP per column: ``scores`` ``[..., N, L]``, ``labels`` ``[N, L]`` (or broadcastable) 0/1.

    Returns ``[..., L]`` in [0, 1]. Parity: a class with no positive scores AP = 0, and it
    still counts in the mean (sklearn warns and returns 0 there too).
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device)
    labels = labels.to(scores.dtype).expand_as(scores)
    n = scores.shape[-2]
    if n == 0:
        return torch.zeros(scores.shape[:-2] + scores.shape[-1:], device=scores.device)
    order = torch.argsort(scores, dim=-2, descending=True)
    sorted_scores = torch.gather(scores, -2, order)
    hits = torch.gather(labels, -2, order)
    true_pos = torch.cumsum(hits, dim=-2)
    rank = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)
    precision = true_pos / rank.view(*([1] * (scores.dim() - 2)), n, 1)
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


def mean_average_precision(
    scores: torch.Tensor, labels: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """100 x mean AP over all classes; ``scores`` ``[H, N, L]`` gives ``[H]`` (one per head).

    ``chunk`` bounds memory by scoring that many heads at a time.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() == 2:
        return mean_average_precision(scores[None], labels, chunk=chunk)[0]
    chunk = chunk or scores.shape[0]
    parts = [
        average_precision(scores[i : i + chunk], labels).mean(dim=-1)
        for i in range(0, scores.shape[0], chunk)
    ]
    return 100.0 * torch.cat(parts)


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
