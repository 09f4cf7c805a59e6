"""The scores a run records for a head on the test split, and its label recovery on the
training split: one function for the linear engine and for fine-tuning alike, and the
rows of a linear run's results."""

from __future__ import annotations

import numpy as np
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


def linear_results(
    model, X_test, Y_test, *, X_train, Y_train
) -> tuple[list[dict], list[list[float]]]:
    """The rows of a linear run's results.csv (less the run's protocol columns) and each
    head's per-class test AP, from a fitted :class:`spl.fit.engine.StackedHeads`: the test
    split scored once with every head's best-epoch weights (docs/protocol.md section 5), and the
    training split's recovery of the hidden labels (paper Table 2), by the heads and by the
    label estimates of losses that keep them (ROLE's estimator). ``X_train``, ``Y_train``:
    the training features and full labels the model was fitted on.

    Computed in the model's arithmetic (:meth:`~spl.fit.engine.StackedHeads.numerics`:
    on a CPU, denormals as zero, as in training), one group of heads at a time."""
    test_labels = torch.as_tensor(np.asarray(Y_test), dtype=torch.float32)
    train_labels = torch.as_tensor(np.asarray(Y_train)).float()
    rows: list[dict] = []
    per_class_ap: list[list[float]] = []
    offset = 0
    with model.numerics(), torch.no_grad():
        blocks = zip(model.decision_blocks(X_test), model.decision_blocks(X_train), strict=True)
        for (heads, test_logits), (_, train_logits) in blocks:
            scores = head_scores(
                test_logits.float(), test_labels, train_logits.float(), train_labels
            )
            for i, head in enumerate(heads):
                row = {
                    "head": head.name, "loss": head.loss, "lr": head.lr,
                    "batch_size": head.batch_size, "seed": head.seed,
                    "best_epoch": int(model.best_epoch_[offset + i]),
                    "val_map": float(model.best_val_map_[offset + i]),
                }  # fmt: skip
                per_class_ap.append(scores[i].pop("test_per_class_ap"))
                row.update(scores[i])
                estimates = model.estimator_probabilities(head)
                if estimates is not None:
                    row["estimator_recovery_map"] = recovery_map(estimates, train_labels)
                rows.append(row)
            offset += len(heads)
    return rows, per_class_ap
