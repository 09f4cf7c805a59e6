"""Losses that train on pseudo-labels from a vision-language model (docs/methods.md sections 8-9):

- EM_PL, VLPL (Xing et al., CVPR-W 2024): EM, except that the unobserved entries a CLIP
  model calls positive (softmax of cos / T above theta) are trained as soft positives.
- GPR with DAMP pseudo-labels, AEVLP (Tran et al., ICCV 2025): GR's robust loss on the
  unobserved entries without a pseudo-label, a bounded-weight positive loss on the
  pseudo-positives, and an expected-positive regulariser.

The pseudo-labels are computed once, from the scores file (``Context.scores``; ``--scores
TAG``), by the rules of :mod:`spl.fit.pseudo_labels`, and are the losses' fixed per-row
state (``pseudo_positives``, ``pseudo_negatives``). Neither rule emits negatives (VLPL's
are commented out for ResNet-50; DAMP's write 0, not -1), so the negative terms are only
reachable through the functional API's masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spl.data.common import SplError
from spl.fit.losses.base import (
    Batch,
    Context,
    Loss,
    Scores,
    expected_positive_penalty,
    option,
)
from spl.fit.losses.entropy import ALPHA, entropy_gradient, entropy_terms
from spl.fit.losses.robust import (
    K_SCHEDULE_RANGE,
    LOG_EPSILON_7,
    Q_RANGE,
    V_SCHEDULE_RANGE,
    gr_schedule,
    gr_terms,
    gr_weights,
)
from spl.fit.pseudo_labels import damp_pseudo_labels, vlpl_pseudo_labels

VLPL_SOURCE = "Xing et al., CVPR-W 2024 (mvrl/VLPL)"
AEVLP_SOURCE = "Tran et al., ICCV 2025 (Fsoft-AIC/AEVLP)"


class PseudoLabelLoss(Loss):
    """A loss whose per-row state is pseudo-labels from the scores: computed once, by
    :meth:`pseudo_labels`, for every training row; each batch reads its rows' masks."""

    reads_scores = True
    labels_seen = "1 pos + VLM scores"
    batch_state_names = ("pseudo_positives", "pseudo_negatives")

    def pseudo_labels(
        self, observed: torch.Tensor, scores: Scores
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-positives, pseudo-negatives) ``[N, L]`` bool of the rows of ``observed``."""
        raise NotImplementedError

    def init_state(self, observed, *, heads, seed):
        scores = self.context.scores
        if scores is None:
            raise SplError(
                f"{self.key} trains on pseudo-labels from a vision-language model's scores: "
                "pass scores= (spl.fit.losses.Scores of the training rows) to "
                "StackedHeads.fit, or --scores TAG to fit-linear and finetune"
            )
        if tuple(scores.image.shape) != tuple(observed.shape):
            raise ValueError(
                f"{self.key}: scores {tuple(scores.image.shape)} do not match the training "
                f"rows' observed labels {tuple(observed.shape)}"
            )
        positives, negatives = self.pseudo_labels(observed.cpu(), scores)
        # One mask for every head (they are the same), [N, L] uint8: small in checkpoints,
        # and a buffer type every torch.distributed backend broadcasts.
        return {
            "pseudo_positives": positives.to(device=observed.device, dtype=torch.uint8),
            "pseudo_negatives": negatives.to(device=observed.device, dtype=torch.uint8),
        }

    def _masks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's masks as 0/1 in the observed labels' dtype (pseudo-negatives: none
        when not given)."""
        observed = batch.observed
        positives = torch.as_tensor(batch.need("pseudo_positives", self.key))
        positives = positives.to(device=observed.device, dtype=observed.dtype)
        negatives = batch.state.get("pseudo_negatives")
        if negatives is None:
            return positives, torch.zeros_like(positives)
        negatives = torch.as_tensor(negatives).to(device=observed.device, dtype=observed.dtype)
        return positives, negatives


# --------------------------------------------------------------------------- VLPL


class EMPL(PseudoLabelLoss):
    """Observed positives: l+(p). After the warm-up (none: from epoch 1), an unobserved
    pseudo-positive costs beta_pos [0.9 l+(p) + 0.1 l-(p)], an unobserved pseudo-negative
    nothing (the release comments that term out); every other unobserved entry is EM's,
    -alpha H(p). Observed negatives: 0. The mean over B x L, the 1e-5 inside the logs."""

    key, title, source = "em_pl", "VLPL", VLPL_SOURCE
    dataset_options = {d: {"alpha": a} for d, a in ALPHA.items()}

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.2, "[0, inf)")  # EM's entropy weight
        beta_pos: float = option(0.7, "[0, inf)")  # the pseudo-positives' weight
        # pseudo-labels are used from the 1-based epoch warmup + 1
        warmup: int = option(0, "[0, inf)")
        temperature: float = option(0.01, "(0, inf)")  # the softmax's T over cos (divides)
        theta: float = option(0.3, "[0, 1]")  # pseudo-positive iff softmax > theta

    def check_epochs(self, num_epochs):
        if self.options.warmup >= num_epochs:
            raise SplError(
                f"em_pl: warmup {self.options.warmup} is at or past the number of epochs "
                f"({num_epochs}): the pseudo-labels would never be used. Use "
                f"--loss-option em_pl.warmup=W with 0 <= W <= {num_epochs - 1}"
            )

    def pseudo_labels(self, observed, scores):
        o = self.options
        positives = vlpl_pseudo_labels(scores.image, temperature=o.temperature, theta=o.theta)
        return positives, torch.zeros_like(positives)

    def kernel_args(self, batch: Batch):
        positives, negatives = self._masks(batch)
        used = self.epoch_tensor(batch.epoch > self.options.warmup, batch.observed.device)
        return (batch.observed, positives, negatives, used, self.options.alpha,
                self.options.beta_pos)  # fmt: skip

    @staticmethod
    def _parts(logits, observed, positives, negatives, used, alpha, beta_pos):
        p = torch.sigmoid(logits)
        positive, negative, entropy = entropy_terms(p)
        pos = (observed == 1).to(p.dtype)
        unobserved = (observed == 0).to(p.dtype)
        used = used.to(p.dtype)
        labelled = unobserved * positives * used
        silenced = unobserved * negatives * (1 - positives) * used
        rest = unobserved - labelled - silenced
        soft = 0.9 * positive + 0.1 * negative
        matrix = pos * positive - alpha * rest * entropy + beta_pos * labelled * soft
        s = p * (1 - p)
        d_positive, d_negative = -s / (p + 1e-5), s / (1 - p + 1e-5)
        grad = pos * d_positive - alpha * rest * entropy_gradient(p, positive, negative)
        grad = grad + beta_pos * labelled * (0.9 * d_positive + 0.1 * d_negative)
        return matrix, grad

    def value(self, logits, batch: Batch):
        matrix, _ = self._parts(logits, *self.kernel_args(batch))
        return matrix, logits.new_zeros(logits.shape[:-2])

    @staticmethod
    def kernel(logits, observed, positives, negatives, used, alpha, beta_pos):
        matrix, grad = EMPL._parts(logits, observed, positives, negatives, used, alpha, beta_pos)
        entries = logits.shape[-1] * logits.shape[-2]
        return matrix.sum((-2, -1)) / entries, grad / entries


# --------------------------------------------------------------------------- AEVLP

# AEVLP's configs/*.json (docs/methods.md section 9); another dataset takes VOC's, except k.
AEVLP_OPTIONS: dict[str, dict[str, Any]] = {
    "voc12": {
        "k_schedule": (0.0, 2.0, -2.0, -2.0), "q": (0.01, 1.0), "lam": (0.7, 0.4),
        "reg": 0.05, "expected_positives": 1.5, "temperature": 0.01, "eta": 0.0,
        "threshold": 0.5, "grid": 4, "top_k": 3, "negative_ratio": 0.2,
    },
    "coco14": {
        "k_schedule": (0.0, 10.0, -2.0, -8.0), "q": (0.01, 1.0), "lam": (0.7, 0.5),
        "reg": 0.001, "expected_positives": 2.9, "temperature": 0.01, "eta": 0.3,
        "threshold": 0.5, "grid": 4, "top_k": 3, "negative_ratio": 0.3,
    },
    "nuswide": {
        "k_schedule": (0.0, 10.0, -2.0, -8.0), "q": (0.01, 1.0), "lam": (0.7, 0.5),
        "reg": 0.001, "expected_positives": 1.9, "temperature": 0.01, "eta": 0.3,
        "threshold": 0.6, "grid": 4, "top_k": 3, "negative_ratio": 0.2,
    },
    "cub": {
        "k_schedule": (0.0, 10.0, -2.0, -8.0), "q": (0.01, 1.5), "lam": (0.8, 0.2),
        "reg": 0.01, "expected_positives": 31.4, "temperature": 0.1, "eta": 0.005,
        "threshold": 0.005, "grid": 5, "top_k": 32, "negative_ratio": 0.2,
    },
}  # fmt: skip


class GPR(PseudoLabelLoss):
    """Observed positives: -log(p + 1e-7). Unobserved without a pseudo-label: GR's term
    v [k (1 - p^q2)/q2 + (1 - k)(1 - (1 - p)^q3)/q3] (k, v of the detached p, GR's epoch
    schedules). Unobserved pseudo-positives: (1 - vb) [rho l+(p) + (1 - rho) l-(p)] with
    vb = min(max(v, 1 - lambda1), 1 - lambda2). Pseudo-negatives and observed negatives:
    v l-(p). The mean over B x L, plus reg (mean_n sum_i p - k)^2 / L^2 (not detached)."""

    key, title, source = "gpr", "AEVLP", AEVLP_SOURCE
    dataset_options = AEVLP_OPTIONS

    @dataclass(frozen=True)
    class Options:
        # GR's (docs/methods.md section 4): w0, wT, b0, bT; mu0, s0, muT, sT; q2, q3
        k_schedule: tuple[float, float, float, float] = option(
            (0.0, 2.0, -2.0, -2.0), K_SCHEDULE_RANGE
        )
        v_schedule: tuple[float, float, float, float] = option(
            (0.5, 2.0, 0.8, 0.5), V_SCHEDULE_RANGE
        )
        q: tuple[float, float] = option((0.01, 1.0), Q_RANGE)
        # lambda1, lambda2: vb in [1 - l1, 1 - l2], bounds of a weight in [0, 1]
        lam: tuple[float, float] = option((0.7, 0.4), "[0, 1]")
        rho: float = option(0.9, "[0, 1]")  # the pseudo-positives' soft target
        reg: float = option(0.05, "[0, inf)")  # weight of the expected-positive regulariser
        expected_positives: float | None = option(1.5, "(0, inf)")  # None: the dataset's k
        temperature: float = option(0.01, "(0, inf)")  # DAMP: the softmax's T over cos
        eta: float = option(0.0, "[0, 1]")  # DAMP's bounds on softmax scores
        threshold: float = option(0.5, "[0, 1]")
        grid: int = option(4, "[1, inf)")  # the g x g tiles DAMP expects in the scores file
        top_k: int = option(3, "[1, inf)")
        # only erases positives (see damp_pseudo_labels); a share of the classes
        negative_ratio: float = option(0.2, "[0, 1]")

    @classmethod
    def dataset_defaults(cls, context: Context) -> dict[str, Any]:
        """The release's config for the dataset (VOC's when none is named, as in the
        functional API); on another named dataset VOC's, with k the dataset's own."""
        table = cls.dataset_options
        if context.dataset is None or context.dataset in table:
            return dict(table[context.dataset or "voc12"])
        return {**table["voc12"], "expected_positives": None}

    def check_options(self):
        lam1, lam2 = self.options.lam
        if lam2 > lam1:
            raise SplError(
                f"gpr.lam = ({lam1:g}, {lam2:g}): the pseudo-positives' weight is bounded to "
                f"[1 - lambda1, 1 - lambda2], empty unless lambda2 <= lambda1"
            )

    def check_scores(self, scores, where):
        grid = self.options.grid
        if scores.tiles is None:
            raise SplError(
                f"gpr's DAMP pseudo-labels need tile scores, and {where} has none (made with "
                f"--grid 0). Make a file with tiles: `spl pseudo-labels DATASET --grid {grid}` "
                "(or spl import-scores with --train-tiles and --test-tiles)"
            )
        if scores.grid != grid:
            raise SplError(
                f"gpr expects {grid} x {grid} tiles (the release's for this dataset) and "
                f"{where} has {scores.grid} x {scores.grid}: make one with `spl pseudo-labels "
                f"DATASET --grid {grid}`, or pass --loss-option gpr.grid={scores.grid}"
            )

    def pseudo_labels(self, observed, scores):
        o = self.options
        if scores.tiles is None:
            raise SplError(f"{self.key}'s DAMP pseudo-labels need tile scores; these have none")
        positives = damp_pseudo_labels(
            scores.image, scores.tiles, observed, temperature=o.temperature, eta=o.eta,
            threshold=o.threshold, top_k=o.top_k, negative_ratio=o.negative_ratio,
        )  # fmt: skip
        return positives, torch.zeros_like(positives)

    def kernel_args(self, batch: Batch):
        if batch.num_epochs is None:
            raise ValueError(f"{self.key} schedules over the epochs: pass num_epochs=...")
        o = self.options
        positives, negatives = self._masks(batch)
        schedule = gr_schedule(o.k_schedule, o.v_schedule, batch.epoch, batch.num_epochs)
        # scheduled values as tensors: a compiled step must not recompile every epoch
        device = batch.observed.device
        return (
            batch.observed, positives, negatives,
            *(self.epoch_tensor(v, device, torch.float64) for v in schedule),
            *o.q, *o.lam, o.rho, o.reg, self.expected_positives(),
        )  # fmt: skip

    @staticmethod
    def _parts(logits, observed, positives, negatives, w, b, mu, sigma, q2, q3, lam1, lam2,
               rho):  # fmt: skip
        p = torch.sigmoid(logits)
        k, v = gr_weights(p, w, b, mu, sigma)
        (up_term, down_term), (up_grad, down_grad) = gr_terms(p, q2, q3)
        pos = (observed == 1).to(p.dtype)
        unobserved = (observed == 0).to(p.dtype)
        labelled = unobserved * positives
        negative_label = (observed == -1).to(p.dtype) + unobserved * negatives * (1 - positives)
        rest = unobserved - labelled - unobserved * negatives * (1 - positives)
        # The release narrows v in place, on the pseudo-positives only (losses.py:26-27).
        bounded = torch.where(v > 1 - lam1, v, torch.full_like(v, 1 - lam1))
        bounded = torch.where(bounded < 1 - lam2, bounded, torch.full_like(v, 1 - lam2))
        log_p, log_not_p = -torch.log(p + LOG_EPSILON_7), -torch.log(1 - p + LOG_EPSILON_7)
        s = p * (1 - p)
        d_log_p, d_log_not_p = -s / (p + LOG_EPSILON_7), s / (1 - p + LOG_EPSILON_7)
        matrix = pos * log_p + rest * v * (k * up_term + (1 - k) * down_term)
        matrix = matrix + labelled * (1 - bounded) * (rho * log_p + (1 - rho) * log_not_p)
        matrix = matrix + negative_label * v * log_not_p
        grad = pos * d_log_p + rest * v * (k * up_grad + (1 - k) * down_grad)
        grad = grad + labelled * (1 - bounded) * (rho * d_log_p + (1 - rho) * d_log_not_p)
        grad = grad + negative_label * v * d_log_not_p
        return matrix, grad, p

    def value(self, logits, batch: Batch):
        args = self.kernel_args(batch)
        matrix, _, p = self._parts(logits, *args[:-2])
        reg, k = args[-2:]
        return matrix, reg * expected_positive_penalty(p, k)

    @staticmethod
    def kernel(logits, observed, positives, negatives, w, b, mu, sigma, q2, q3, lam1, lam2,
               rho, reg, k):  # fmt: skip
        matrix, grad, p = GPR._parts(
            logits, observed, positives, negatives, w, b, mu, sigma, q2, q3, lam1, lam2, rho
        )
        batch, num_classes = logits.shape[-2], logits.shape[-1]
        entries = batch * num_classes
        count = p.sum(dim=-1).mean(dim=-1)  # [...] mean predicted positives per image
        loss = matrix.sum((-2, -1)) / entries + reg * (count - k) ** 2 / num_classes**2
        reg_grad = reg * 2 * (count - k) / (num_classes**2 * batch)
        return loss, grad / entries + reg_grad[..., None, None] * p * (1 - p)
