"""Entropy maximisation (EM) and asymmetric pseudo-labelling (EM + APL), Zhou et al.,
ECCV 2022 (docs/methods.md sections 1-2): the unobserved labels are pushed towards maximum
entropy instead of towards negative; APL then labels, after each epoch from a warm-up on,
the lowest-scored unobserved entries of each class as soft negatives that accumulate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spl.data.common import SplError
from spl.fit.losses.base import Batch, Loss, is_value, log_neg, log_pos, option

SOURCE = "Zhou et al., ECCV 2022 (Correr-Zhou/SPML-AckTheUnknown)"
# Per-dataset values of the release (main.py:323-350); a dataset of another name gets VOC's.
ALPHA = {"voc12": 0.2, "coco14": 0.1, "nuswide": 0.1, "cub": 0.01}
BETA = {"voc12": 0.02, "coco14": 0.9, "nuswide": 0.2, "cub": 0.4}
WARMUP = {"voc12": 5, "coco14": 5, "nuswide": 4, "cub": 3}


def entropy_terms(p: torch.Tensor):
    """(l+(p), l-(p), H(p)) with the release's 1e-5 inside the logs:
    H(p) = p l+(p) + (1 - p) l-(p)."""
    positive, negative = log_pos(p), log_neg(p)
    return positive, negative, p * positive + (1 - p) * negative


def entropy_gradient(p: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor):
    """dH/dz for H(p) = p l+(p) + (1 - p) l-(p), p = sigmoid(z) (eps 1e-5 in the logs)."""
    s = p * (1 - p)
    return s * (positive - negative - p / (p + 1e-5) + (1 - p) / (1 - p + 1e-5))


def _check_single_positive(observed: torch.Tensor, key: str) -> None:
    if bool((observed < 0).any()):
        raise ValueError(f"{key} assumes single positives: the observed labels hold negatives")


class EM(Loss):
    """Observed positives: l+(p). Unobserved: -alpha H(p), maximising their entropy."""

    key, title, source = "em", "EM", SOURCE
    single_positive_only = True

    dataset_options = {d: {"alpha": a} for d, a in ALPHA.items()}

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.2, "[0, inf)")  # the entropy term's weight (0: positives only)

    def value(self, logits, batch: Batch):
        _check_single_positive(batch.observed, self.key)
        p = torch.sigmoid(logits)
        positive, _, entropy = entropy_terms(p)
        pos, unobserved = is_value(batch.observed, 1, p.dtype), is_value(batch.observed, 0, p.dtype)
        matrix = pos * positive - self.options.alpha * unobserved * entropy
        return matrix, logits.new_zeros(logits.shape[:-2])

    def kernel_args(self, batch: Batch):
        return (batch.observed, self.options.alpha)

    @staticmethod
    def kernel(logits, observed, alpha):
        zeros = torch.zeros_like(logits)  # nothing labelled: the target is never read
        return em_kernel(logits, observed, zeros, zeros, alpha, 0.0)


def em_kernel(logits, observed, labelled, target, alpha, beta):
    """EM's (and APL's) batch loss and logit gradient: observed positives l+(p); labelled
    entries beta [t l+(p) + (1 - t) l-(p)]; other unobserved entries -alpha H(p)."""
    p = torch.sigmoid(logits)
    positive, negative, entropy = entropy_terms(p)
    pos = (observed == 1).to(p.dtype)
    unobserved = (observed == 0).to(p.dtype) * (1 - labelled)
    soft = target * positive + (1 - target) * negative
    loss = pos * positive - alpha * unobserved * entropy + beta * labelled * soft
    s = p * (1 - p)
    d_positive, d_negative = -s / (p + 1e-5), s / (1 - p + 1e-5)
    grad = pos * d_positive - alpha * unobserved * entropy_gradient(p, positive, negative)
    grad = grad + beta * labelled * (target * d_positive + (1 - target) * d_negative)
    entries = logits.shape[-1] * logits.shape[-2]
    return loss.sum((-2, -1)) / entries, grad / entries


class EMAPL(Loss):
    """EM, plus the soft negatives APL labels: an entry labelled with target t costs
    beta [t l+(p) + (1 - t) l-(p)]. The targets accumulate (never removed or refreshed):
    after every epoch from the warm-up on, per class the n_i lowest-scored entries that are
    still unlabelled get target = their score, n_i = int(0.9 U_i / (epochs - warm-up)),
    U_i the class's unobserved count at the start."""

    key, title, source = "em_apl", "EM + APL", SOURCE
    single_positive_only = True
    batch_state_names = ("pseudo_targets",)
    dataset_options = {d: {"alpha": ALPHA[d], "beta": BETA[d], "warmup": WARMUP[d]} for d in ALPHA}

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.2, "[0, inf)")  # the entropy term's weight
        beta: float = option(0.02, "[0, inf)")  # the soft negatives' weight
        # the 1-based epoch after which APL first labels (docs/methods.md section 2)
        warmup: int = option(5, "[1, inf)")
        # the share of each class's unobserved entries labelled by the last epoch
        negative_proportion: float = option(0.9, "(0, 1]")

    def check_epochs(self, num_epochs):
        warmup = self.options.warmup
        if warmup < num_epochs:
            return
        if num_epochs < 2:
            # warmup >= 1, and labels made after the last epoch are never trained on
            advice = (
                "APL labels after an epoch and trains on the labels from the next, so it "
                "needs at least 2 epochs: use --epochs 2 or more, or the loss em"
            )
        else:
            # (not "more --epochs": finetune --recipe source fixes the release's epochs)
            advice = f"use --loss-option em_apl.warmup=W with 1 <= W <= {num_epochs - 1}"
        raise SplError(
            f"em_apl: warmup {warmup} is at or past the number of epochs ({num_epochs}): "
            f"APL would never label; {advice}"
        )

    @staticmethod
    def _targets(batch: Batch, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(labelled mask, target) from pseudo_targets, NaN where unlabelled. A target of
        exactly 0.0 counts as unlabelled, as the release's -0.0 encoding does."""
        targets = batch.state.get("pseudo_targets")
        if targets is None:
            zeros = batch.observed.new_zeros(batch.observed.shape).to(dtype)
            return zeros, zeros
        labelled = (~torch.isnan(targets)) & (targets != 0)
        return labelled.to(dtype), torch.nan_to_num(targets, nan=0.0).to(dtype)

    def value(self, logits, batch: Batch):
        _check_single_positive(batch.observed, self.key)
        p = torch.sigmoid(logits)
        positive, negative, entropy = entropy_terms(p)
        labelled, target = self._targets(batch, p.dtype)
        pos = is_value(batch.observed, 1, p.dtype)
        unobserved = is_value(batch.observed, 0, p.dtype) * (1 - labelled)
        soft = target * positive + (1 - target) * negative
        matrix = pos * positive - self.options.alpha * unobserved * entropy
        matrix = matrix + self.options.beta * labelled * soft
        return matrix, logits.new_zeros(logits.shape[:-2])

    def kernel_args(self, batch: Batch):
        targets = batch.state.get("pseudo_targets")
        if targets is None:
            targets = torch.full(batch.observed.shape, math.nan)
        return (batch.observed, targets, self.options.alpha, self.options.beta)

    @staticmethod
    def kernel(logits, observed, targets, alpha, beta):
        # A target of exactly 0.0 counts as unlabelled, as the release's -0.0 encoding does.
        labelled = ((~torch.isnan(targets)) & (targets != 0)).to(logits.dtype)
        target = torch.nan_to_num(targets, nan=0.0).to(logits.dtype)
        return em_kernel(logits, observed, labelled, target, alpha, beta)

    # ------------------------------------------------------------------ state

    def init_state(self, observed, *, heads, seed):
        targets = torch.full((heads, *observed.shape), math.nan, dtype=observed.dtype)
        unobserved = observed == 0
        return {
            "pseudo_targets": targets.to(observed.device),
            "unobserved": unobserved,
            "unobserved_counts": unobserved.sum(dim=0).to(torch.long),  # U_i, at the start
        }

    def wants_scores(self, *, epoch, num_epochs):
        return epoch >= self.options.warmup

    def on_epoch_end(self, state, *, epoch, num_epochs, seed, scores=None):
        if scores is None or epoch < self.options.warmup:
            return
        targets = state["pseudo_targets"]
        apl_label(
            targets if targets.dim() == 3 else targets[None],
            scores if scores.dim() == 3 else scores[None],
            state["unobserved"],
            state["unobserved_counts"],
            self.options.negative_proportion,
            num_epochs - self.options.warmup,
        )

    def export_state(self, state):
        return {"pseudo_targets": state["pseudo_targets"].float().cpu()}

    def state_from_linear(self, exported, state):
        # Fine-tuning starts from the linear head's soft negatives.
        return {**state, "pseudo_targets": exported["pseudo_targets"].to(state["pseudo_targets"])}


def apl_label(
    targets: torch.Tensor,
    scores: torch.Tensor,
    unobserved: torch.Tensor,
    unobserved_counts: torch.Tensor,
    proportion: float,
    remaining_epochs: int,
) -> None:
    """APL's update, in place: per head and class, among the unobserved entries still
    unlabelled (NaN, or 0.0 as the release's -0.0), the n_i lowest-scored get target =
    their score, n_i = int(proportion * U_i / remaining_epochs). ``targets`` and
    ``scores`` ``[h, N, L]``, ``unobserved`` ``[N, L]`` (observed entries are never
    labelled), ``unobserved_counts`` U_i ``[L]``."""
    # int(), read once: each count read from a CUDA tensor in the loop would wait on it
    counts = (proportion * unobserved_counts.double() / remaining_epochs).long().tolist()
    for head in range(targets.shape[0]):
        for cls in range(targets.shape[-1]):
            n = counts[cls]
            if n <= 0:
                continue
            column = targets[head, :, cls]
            free = unobserved[:, cls] & (torch.isnan(column) | (column == 0))
            candidates = torch.nonzero(free).flatten()
            if len(candidates) == 0:
                continue
            values = scores[head, candidates, cls]
            # np.argsort's quicksort leaves ties in no set order; a stable sort fixes one.
            order = torch.argsort(values, stable=True)[:n]
            chosen = candidates[order]
            column[chosen] = values[order].to(column.dtype)
