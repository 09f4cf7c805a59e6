"""PR: a pairwise ranking loss in the paper's official code (not in its tables)."""

from __future__ import annotations

import torch

from spl.fit.losses.base import Batch, Loss


class PR(Loss):
    """Each observed positive should beat each unobserved label's probability by 1."""

    key, title = "pr", "PR"

    def value(self, logits: torch.Tensor, batch: Batch):
        p = torch.sigmoid(logits)
        pos = (batch.observed == 1).to(p.dtype)
        unobserved = (batch.observed == 0).to(p.dtype)
        margins = torch.relu(1.0 - p.unsqueeze(-1) + p.unsqueeze(-2))  # [..., B, i, j]
        per_positive = (margins * unobserved.unsqueeze(-2)).sum(dim=-1)
        return pos * per_positive, logits.new_zeros(logits.shape[:-2])
