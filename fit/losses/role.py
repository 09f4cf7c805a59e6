"""ROLE: regularised online label estimation (docs/protocol.md section 4). A label estimator holds
one trainable logit per training image and class; the classifier and the estimator teach
each other through stop-gradients, both pulled towards k positives per image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spl.data.runtime import generator
from spl.fit.losses.base import (
    LOG_EPSILON,
    Batch,
    FusedStep,
    Loss,
    expected_positive_penalty,
    log_neg,
    log_pos,
    option,
)


def estimator_init(
    observed: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ROLE's estimator logits: observed positives logit(0.995), negatives logit(0.005),
    the rest uniform in (-ln 1.5, ln 1.5) so that Ytilde starts in [0.4, 0.6]."""
    bound = math.log(1.5)
    theta = torch.rand(observed.shape, generator=generator, dtype=torch.float64)
    theta = (theta * 2 - 1) * bound
    theta[observed == 1] = math.log(0.995 / 0.005)
    theta[observed == -1] = math.log(0.005 / 0.995)
    return theta.float()


def estimator_from_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """LinearInit carries ROLE's estimates over: theta = logit(clip(Ytilde, 1e-5, 1 - 1e-5))."""
    clipped = probabilities.clamp(1e-5, 1 - 1e-5)
    return torch.log(clipped) - torch.log1p(-clipped)


class ROLE(Loss):
    """The classifier learns from the estimator's (stopped) estimates and the estimator from
    the classifier's (stopped) probabilities; both see the observed positives and R_k."""

    key, title, in_paper = "role", "ROLE", True
    batch_state_names = ("estimates",)
    regulariser_weight = 0.5
    # theta learns at lr x 10 in the paper. Adam on theta is dense: once a row has a
    # gradient its moments keep moving it on every step, not only when the row is in the
    # batch (parity with the reference).
    trainable = {"theta": "estimator_lr_multiplier"}
    snapshot = ("theta",)

    @dataclass(frozen=True)
    class Options:
        estimator_lr_multiplier: float = option(10.0, "(0, inf)")  # an lr multiplier
        expected_positives: float | None = option(None, "(0, inf)")  # None: the dataset's k

    def value(self, logits: torch.Tensor, batch: Batch):
        p = torch.sigmoid(logits)
        y_est = torch.sigmoid(batch.need("estimates", self.key))
        pos = (batch.observed == 1).to(p.dtype)
        p_sg, y_sg = p.detach(), y_est.detach()
        observed_term = 0.5 * (pos * log_pos(p) + pos * log_pos(y_est))
        classifier_term = y_sg * log_pos(p) + (1 - y_sg) * log_neg(p)
        estimator_term = p_sg * log_pos(y_est) + (1 - p_sg) * log_neg(y_est)
        matrix = observed_term + 0.5 * (classifier_term + estimator_term)
        k = self.expected_positives()
        reg = 0.5 * (expected_positive_penalty(p, k) + expected_positive_penalty(y_est, k))
        return matrix, reg

    @staticmethod
    def fused_step(probabilities, observed, state_rows, expected_positives):
        """Both sides in closed form. The classifier side is the weighted form with the
        stopped estimates as targets; the estimator's gradient is that same form on its
        own logits, with the stopped probabilities as targets."""
        observed_pos = (observed == 1).to(probabilities.dtype)
        (theta,) = state_rows  # [h, B, L]
        estimate = torch.sigmoid(theta).transpose(0, 1)  # [B, h, L]
        pos_weight = 0.5 * (observed_pos[:, None] + estimate)
        neg_weight = 0.5 * (1 - estimate)
        batch, num_classes = estimate.shape[0], estimate.shape[2]
        scale = 1.0 / (batch * num_classes)
        k = expected_positives
        e_s = estimate * (1 - estimate)
        e_pos = 0.5 * (observed_pos[:, None] + probabilities)
        e_neg = 0.5 * (1 - probabilities)
        e_count = estimate.sum(dim=2).mean(dim=0)  # [h]
        e_loss = (e_pos * log_pos(estimate) + e_neg * log_neg(estimate)).sum(dim=(0, 2))
        e_loss = e_loss * scale + 0.5 * (e_count - k) ** 2 / num_classes**2
        e_grad = (e_neg * (e_s / (1 - estimate + LOG_EPSILON))) - e_pos * (
            e_s / (estimate + LOG_EPSILON)
        )
        e_grad = (
            e_grad * scale + (2 * 0.5 * (e_count - k) / (num_classes**2 * batch))[:, None] * e_s
        )
        return FusedStep(pos_weight, neg_weight, e_loss, (e_grad.transpose(0, 1),))

    def init_state(self, observed, *, heads, seed):
        theta = estimator_init(observed.cpu(), generator(seed, 0, "estimator"))
        theta = theta.to(observed.dtype)
        return {"theta": theta.expand(heads, *theta.shape).contiguous().to(observed.device)}

    def batch_state(self, state, rows):
        theta = state["theta"]
        return {"estimates": theta if rows is None else theta.index_select(-2, rows)}

    def label_estimates(self, state):
        return torch.sigmoid(state["theta"].float())

    def export_state(self, state):
        return {"estimates": self.label_estimates(state).cpu()}

    def state_from_linear(self, exported, state):
        return {"theta": estimator_from_probabilities(exported["estimates"].float())}
