"""Pseudo-labels from a vision-language model's scores (docs/methods.md sections 8-9), as pure
functions of the cached scores, and how good they are against the hidden labels.

The releases recompute their pseudo-labels every batch from a randomly flipped crop (and,
in AEVLP, text features passed through a randomly initialised, never trained graph
network); here they are computed once per image from the scores file, so that they are
deterministic: a fixed per-row state of the losses that use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _finite_rows(*arrays: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows whose scores are all finite (bad images are NaN in the scores file)."""
    finite = torch.ones(arrays[0].shape[0], dtype=torch.bool, device=arrays[0].device)
    for array in arrays:
        finite &= torch.isfinite(array.reshape(array.shape[0], -1)).all(dim=1)
    return finite


def vlpl_pseudo_labels(image: torch.Tensor, *, temperature: float, theta: float) -> torch.Tensor:
    """VLPL's rule: class c of an image is a pseudo-positive iff softmax over the classes
    of cos / T is above theta at c. ``image [N, L]`` cosines; returns ``[N, L]`` bool. Rows
    with a non-finite score get none."""
    similarity = torch.softmax(image / temperature, dim=-1)
    return (similarity > theta) & _finite_rows(image)[:, None]


def damp_pseudo_labels(
    image: torch.Tensor,
    tiles: torch.Tensor,
    observed: torch.Tensor,
    *,
    temperature: float,
    eta: float,
    threshold: float,
    top_k: int,
    negative_ratio: float,
) -> torch.Tensor:
    """AEVLP's DAMP rule, as released: softmax of cos / T over the classes for the whole
    image (s) and each tile; per class the tiles' max a, min b and mean m;
    eta_n = min(s at the observed positive, eta); local = a where a > eta_n, else b;
    final = (s + local) / 2; the pseudo-positives are the top_k classes of final whose
    value is >= threshold. The release's "negatives" then write 0 (not -1) into the lowest
    int(negative_ratio * L) classes of (s + m) / 2, so all they can do is erase a positive
    there. ``image [N, L]``, ``tiles [N, g*g, L]``, ``observed [N, L]``; ``[N, L]`` bool.
    top_k is capped at L (the release would fail). Rows with a non-finite score get none."""
    num_classes = image.shape[-1]
    s_global = torch.softmax(image / temperature, dim=-1)
    s_tiles = torch.softmax(tiles / temperature, dim=-1)
    most, least = s_tiles.max(dim=1).values, s_tiles.min(dim=1).values
    mean = s_tiles.mean(dim=1)
    # s at the observed positive: the release takes the row's max of s * observed.
    single = (s_global * observed.to(s_global.dtype)).max(dim=1).values
    # The release's eta is a default-dtype (float32) tensor, whatever the scores' dtype.
    eta_n = torch.minimum(single, torch.tensor(eta, dtype=torch.float32, device=image.device))
    local = torch.where(most > eta_n[:, None], most, least)
    final = (s_global + local) / 2
    values, indices = torch.topk(final, min(top_k, num_classes), dim=1)
    positives = torch.zeros(final.shape, dtype=torch.bool, device=final.device)
    positives.scatter_(1, indices, values >= threshold)
    erased = int(negative_ratio * num_classes)
    if erased > 0:
        _, lowest = torch.topk((s_global + mean) / 2, erased, dim=1, largest=False)
        positives.scatter_(1, lowest, False)
    return positives & _finite_rows(image, tiles)[:, None]


QUALITY_COLUMNS = [
    "loss", "class", "pseudo_positives", "precision", "recall",
    "unobserved_pseudo_positives", "unobserved_precision", "unobserved_recall",
]  # fmt: skip


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def pseudo_label_quality(
    positives: np.ndarray | torch.Tensor,
    observed: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    classes: Sequence[str],
    loss: str = "",
) -> list[dict[str, Any]]:
    """Per class, then ``(all)`` (pooled over the classes): how many pseudo-positives, their
    precision and recall against the full labels, and the same on the unobserved entries
    alone (recall of the hidden positives, y = 1 and z = 0), where pseudo-labels matter.
    A ratio with nothing to count is None."""
    positives = np.asarray(positives, dtype=bool)
    observed, labels = np.asarray(observed), np.asarray(labels) == 1
    unobserved = observed == 0
    hits = positives & labels
    hidden = labels & unobserved
    columns = {
        "pseudo_positives": positives.sum(0), "hits": hits.sum(0), "true": labels.sum(0),
        "unobserved": (positives & unobserved).sum(0), "unobserved_hits": (hits & unobserved).sum(0),
        "hidden": hidden.sum(0),
    }  # fmt: skip
    rows = []
    names = [*classes, "(all)"]
    for index, name in enumerate(names):
        pick = (lambda v: int(v.sum())) if name == "(all)" else (lambda v, i=index: int(v[i]))
        c = {key: pick(value) for key, value in columns.items()}
        rows.append({
            "loss": loss, "class": name, "pseudo_positives": c["pseudo_positives"],
            "precision": _ratio(c["hits"], c["pseudo_positives"]),
            "recall": _ratio(c["hits"], c["true"]),
            "unobserved_pseudo_positives": c["unobserved"],
            "unobserved_precision": _ratio(c["unobserved_hits"], c["unobserved"]),
            "unobserved_recall": _ratio(c["unobserved_hits"], c["hidden"]),
        })  # fmt: skip
    return rows
