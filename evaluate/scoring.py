"""The scores a run records for a head on the test split, and its label recovery on the
training split: one function for the linear engine and for fine-tuning alike, and the
rows of a linear run's results."""

from __future__ import annotations

import numpy as np
import torch

from spl.evaluate.blocks import (
    AP_BYTES_PER_ENTRY,
    SCORE_BYTES,
    block_shape,
    blocks,
    evaluated_classes,
    mean_ap,
)
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


def recovery_map(
    probabilities: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None = None
) -> float:
    """mAP of label estimates ``[N, L]`` against the hidden full training labels (with
    ``known``: over the verified entries, the OpenImages rule)."""
    return float(mean_average_precision(probabilities, labels.float(), known=known))


def linear_results(
    model,
    X_test,
    Y_test,
    *,
    X_train,
    Y_train,
    test_known=None,
    train_known=None,
    score_bytes: int = SCORE_BYTES,
) -> tuple[list[dict], list[list[float]]]:
    """The rows of a linear run's results.csv (less the run's protocol columns) and each
    head's per-class test AP, from a fitted :class:`spl.fit.engine.StackedHeads`: the test
    split scored once with every head's best-epoch weights (docs/protocol.md section 5), and the
    training split's recovery of the hidden labels (paper Table 2), by the heads and by the
    label estimates of losses that keep them (ROLE's estimator). ``X_train``, ``Y_train``:
    the training features and full labels the model was fitted on.

    Features may be arrays or :mod:`spl.fit.data` features (streamed), labels dense or a
    :class:`~spl.data.labels.CSR`. A partially labelled dataset gives ``test_known`` and
    ``train_known`` (its verified entries): each class's AP is then taken over its verified
    entries and the means over the classes with a verified positive, as OpenImages is
    evaluated; ``test_classes_evaluated`` counts the test classes in the mean (all of them
    for a fully labelled dataset). The logits of a group of heads are computed a block of
    classes at a time within ``score_bytes`` (:mod:`spl.evaluate.blocks`); one block, as for
    any dataset that fits, computes exactly the numbers an unblocked pass does.

    Computed in the model's arithmetic (:meth:`~spl.fit.engine.StackedHeads.numerics`:
    on a CPU, denormals as zero, as in training), one group of heads at a time."""
    from spl.fit.data import LabelRows

    cpu = torch.device("cpu")
    test_labels = LabelRows(Y_test, dtype=torch.float32, device=cpu, resident=False)
    train_labels = LabelRows(Y_train, dtype=torch.float32, device=cpu, resident=False)
    test_known = _known_rows(test_known)
    train_known = _known_rows(train_known)
    rows: list[dict] = []
    per_class_ap: list[list[float]] = []
    offset = 0
    with model.numerics(), torch.no_grad():
        X_test, X_train = model.features(X_test), model.features(X_train)
        for heads, weight in model.group_weights():
            scores = group_scores(
                weight, X_test, test_labels, X_train, train_labels,
                test_known=test_known, train_known=train_known, score_bytes=score_bytes,
            )  # fmt: skip
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
                    row["estimator_recovery_map"] = estimates_recovery(
                        estimates, train_labels, train_known, score_bytes
                    )
                rows.append(row)
            offset += len(heads)
    return rows, per_class_ap


def _known_rows(known):
    from spl.fit.data import LabelRows

    if known is None:
        return None
    return LabelRows(known, dtype=torch.bool, device=torch.device("cpu"), resident=False)


# Heads whose training-split APs are computed together (the recovery), as
# mean_average_precision(..., chunk=4) always did.
RECOVERY_CHUNK = 4


def group_scores(
    weight: torch.Tensor,
    X_test,
    test_labels,
    X_train,
    train_labels,
    *,
    test_known=None,
    train_known=None,
    score_bytes: int = SCORE_BYTES,
) -> list[dict]:
    """:func:`head_scores` of one group's heads ``weight [h, L, D + 1]`` a block of classes
    (and, for large splits, of heads) at a time: per head its test mAP (logits and the paper
    metric's probabilities), per-class AP, P@1/R@1/P@3/R@3, the classes in the test mean
    and its training-set recovery mAP. Labels and known masks are
    :class:`~spl.fit.data.LabelRows` on the CPU."""
    from spl.fit.data import split_logits

    num_heads, num_classes = weight.shape[:2]
    num_rows = max(X_test.num_rows, X_train.num_rows)
    heads, classes = block_shape(
        num_heads, num_rows, num_classes, head_block=num_heads, ap_chunk=RECOVERY_CHUNK,
        budget=score_bytes, itemsize=weight.element_size(),
    )  # fmt: skip
    one_block = heads == num_heads and classes == num_classes
    test_ap = torch.zeros(num_heads, num_classes)
    paper_ap = torch.zeros(num_heads, num_classes)
    train_ap = torch.zeros(num_heads, num_classes)
    test_logits = None
    for head_part, class_part in blocks(num_heads, num_classes, heads, classes):
        part = weight[head_part] if classes == num_classes else weight[head_part, class_part]
        labels = test_labels.columns(class_part.start, class_part.stop)
        known = (
            None if test_known is None else test_known.columns(class_part.start, class_part.stop)
        )
        logits = split_logits(X_test, part).cpu().float()
        for i, head_logits in enumerate(logits):
            head = head_part.start + i
            test_ap[head, class_part] = average_precision(head_logits[None], labels, known)[0]
            probabilities = torch.sigmoid(head_logits.float())[None]
            paper_ap[head, class_part] = average_precision(probabilities, labels, known)[0]
        test_logits = logits if one_block else None
        labels = train_labels.columns(class_part.start, class_part.stop)
        known = (
            None if train_known is None else train_known.columns(class_part.start, class_part.stop)
        )
        logits = split_logits(X_train, part).cpu().float()
        for lo in range(0, logits.shape[0], RECOVERY_CHUNK):
            head = head_part.start + lo
            chunk = logits[lo : lo + RECOVERY_CHUNK]
            train_ap[head : head + len(chunk), class_part] = average_precision(chunk, labels, known)
        del logits
    test_evaluated = _evaluated(test_labels, test_known, classes)
    train_evaluated = _evaluated(train_labels, train_known, classes)
    recovery = mean_ap(train_ap, train_evaluated)
    if one_block:
        at_k = [_at_k(head_logits, test_labels.dense()) for head_logits in test_logits]
    else:
        at_k = _at_k_blocks(weight, X_test, test_labels, score_bytes)
    out = []
    for i in range(num_heads):
        (p1, r1), (p3, r3) = at_k[i]
        ap, paper = test_ap[i], paper_ap[i]
        if test_evaluated is not None:
            ap_mean, paper_mean = ap[test_evaluated].mean(), paper[test_evaluated].mean()
        else:
            ap_mean, paper_mean = ap.mean(), paper.mean()
        out.append(
            {
                "test_map": float(100 * ap_mean),
                "test_map_paper_metric": float(100 * paper_mean),
                "test_classes_evaluated": (
                    num_classes if test_evaluated is None else int(test_evaluated.sum())
                ),
                "test_per_class_ap": [round(100 * float(v), 4) for v in ap],
                "test_p_at_1": 100 * p1,
                "test_r_at_1": 100 * r1,
                "test_p_at_3": 100 * p3,
                "test_r_at_3": 100 * r3,
                "train_recovery_map": float(recovery[i]),
            }
        )
    return out


def _evaluated(labels, known, classes: int) -> torch.Tensor | None:
    """The classes with a verified positive (None without known: every class counts)."""
    if known is None:
        return None
    parts = [
        evaluated_classes(labels.columns(start, stop), known.columns(start, stop))
        for start, stop in _spans(labels.shape[1], classes)
    ]
    return torch.cat(parts)


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _at_k(logits: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, tuple]:
    return precision_recall_at_k(logits, labels, 1), precision_recall_at_k(logits, labels, 3)


def _at_k_blocks(weight: torch.Tensor, X, labels, score_bytes: int) -> list[tuple[tuple, tuple]]:
    """P@k and R@k (k = 1, 3) per head, a block of test rows at a time: each row's hits
    are whole numbers, so the means over rows are :func:`precision_recall_at_k`'s."""
    from spl.fit.heads import stacked_logits

    num_heads, num_classes = weight.shape[:2]
    step = max(1, score_bytes // max(1, 3 * num_heads * num_classes * 8))
    hits = {k: [] for k in (1, 3)}
    positives = []
    for start, stop in _spans(X.num_rows, step):
        block = X.take(torch.arange(start, stop, device=X.device))
        logits = stacked_logits(block, weight).cpu().double()  # [h, rows, L]
        rows = labels.read(np.arange(start, stop)).double()
        for k in hits:
            top = torch.topk(logits, min(k, num_classes), dim=-1).indices
            hits[k].append(torch.gather(rows.expand(num_heads, *rows.shape), -1, top).sum(-1))
        positives.append(rows.sum(-1))
    total = torch.cat(positives)
    has = total > 0
    out = []
    for i in range(num_heads):
        per_k = []
        for k in (1, 3):
            row_hits = torch.cat([h[i] for h in hits[k]])
            precision = (row_hits / min(k, num_classes)).mean().item()
            recall = (row_hits[has] / total[has]).mean().item() if has.any() else 0.0
            per_k.append((precision, recall))
        out.append(tuple(per_k))
    return out


def estimates_recovery(estimates: torch.Tensor, labels, known, score_bytes: int) -> float:
    """:func:`recovery_map` of a loss's label estimates ``[N, L]``, a block of classes at a
    time when the whole would pass ``score_bytes``."""
    num_rows, num_classes = estimates.shape
    classes = max(1, min(num_classes, score_bytes // max(1, num_rows * AP_BYTES_PER_ENTRY)))
    if classes == num_classes:
        return recovery_map(estimates, labels.dense(), None if known is None else known.dense())
    aps = []
    for start, stop in _spans(num_classes, classes):
        verified = None if known is None else known.columns(start, stop)
        labels_part = labels.columns(start, stop)
        aps.append(average_precision(estimates[None, :, start:stop], labels_part, verified))
    ap = torch.cat(aps, dim=-1)
    evaluated = _evaluated(labels, known, classes)
    return float(mean_ap(ap, evaluated)[0])
