"""Robust losses for the unobserved labels.

- GR (Chen et al., IJCAI 2024; docs/methods.md section 4): a generalized robust loss whose
  weights k and v follow the detached probability, with schedules over the epochs.
- Hill, SPLC and ASL as packaged in the robust-loss-mlml release (Zhang et al.;
  docs/methods.md sections 5-7): their sum reductions and defaults as released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spl.fit.losses.base import Batch, Loss, log_pos, option

GR_SOURCE = "Chen et al., IJCAI 2024 (yan4xi1/GRLoss)"
RL_SOURCE = "Zhang et al., arXiv 2112.07368 (xinyu1205/robust-loss-mlml)"
LOG_EPSILON_7 = 1e-7  # GR's and AEVLP's log epsilon (Cole's is 1e-5)
# GR's and AEVLP's schedules and exponents (docs/methods.md sections 4 and 9): w and b of
# k = sigmoid(w p + b) any real; v's centre mu a probability and its width sigma > 0 (it
# divides; both ends positive keep every epoch's value positive); q2, q3 > 0 (they divide).
K_SCHEDULE_RANGE = "(-inf, inf)"
V_SCHEDULE_RANGE = ("[0, 1]", "(0, inf)", "[0, 1]", "(0, inf)")
Q_RANGE = "(0, inf)"


def gr_schedule(
    k_schedule: tuple[float, float, float, float],
    v_schedule: tuple[float, float, float, float],
    epoch: int,
    num_epochs: int,
) -> tuple[float, float, float, float]:
    """(w, b, mu, sigma) at 1-based ``epoch`` of ``num_epochs``, as the release computes
    them (linear_init 0): w and b move from the first epoch's value by (epoch - 1)/E and never
    reach their final value; mu and sigma by epoch/E and reach it: one epoch apart."""
    w0, w_end, b0, b_end = k_schedule
    mu0, sigma0, mu_end, sigma_end = v_schedule
    k_share = max(epoch - 1, 0) / num_epochs
    v_share = max(epoch, 0) / num_epochs
    return (
        w0 + (w_end - w0) * k_share,
        b0 + (b_end - b0) * k_share,
        mu0 + (mu_end - mu0) * v_share,
        sigma0 + (sigma_end - sigma0) * v_share,
    )


def gr_weights(p: torch.Tensor, w: float, b: float, mu: float, sigma: float):
    """(k, v) of the detached probabilities: k = sigmoid(w p + b), v = exp(-(p - mu)^2 /
    (2 sigma^2))."""
    p = p.detach()
    return torch.sigmoid(w * p + b), torch.exp(-((p - mu) ** 2) / (2 * sigma**2))


def gr_terms(p: torch.Tensor, q2: float, q3: float):
    """The two robust terms (1 - p^q2)/q2 and (1 - (1 - p)^q3)/q3 and their z-derivatives."""
    up, down = p**q2, (1 - p) ** q3
    terms = ((1 - up) / q2, (1 - down) / q3)
    grads = (-up * (1 - p), down * p)
    return terms, grads


class GR(Loss):
    """Observed positives: -log(p + 1e-7). Unobserved: v [k (1 - p^q2)/q2 + (1 - k)
    (1 - (1 - p)^q3)/q3] with k, v of the detached p and scheduled parameters. Observed
    negatives: 0. The mean over B x L."""

    key, title, source = "gr", "GR", GR_SOURCE

    @dataclass(frozen=True)
    class Options:
        # w0, wT, b0, bT
        k_schedule: tuple[float, float, float, float] = option(
            (0.0, 2.0, -2.0, -2.0), K_SCHEDULE_RANGE
        )
        # mu0, sigma0, muT, sigmaT
        v_schedule: tuple[float, float, float, float] = option(
            (0.5, 2.0, 0.8, 0.5), V_SCHEDULE_RANGE
        )
        q: tuple[float, float] = option((0.01, 1.0), Q_RANGE)  # q2, q3

    def kernel_args(self, batch: Batch):
        if batch.num_epochs is None:
            raise ValueError(f"{self.key} schedules over the epochs: pass num_epochs=...")
        o = self.options
        schedule = gr_schedule(o.k_schedule, o.v_schedule, batch.epoch, batch.num_epochs)
        # scheduled values as tensors: they change every epoch, and a compiled step must
        # not recompile for each
        device = batch.observed.device
        return (
            batch.observed,
            *(self.epoch_tensor(v, device, torch.float64) for v in schedule),
            *o.q,
        )

    @staticmethod
    def _parts(logits, observed, w, b, mu, sigma, q2, q3):
        p = torch.sigmoid(logits)
        k, v = gr_weights(p, w, b, mu, sigma)
        (up_term, down_term), (up_grad, down_grad) = gr_terms(p, q2, q3)
        pos = (observed == 1).to(p.dtype)
        unobserved = (observed == 0).to(p.dtype)
        positive = log_pos(p, LOG_EPSILON_7)
        matrix = pos * positive + unobserved * v * (k * up_term + (1 - k) * down_term)
        grad = pos * (-p * (1 - p) / (p + LOG_EPSILON_7))
        grad = grad + unobserved * v * (k * up_grad + (1 - k) * down_grad)
        return matrix, grad

    def value(self, logits, batch: Batch):
        matrix, _ = self._parts(logits, *self.kernel_args(batch))
        return matrix, logits.new_zeros(logits.shape[:-2])

    @staticmethod
    def kernel(logits, observed, w, b, mu, sigma, q2, q3):
        matrix, grad = GR._parts(logits, observed, w, b, mu, sigma, q2, q3)
        entries = logits.shape[-1] * logits.shape[-2]
        return matrix.sum((-2, -1)) / entries, grad / entries


def _positive_focal(z: torch.Tensor, gamma: float):
    """((1 - q)^gamma (-log q), its z-derivative) with q = sigmoid(z) (no eps)."""
    q = torch.sigmoid(z)
    minus_log = F.softplus(-z)  # -log sigmoid(z), exact where log(sigmoid) would underflow
    weight = (1 - q) ** gamma
    return weight * minus_log, -gamma * q * weight * minus_log - (1 - q) ** (gamma + 1)


class Hill(Loss):
    """Hill: observed positives (1 - pm)^gamma (-log pm), pm = sigmoid(z - margin); every
    other entry (lambda - p) p^2. The sum over B x L, as released."""

    key, title, source = "hill", "Hill", RL_SOURCE
    reduction = "sum"

    @dataclass(frozen=True)
    class Options:
        # (lambda - p) p^2 rises on [0, 1] only for lambda >= 1.5 (its peak is at
        # p = 2 lambda / 3): below, a confident unobserved entry would cost less
        lamb: float = option(1.5, "[1.5, inf)")
        margin: float = option(1.0, "[0, inf)")  # subtracted from the positives' logits
        gamma: float = option(2.0, "[0, inf)")  # the focal exponent

    def kernel_args(self, batch: Batch):
        return (batch.observed, self.options.lamb, self.options.margin, self.options.gamma)

    @staticmethod
    def _parts(logits, observed, lamb, margin, gamma):
        pos = (observed == 1).to(logits.dtype)
        positive, d_positive = _positive_focal(logits - margin, gamma)
        p = torch.sigmoid(logits)
        negative = (lamb - p) * p**2
        d_negative = p * (1 - p) * p * (2 * lamb - 3 * p)
        return pos * positive + (1 - pos) * negative, pos * d_positive + (1 - pos) * d_negative

    def value(self, logits, batch: Batch):
        matrix, _ = self._parts(logits, *self.kernel_args(batch))
        return matrix, logits.new_zeros(logits.shape[:-2])

    @staticmethod
    def kernel(logits, observed, lamb, margin, gamma):
        matrix, grad = Hill._parts(logits, observed, lamb, margin, gamma)
        return matrix.sum((-2, -1)), grad


class SPLC(Loss):
    """Self-paced loss correction: a focal loss with a margin on the observed positives;
    from ``change_epoch`` (1-based; the release's 0-based epoch 1) every entry whose
    probability passes tau is trained as positive, recomputed each batch. The margin is not
    applied to corrected entries. The sum over B x L."""

    key, title, source = "splc", "SPLC", RL_SOURCE
    reduction = "sum"

    @dataclass(frozen=True)
    class Options:
        tau: float = option(0.6, "[0, 1]")  # a probability threshold
        change_epoch: int = option(2, "[1, inf)")  # a 1-based epoch
        margin: float = option(1.0, "[0, inf)")
        gamma: float = option(2.0, "[0, inf)")

    def kernel_args(self, batch: Batch):
        o = self.options
        correcting = self.epoch_tensor(batch.epoch >= o.change_epoch, batch.observed.device)
        return (batch.observed, correcting, o.tau, o.margin, o.gamma)

    @staticmethod
    def _parts(logits, observed, correcting, tau, margin, gamma):
        pos = (observed == 1).to(logits.dtype)
        shifted = logits - margin * pos  # margin on the observed positives only
        corrected = ((torch.sigmoid(shifted) > tau) & correcting).to(logits.dtype)
        target = torch.maximum(pos, corrected.detach())
        positive, d_positive = _positive_focal(shifted, gamma)
        q = torch.sigmoid(shifted)
        minus_log_negative = F.softplus(shifted)  # -log(1 - q)
        weight = q**gamma
        negative = weight * minus_log_negative
        d_negative = gamma * weight * (1 - q) * minus_log_negative + q ** (gamma + 1)
        matrix = target * positive + (1 - target) * negative
        return matrix, target * d_positive + (1 - target) * d_negative

    def value(self, logits, batch: Batch):
        matrix, _ = self._parts(logits, *self.kernel_args(batch))
        return matrix, logits.new_zeros(logits.shape[:-2])

    @staticmethod
    def kernel(logits, observed, correcting, tau, margin, gamma):
        matrix, grad = SPLC._parts(logits, observed, correcting, tau, margin, gamma)
        return matrix.sum((-2, -1)), grad


class ASL(Loss):
    """Asymmetric loss as the release packages it for --loss Asl: gamma- 4, gamma+ 0,
    clip 0.05, log clamped at 1e-8, focusing weights detached (AsymmetricLoss's default);
    minus the sum over B x L. Every entry but the observed positives is a negative."""

    key, title, source = "asl", "ASL", RL_SOURCE
    reduction = "sum"

    @dataclass(frozen=True)
    class Options:
        gamma_neg: float = option(4.0, "[0, inf)")  # focal exponents
        gamma_pos: float = option(0.0, "[0, inf)")  # --loss Asl; the class's own is 1 (s7)
        # shifts the negatives' p down by clip: at 1 every negative would cost nothing
        clip: float = option(0.05, "[0, 1)")

    def kernel_args(self, batch: Batch):
        o = self.options
        return (batch.observed, o.gamma_neg, o.gamma_pos, o.clip)

    @staticmethod
    def _parts(logits, observed, gamma_neg, gamma_pos, clip):
        eps = 1e-8
        y = (observed == 1).to(logits.dtype)
        p = torch.sigmoid(logits)
        negative_p = 1 - p
        if clip > 0:
            negative_p = (negative_p + clip).clamp(max=1)
        log_positive = torch.log(p.clamp(min=eps))
        log_negative = torch.log(negative_p.clamp(min=eps))
        pt = p * y + negative_p * (1 - y)
        gamma = gamma_pos * y + gamma_neg * (1 - y)
        weight = torch.pow(1 - pt, gamma).detach()
        matrix = -weight * (y * log_positive + (1 - y) * log_negative)
        s = p * (1 - p)
        d_positive = (1 - p) * (p > eps).to(p.dtype)  # d/dz log(max(p, eps))
        open_negative = (1 - p + clip) < 1 if clip > 0 else torch.ones_like(p, dtype=torch.bool)
        d_negative = -s / negative_p * (open_negative & (negative_p > eps)).to(p.dtype)
        grad = -weight * (y * d_positive + (1 - y) * d_negative)
        return matrix, grad

    def value(self, logits, batch: Batch):
        matrix, _ = self._parts(logits, *self.kernel_args(batch))
        return matrix, logits.new_zeros(logits.shape[:-2])

    @staticmethod
    def kernel(logits, observed, gamma_neg, gamma_pos, clip):
        matrix, grad = ASL._parts(logits, observed, gamma_neg, gamma_pos, clip)
        return matrix.sum((-2, -1)), grad
