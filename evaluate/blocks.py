"""mAP of many heads on a large split, a block of heads and classes at a time.

Average precision is computed per class (:func:`spl.evaluate.metrics.average_precision`
sorts each column alone), so the logits of every head on every class need not be held at
once: a block of heads x classes of logits over all rows, its APs, then the next block. When
one block holds everything the computation is the unblocked one, operation for operation
(the same products, the same AP calls), so small datasets give the numbers they always did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from spl.evaluate.metrics import average_precision

# Working bytes per (head, row, class) entry while average_precision runs on a block: the
# order (int64), the sorted scores and hits, cumulated counts, precision, the tie groups'
# ends (int64, flipped and cumulated) ... measured peak about 60 bytes (float32 scores).
AP_BYTES_PER_ENTRY = 64
# What the scoring blocks of a fit may take by default: logits of the block and the AP
# computation's working memory (the memory plan counts it).
SCORE_BYTES = 2 * 2**30


def block_bytes(heads: int, rows: int, classes: int, ap_chunk: int, itemsize: int = 4) -> int:
    """Bytes of one scoring block: ``heads`` heads' logits over ``rows`` rows and ``classes``
    classes, and the AP working memory of ``ap_chunk`` of them at a time."""
    return rows * classes * (heads * itemsize + min(ap_chunk, heads) * AP_BYTES_PER_ENTRY)


def block_shape(
    num_heads: int,
    num_rows: int,
    num_classes: int,
    *,
    head_block: int,
    ap_chunk: int,
    budget: int,
    itemsize: int = 4,
) -> tuple[int, int]:
    """(heads, classes) per block within ``budget`` bytes: ``head_block`` heads (fewer, down
    to ``ap_chunk``, when even one class of that many does not fit) and as many classes as
    fit (at least one)."""
    heads = max(1, min(head_block, num_heads))
    per_class = block_bytes(heads, num_rows, 1, ap_chunk, itemsize)
    if per_class > budget and heads > ap_chunk:
        heads = max(1, min(ap_chunk, num_heads))
        per_class = block_bytes(heads, num_rows, 1, ap_chunk, itemsize)
    classes = max(1, min(num_classes, budget // max(1, per_class)))
    return heads, classes


def blocks(
    num_heads: int, num_classes: int, heads: int, classes: int
) -> Iterator[tuple[slice, slice]]:
    """(heads, classes) slices covering ``num_heads x num_classes``, heads outermost."""
    for h in range(0, num_heads, heads):
        for c in range(0, num_classes, classes):
            yield slice(h, min(h + heads, num_heads)), slice(c, min(c + classes, num_classes))


def columns_ap(
    scores: torch.Tensor,
    labels: torch.Tensor,
    known: torch.Tensor | None = None,
    ap_chunk: int | None = None,
) -> torch.Tensor:
    """AP ``[h, c]`` of scores ``[h, N, c]``, ``ap_chunk`` heads at a time."""
    chunk = ap_chunk or scores.shape[0]
    return torch.cat(
        [
            average_precision(scores[i : i + chunk], labels, known)
            for i in range(0, scores.shape[0], chunk)
        ]
    )


def evaluated_classes(labels: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor | None:
    """The classes of a block in a partially labelled split's mean: those with a verified
    positive (None: every class counts, the paper's rule)."""
    if known is None:
        return None
    return ((labels == 1) & known.to(torch.bool)).any(dim=0)


def mean_ap(ap: torch.Tensor, evaluated: torch.Tensor | None = None) -> torch.Tensor:
    """100 x mean AP per head of ``ap [h, L]``: over every class, or over the ``evaluated``
    ones (:func:`spl.evaluate.metrics.verified_mean_average_precision`'s rule)."""
    if evaluated is None:
        return 100.0 * ap.mean(dim=-1)
    return 100.0 * ap[..., evaluated.to(ap.device)].mean(dim=-1)
