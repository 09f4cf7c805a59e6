"""EPR: the observed positives plus the expected-positive regulariser R_k (docs/protocol.md
section 4); the unobserved labels get no term of their own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spl.fit.losses.base import Batch, Loss, is_value, option


class EPR(Loss):
    """Expected positive regularisation: R_k with weight 1 (the paper's lambda)."""

    key, title, in_paper = "epr", "EPR", True
    regulariser_weight = 1.0

    @dataclass(frozen=True)
    class Options:
        # k, positives per image, as --expected-positives; None: the dataset's k
        expected_positives: float | None = option(None, "(0, inf)")

    def weights(self, batch: Batch):
        pos = is_value(batch.observed, 1)
        return pos, torch.zeros_like(pos)
