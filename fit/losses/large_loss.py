"""Large Loss Matters (Kim et al., CVPR 2022; docs/methods.md section 3): AN, except that from
the second epoch the unobserved entries with the largest losses in a batch (likely hidden
positives) are rejected (LL-R), corrected to positive for the batch (LL-Ct), or corrected
permanently (LL-Cp)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spl.fit.losses.base import Batch, Loss, option

SOURCE = "Kim et al., CVPR 2022 (snucml/LargeLossMatters)"
# Per dataset and variant (in percent), from the authors (LargeLossMatters issue #4).
DELTA_REL = {
    "ll_r": {"voc12": 0.2, "coco14": 0.4, "nuswide": 0.4, "cub": 0.4},
    "ll_ct": {"voc12": 0.2, "coco14": 0.2, "nuswide": 0.2, "cub": 0.4},
    "ll_cp": {"voc12": 0.1, "coco14": 0.2, "nuswide": 0.2, "cub": 0.2},
}


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-entry binary cross-entropy with logits, softplus(z) - t z: the release's
    F.binary_cross_entropy_with_logits to rounding. That function (its log_sigmoid) takes
    about 8 ms per call on small CPU tensors in torch 2.14, softplus 5 us."""
    return F.softplus(logits) - target * logits


def clean_rate(delta: float, epoch: int) -> float:
    """The share of entries kept as they are in 1-based ``epoch``: 1 in the first epoch,
    then ``delta`` less after each one, by repeated float subtraction as the release does
    (1 - (t - 1) delta up to float error, which decides ceil() at the margins)."""
    rate = 1.0
    for _ in range(epoch - 1):
        rate -= delta
    return rate


class _LargeLoss(Loss):
    """The shared arithmetic: BCE with logits on the observed targets (no eps; an observed
    negative is target 0), the largest unobserved losses of the batch selected."""

    source = SOURCE
    correct = False  # LL-Ct / LL-Cp: selected entries take the corrected target

    @dataclass(frozen=True)
    class Options:
        # percent per epoch, as the release's --delta_rel: the share of a batch's entries
        # selected grows by it each epoch
        delta_rel: float = option(0.2, "(0, 100)")

    @property
    def delta(self) -> float:
        """delta_rel as the fraction the release computes with: its config divides the
        percentage by 100 once, before any other arithmetic (docs/methods.md section 3)."""
        return self.options.delta_rel / 100

    def _count(self, entries: int, epoch: int) -> int:
        """k, the number of entries modified in a batch of ``entries`` = B x L at ``epoch``:
        ceil(B L (1 - clean_rate)), in the release's order of operations (the product of
        the batch's size with the rate, the rate by repeated subtraction of delta), which
        decides ceil() at the margins."""
        return math.ceil(entries * (1 - clean_rate(self.delta, epoch)))

    def _observed(self, batch: Batch) -> torch.Tensor:
        return batch.observed

    def selection(self, logits: torch.Tensor, batch: Batch):
        """(target y, loss, the unobserved entries' detached losses, selected mask,
        threshold) of a batch; the last three None where nothing is selected."""
        observed = self._observed(batch).to(logits.dtype).expand_as(logits)
        target = observed.clamp(min=0)
        loss = bce_with_logits(logits, target)
        if batch.epoch < 2 or clean_rate(self.delta, batch.epoch) == 1:
            return target, loss, None, None, None  # epoch 1: plain AN
        ranked = (observed == 0).to(loss.dtype) * loss.detach()
        flat = ranked.flatten(-2)
        k = self._count(flat.shape[-1], batch.epoch)
        k = min(k, flat.shape[-1])
        threshold = flat.topk(k, dim=-1).values[..., -1:]  # the k-th largest, per head
        threshold = threshold.unsqueeze(-1)
        return target, loss, ranked, ranked >= threshold, threshold  # ties included

    def value(self, logits, batch: Batch):
        target, loss, _, selected, _ = self.selection(logits, batch)
        if selected is not None:
            if self.correct:
                replacement = bce_with_logits(logits, 1 - target)
            else:
                replacement = torch.zeros_like(loss)
            loss = torch.where(selected, replacement, loss)
        return loss, logits.new_zeros(logits.shape[:-2])

    def kernel_args(self, batch: Batch):
        observed = self._observed(batch)
        k = 0  # epoch 1: plain AN
        if batch.epoch >= 2 and clean_rate(self.delta, batch.epoch) != 1:
            k = self._count(observed.shape[-1] * observed.shape[-2], batch.epoch)
        # k as a tensor: it changes every epoch, and a compiled step must not recompile
        return (observed, self.epoch_tensor(k, observed.device), self.correct)

    @staticmethod
    def kernel(logits, observed, k, correct):
        observed = observed.to(logits.dtype).expand_as(logits)
        target = observed.clamp(min=0)
        loss = bce_with_logits(logits, target)
        p = torch.sigmoid(logits)
        grad = p - target
        ranked = (observed == 0).to(loss.dtype) * loss.detach()
        flat = ranked.flatten(-2)
        # the k-th largest ranked loss per head (ties included below); none when k = 0
        ordered = flat.sort(dim=-1, descending=True).values
        position = (
            (k.clamp(max=flat.shape[-1]) - 1).clamp(min=0).reshape(1).expand(*flat.shape[:-1], 1)
        )
        threshold = ordered.gather(-1, position)
        threshold = torch.where(k > 0, threshold, torch.full_like(threshold, float("inf")))
        selected = ranked >= threshold.unsqueeze(-1)
        if correct:
            loss = torch.where(selected, bce_with_logits(logits, 1 - target), loss)
            grad = torch.where(selected, p - (1 - target), grad)
        else:
            loss = torch.where(selected, torch.zeros_like(loss), loss)
            grad = torch.where(selected, torch.zeros_like(grad), grad)
        entries = logits.shape[-1] * logits.shape[-2]
        return loss.sum((-2, -1)) / entries, grad / entries


class LLR(_LargeLoss):
    """LL-R: the selected large losses are rejected (set to 0)."""

    key, title = "ll_r", "LL-R"
    dataset_options = {d: {"delta_rel": v} for d, v in DELTA_REL["ll_r"].items()}


class LLCt(_LargeLoss):
    """LL-Ct: the selected entries are trained as positives for the batch."""

    key, title = "ll_ct", "LL-Ct"
    correct = True
    dataset_options = {d: {"delta_rel": v} for d, v in DELTA_REL["ll_ct"].items()}


class LLCp(_LargeLoss):
    """LL-Cp: from the second epoch a constant ceil(B L delta) entries per batch are
    selected and corrected, and after the step those above the threshold (strictly) become
    observed positives for good. The release never does this (its `is` string test makes
    LL-Cp run as LL-Ct, docs/methods.md section 3); spl follows the paper. The functional form
    takes the observed matrix with earlier flips already in it."""

    key, title = "ll_cp", "LL-Cp"
    correct = True
    batch_state_names = ("flipped",)
    dataset_options = {d: {"delta_rel": v} for d, v in DELTA_REL["ll_cp"].items()}

    def _count(self, entries, epoch):
        # ceil(B L delta) with delta = delta_rel / 100 computed first, as the release's
        # LL-Cp branch would (docs/methods.md section 3): B L delta_rel / 100 rounds
        # differently, e.g. 200 x 0.035 = 7.000000000000001 gives 8, 200 x 3.5 / 100 gives 7.
        return math.ceil(entries * self.delta)

    def _observed(self, batch: Batch) -> torch.Tensor:
        flipped = batch.state.get("flipped")
        if flipped is None:
            return batch.observed
        return torch.where(flipped.bool(), torch.ones_like(batch.observed), batch.observed)

    def init_state(self, observed, *, heads, seed):
        return {
            "flipped": torch.zeros(
                (heads, *observed.shape), dtype=torch.bool, device=observed.device
            )
        }

    def after_step(self, state, *, rows, logits, batch):
        _, _, ranked, selected, threshold = self.selection(logits, batch)
        if selected is None:
            return
        newly = ranked > threshold  # strictly above: the release's flip test
        flipped = state["flipped"]
        view = flipped if flipped.dim() == 3 else flipped[None]
        rows_state = view.index_select(1, rows) | newly.reshape(view.shape[0], *newly.shape[-2:])
        view.index_copy_(1, rows, rows_state)

    def export_state(self, state):
        return {"flipped": state["flipped"].cpu()}

    def state_from_linear(self, exported, state):
        return {**state, "flipped": exported["flipped"].to(state["flipped"])}
