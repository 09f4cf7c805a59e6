"""Losses that see more than one positive per image (docs/protocol.md section 4): the full-label
upper bounds BCE and BCE-LS, and IUN / IU, which add true or observed negatives."""

from __future__ import annotations

from dataclasses import dataclass

from spl.fit.losses.base import WITH_NEGATIVES, Batch, Loss, is_value, option


class BCE(Loss):
    """Binary cross-entropy on the full labels: the upper bound."""

    key, title, labels_seen, in_paper = "bce", "BCE", "all pos & all neg", True
    reads_labels = True

    def weights(self, batch: Batch):
        labels = batch.need_labels(self.key)
        return labels, 1 - labels


class BCELS(Loss):
    """BCE with label smoothing on the full labels."""

    key, title, labels_seen, in_paper = "bce_ls", "BCE-LS", "all pos & all neg", True
    reads_labels = True

    @dataclass(frozen=True)
    class Options:
        # the paper's epsilon; targets (1 - eps) and eps, so eps = 1 would swap them
        label_smoothing: float = option(0.1, "[0, 1)")

    def weights(self, batch: Batch):
        labels, eps = batch.need_labels(self.key), self.options.label_smoothing
        return (1 - eps) * labels + eps * (1 - labels), (1 - eps) * (1 - labels) + eps * labels


class IUN(Loss):
    """The observed positive and every true negative ("ignore unobserved, all negatives")."""

    key, title, labels_seen, in_paper = "iun", "IUN", "1 pos & all neg", True
    reads_labels = True

    def weights(self, batch: Batch):
        # The released code masks `y == -1` on a 0/1 matrix and so trains on the positive
        # alone; we follow the paper: the true negatives are the entries with y = 0.
        return is_value(batch.observed, 1), is_value(batch.need_labels(self.key), 0)


class IU(Loss):
    """The observed positive and one observed negative; unobserved entries are ignored."""

    key, title, labels_seen, in_paper = "iu", "IU", "1 pos & 1 neg", True
    trains_on = WITH_NEGATIVES

    def weights(self, batch: Batch):
        return is_value(batch.observed, 1), is_value(batch.observed, -1)
