"""Losses that treat unobserved labels as negatives, at full or reduced weight (docs/protocol.md
section 4): AN, AN with label smoothing, weak AN and pseudo-negative sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spl.data.runtime import generator
from spl.fit.losses.base import Batch, Loss, is_value, option


class AN(Loss):
    """Assume negative: every unobserved label is a negative."""

    key, title, in_paper = "an", "AN", True

    def weights(self, batch: Batch):
        return is_value(batch.observed, 1), is_value(batch.observed, 0)


class ANLS(Loss):
    """AN with label smoothing."""

    key, title, in_paper = "an_ls", "AN-LS", True

    @dataclass(frozen=True)
    class Options:
        # the paper's epsilon; targets (1 - eps) and eps, so eps = 1 would swap them
        label_smoothing: float = option(0.1, "[0, 1)")

    def weights(self, batch: Batch):
        pos, unobserved = is_value(batch.observed, 1), is_value(batch.observed, 0)
        eps = self.options.label_smoothing
        return (1 - eps) * pos + eps * unobserved, (1 - eps) * unobserved + eps * pos


class WAN(Loss):
    """Weak AN: unobserved labels are negatives at weight gamma."""

    key, title, in_paper = "wan", "WAN", True

    @dataclass(frozen=True)
    class Options:
        # the unobserved entries' weight as negatives, 1 being AN; None: 1 / (L - 1), the paper's
        gamma: float | None = option(None, "[0, 1]")

    def weights(self, batch: Batch):
        gamma = self.options.gamma
        if gamma is None:
            gamma = 1.0 / (batch.observed.shape[-1] - 1)
        return is_value(batch.observed, 1), gamma * is_value(batch.observed, 0)


def pseudo_negative_mask(shape: tuple[int, int], fraction: float, seed: int, epoch: int):
    """The pseudo-negative sampling mask of one epoch (kept entries = 1)."""
    draw = torch.rand(shape, generator=generator(seed, epoch, "pseudo_negatives"))
    return (draw < fraction).float()


class PseudoNegatives(Loss):
    """Pseudo-negative sampling: each epoch a fresh random fraction of the unobserved
    labels are negatives (the paper names the method without a fraction: 0.5 here)."""

    key, title = "pseudo_neg", "AN sampled"
    batch_state_names = ("pseudo_negatives",)

    @dataclass(frozen=True)
    class Options:
        fraction: float = option(0.5, "[0, 1]")  # a probability: 1 is AN

    def weights(self, batch: Batch):
        unobserved = is_value(batch.observed, 0)
        mask = batch.need("pseudo_negatives", self.key).to(unobserved.dtype)
        return is_value(batch.observed, 1), unobserved * mask

    def init_state(self, observed, *, heads, seed):
        return {"pseudo_negatives": torch.zeros_like(observed)}

    def on_epoch_start(self, state, *, epoch, num_epochs, seed):
        mask = state["pseudo_negatives"]
        draw = pseudo_negative_mask(tuple(mask.shape), self.options.fraction, seed, epoch)
        mask.copy_(draw)  # in place: a captured CUDA graph reads this buffer
