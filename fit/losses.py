"""Every single-positive loss of the paper, as the reference code computes them (paper.md s4).

Each loss maps ``logits [..., B, L]`` and a :class:`LossBatch` to a per-entry matrix
``M [..., B, L]`` and a regulariser ``[...]``; the batch loss is
``M.sum((-2, -1)) / (B * L) + reg`` (:func:`batch_loss`). Leading dimensions are heads:
the stacked linear engine evaluates many heads of one loss in a single call, and
fine-tuning calls the same functions with no leading dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Parity: the reference adds 1e-5 *inside* the log and never clamps p.
LOG_EPSILON = 1e-5


def log_pos(p: torch.Tensor) -> torch.Tensor:
    """l+(p) = -log(p + 1e-5): the cost of calling an entry positive."""
    return -torch.log(p + LOG_EPSILON)


def log_neg(p: torch.Tensor) -> torch.Tensor:
    """l-(p) = -log(1 - p + 1e-5): the cost of calling an entry negative."""
    return -torch.log(1.0 - p + LOG_EPSILON)


def expected_positive_penalty(probabilities: torch.Tensor, expected: float) -> torch.Tensor:
    """R_k(Q) = ((1/B) sum_n sum_i Q[n, i] - k)^2 / L^2 (weight 1, the paper's lambda)."""
    num_classes = probabilities.shape[-1]
    mean_count = probabilities.sum(dim=-1).mean(dim=-1)
    return (mean_count - expected) ** 2 / num_classes**2


@dataclass
class LossOptions:
    """The constants the paper treats as knobs, with its defaults."""

    expected_positives: float = 1.0
    label_smoothing: float = 0.1
    wan_gamma: float | None = None  # None: 1 / (L - 1)
    pseudo_negative_fraction: float = 0.5
    estimator_lr_multiplier: float = 10.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LossBatch:
    """What a loss may see for one batch. ``labels`` are the full labels: only the
    full-label baselines (``bce``, ``bce_ls``) and ``iun`` (its true negatives) read them."""

    labels: torch.Tensor  # [B, L] 0/1
    observed: torch.Tensor  # [B, L] in {-1, 0, +1}
    estimates: torch.Tensor | None = None  # ROLE: estimator logits [..., B, L]
    pseudo_negatives: torch.Tensor | None = None  # [B, L] 0/1 mask, redrawn each epoch


LossFn = Callable[[torch.Tensor, LossBatch, LossOptions], tuple[torch.Tensor, torch.Tensor]]
WeightFn = Callable[[LossBatch, LossOptions, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A loss of the registry.

    Most losses are *weighted*: M = A * l+(p) + B * l-(p) with weights (A, B) that depend
    on the labels only (``weights``); EPR adds R_k(P) (``expected_positive_weight``).
    Those two fields define the loss, and the stacked engine uses them to compute every
    such head's gradient in closed form. ROLE and PR have their own ``custom`` function.
    """

    key: str
    title: str  # the paper's row name
    labels_seen: str
    weights: WeightFn | None = field(default=None, repr=False)
    expected_positive_weight: float = 0.0
    custom: LossFn | None = field(default=None, repr=False)
    paper: bool = True  # in the paper's linear and fine-tuned tables
    needs_observed_negatives: bool = False
    uses_estimator: bool = False
    uses_pseudo_negatives: bool = False

    def __call__(self, logits: torch.Tensor, batch: LossBatch, options: LossOptions):
        """(M [..., B, L], reg [...]) for ``logits [..., B, L]``."""
        if self.custom is not None:
            return self.custom(logits, batch, options)
        p = torch.sigmoid(logits)
        pos_weight, neg_weight = self.weights(batch, options, logits.shape[-1])
        matrix = pos_weight * log_pos(p) + neg_weight * log_neg(p)
        reg = logits.new_zeros(logits.shape[:-2])
        if self.expected_positive_weight:
            reg = self.expected_positive_weight * expected_positive_penalty(
                p, options.expected_positives
            )
        return matrix, reg


def _is(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """0/1 mask of ``tensor == value`` in the tensor's float dtype."""
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    return (tensor == value).to(dtype)


def _bce(batch, options, num_classes):
    y = batch.labels
    return y, 1 - y


def _bce_ls(batch, options, num_classes):
    y, eps = batch.labels, options.label_smoothing
    return (1 - eps) * y + eps * (1 - y), (1 - eps) * (1 - y) + eps * y


def _iun(batch, options, num_classes):
    # The released code masks `y == -1` on a 0/1 matrix and so trains on the positive
    # alone; we follow the paper: the true negatives are the entries with y = 0.
    return _is(batch.observed, 1), _is(batch.labels, 0)


def _iu(batch, options, num_classes):
    return _is(batch.observed, 1), _is(batch.observed, -1)


def _an(batch, options, num_classes):
    return _is(batch.observed, 1), _is(batch.observed, 0)


def _an_ls(batch, options, num_classes):
    pos, unobserved, eps = _is(batch.observed, 1), _is(batch.observed, 0), options.label_smoothing
    return (1 - eps) * pos + eps * unobserved, (1 - eps) * unobserved + eps * pos


def _wan(batch, options, num_classes):
    gamma = options.wan_gamma if options.wan_gamma is not None else 1.0 / (num_classes - 1)
    return _is(batch.observed, 1), gamma * _is(batch.observed, 0)


def _epr(batch, options, num_classes):
    pos = _is(batch.observed, 1)
    return pos, torch.zeros_like(pos)


def _pseudo_neg(batch, options, num_classes):
    if batch.pseudo_negatives is None:
        raise ValueError("pseudo_neg needs the epoch's pseudo-negative mask")
    unobserved = _is(batch.observed, 0)
    return _is(batch.observed, 1), unobserved * batch.pseudo_negatives.to(unobserved.dtype)


def _role(logits, batch, options):
    """ROLE: the classifier and a label estimator teach each other, with stop-gradients."""
    if batch.estimates is None:
        raise ValueError("role needs the label estimator's logits for the batch")
    p = torch.sigmoid(logits)
    y_est = torch.sigmoid(batch.estimates)
    pos = (batch.observed == 1).to(p.dtype)
    p_sg, y_sg = p.detach(), y_est.detach()
    observed_term = 0.5 * (pos * log_pos(p) + pos * log_pos(y_est))
    classifier_term = y_sg * log_pos(p) + (1 - y_sg) * log_neg(p)
    estimator_term = p_sg * log_pos(y_est) + (1 - p_sg) * log_neg(y_est)
    matrix = observed_term + 0.5 * (classifier_term + estimator_term)
    k = options.expected_positives
    reg = 0.5 * (expected_positive_penalty(p, k) + expected_positive_penalty(y_est, k))
    return matrix, reg


def _pr(logits, batch, options):
    """Pairwise ranking: each observed positive should beat each unobserved label by 1."""
    p = torch.sigmoid(logits)
    pos = (batch.observed == 1).to(p.dtype)
    unobserved = (batch.observed == 0).to(p.dtype)
    margins = torch.relu(1.0 - p.unsqueeze(-1) + p.unsqueeze(-2))  # [..., B, i, j]
    per_positive = (margins * unobserved.unsqueeze(-2)).sum(dim=-1)
    return pos * per_positive, logits.new_zeros(logits.shape[:-2])


LOSSES: dict[str, LossSpec] = {
    spec.key: spec
    for spec in (
        LossSpec("bce", "BCE", "all pos & all neg", _bce),
        LossSpec("bce_ls", "BCE-LS", "all pos & all neg", _bce_ls),
        LossSpec("iun", "IUN", "1 pos & all neg", _iun),
        LossSpec("iu", "IU", "1 pos & 1 neg", _iu, needs_observed_negatives=True),
        LossSpec("an", "AN", "1 pos", _an),
        LossSpec("an_ls", "AN-LS", "1 pos", _an_ls),
        LossSpec("wan", "WAN", "1 pos", _wan),
        LossSpec("epr", "EPR", "1 pos", _epr, expected_positive_weight=1.0),
        LossSpec("role", "ROLE", "1 pos", custom=_role, uses_estimator=True),
        LossSpec("pr", "PR", "1 pos", custom=_pr, paper=False),
        LossSpec(
            "pseudo_neg",
            "AN sampled",
            "1 pos",
            _pseudo_neg,
            paper=False,
            uses_pseudo_negatives=True,
        ),  # fmt: skip
    )
}
PAPER_LOSSES = [key for key, spec in LOSSES.items() if spec.paper]


def get_loss(key: str) -> LossSpec:
    if key not in LOSSES:
        raise KeyError(f"unknown loss {key!r}; available: {', '.join(LOSSES)}")
    return LOSSES[key]


def parse_losses(text: str | list[str]) -> list[str]:
    """``paper`` (the paper's nine), ``all`` (every registered loss) or ``a,b,...``."""
    items = text if isinstance(text, list) else [t.strip() for t in text.split(",") if t.strip()]
    if items == ["paper"]:
        return list(PAPER_LOSSES)
    if items == ["all"]:
        return list(LOSSES)
    unknown = [t for t in items if t not in LOSSES]
    if unknown:
        from spl.data.common import SplError

        raise SplError(
            f"unknown loss {unknown[0]!r}; available: {', '.join(LOSSES)} "
            "(or 'paper' for the paper's nine, 'all' for every one)"
        )
    return list(dict.fromkeys(items))


def batch_loss(
    key: str, logits: torch.Tensor, batch: LossBatch, options: LossOptions
) -> torch.Tensor:
    """sum(M) / (B * L) + reg: the mean over all entries, ignored entries counting as zeros."""
    matrix, reg = LOSSES[key](logits, batch, options)
    entries = matrix.shape[-1] * matrix.shape[-2]
    return matrix.sum(dim=(-2, -1)) / entries + reg


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
