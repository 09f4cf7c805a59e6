"""The scores a run records for a head on the test split, and its label recovery on the
training split: one function for the linear engine and for fine-tuning alike."""

from __future__ import annotations

import torch

from spl.evaluate.metrics import (
    average_precision,
    mean_average_precision,
    precision_recall_at_k,
)


def head_scores(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    train_logits: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
) -> list[dict]:
    """Per head of ``test_logits [H, N, L]``: test mAP (ranking logits), the paper metric's
    test mAP (ranking float32 probabilities, as the official code does: they tie at 1.0
    once logits pass about 16.7), per-class AP, P@1/R@1/P@3/R@3 and, given the training
    split, the training-set recovery mAP of the hidden labels."""
    test_labels = test_labels.float()
    rows = []
    recovery = None
    if train_logits is not None and train_labels is not None:
        recovery = mean_average_precision(train_logits, train_labels.float(), chunk=4)
    for i, logits in enumerate(test_logits):
        ap = average_precision(logits[None], test_labels)[0]
        paper_ap = average_precision(torch.sigmoid(logits.float())[None], test_labels)[0]
        p1, r1 = precision_recall_at_k(logits, test_labels, 1)
        p3, r3 = precision_recall_at_k(logits, test_labels, 3)
        row = {
            "test_map": float(100 * ap.mean()),
            "test_map_paper_metric": float(100 * paper_ap.mean()),
            "test_per_class_ap": [round(100 * float(v), 4) for v in ap],
            "test_p_at_1": 100 * p1,
            "test_r_at_1": 100 * r1,
            "test_p_at_3": 100 * p3,
            "test_r_at_3": 100 * r3,
        }
        if recovery is not None:
            row["train_recovery_map"] = float(recovery[i])
        rows.append(row)
    return rows


def recovery_map(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """mAP of label estimates ``[N, L]`` against the hidden full training labels."""
    return float(mean_average_precision(probabilities, labels.float()))
