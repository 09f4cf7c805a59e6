"""The loss interface: what a single-positive loss is to spl.

A loss is a small object (a subclass of :class:`Loss`) that knows

- what it is: its ``key``, ``title``, whether it is a row of the paper's tables
  (``in_paper``), which observed set it trains on (``trains_on``) and whether it reads
  the full labels (``reads_labels``, the full-label baselines and IUN);
- its options: a frozen dataclass ``Options`` whose defaults are its paper's, each declared
  with its valid range (:func:`option`), resolved against the dataset (:class:`Context`)
  and overridable per loss from the command line, a --config file or Python, every value
  checked against its range by one checker (:func:`check_option`);
- its value: :meth:`Loss.value` gives the per-entry matrix and the regulariser of a batch.
  This is what fine-tuning differentiates and what every fast path is checked against;
- optionally a fast path for the linear engine: label-only weights (:meth:`Loss.weights`,
  the weighted form ``pos * l+(p) + neg * l-(p)``, tabled once per epoch), a closed-form
  logit gradient (:meth:`Loss.logit_gradient`), or, for losses with trainable per-row
  state, :meth:`Loss.fused_step`. Without one, the engine uses autograd on ``value``;
- optionally state that persists across batches and epochs (per training row, per head):
  created by :meth:`Loss.init_state`, handed to ``value`` through :meth:`Loss.batch_state`,
  updated by hooks at the start and end of an epoch and after a step; tensors named in
  ``trainable`` are trained by the engine's Adam at ``lr x`` a multiplier;
- optionally pseudo-labels from a vision-language model's scores (``reads_scores``): the
  training rows' :class:`Scores` come in :attr:`Context.scores`, and the loss turns them
  into its per-row state once, in ``init_state``.

Tensors a loss receives have the heads, if any, in front: ``logits [..., B, L]``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from spl.data.common import SplError

# The option machinery (.options), importable from here too, where the family modules and
# tests import it (``from spl.fit.losses.base import option``).
from spl.fit.losses.options import (  # noqa: F401 - Interval, option, option_range re-exported
    Interval,
    check_option,
    coerce_option,
    describe_options,
    option,
    option_range,
)

# Parity: the reference adds 1e-5 *inside* the log and never clamps p.
LOG_EPSILON = 1e-5

SINGLE_POSITIVE = "single positive"
WITH_NEGATIVES = "with observed negatives"


def log_pos(p: torch.Tensor, eps: float = LOG_EPSILON) -> torch.Tensor:
    """l+(p) = -log(p + eps): the cost of calling an entry positive."""
    return -torch.log(p + eps)


def log_neg(p: torch.Tensor, eps: float = LOG_EPSILON) -> torch.Tensor:
    """l-(p) = -log(1 - p + eps): the cost of calling an entry negative."""
    return -torch.log(1.0 - p + eps)


def expected_positive_penalty(probabilities: torch.Tensor, expected: float) -> torch.Tensor:
    """R_k(Q) = ((1/B) sum_n sum_i Q[n, i] - k)^2 / L^2 (weight 1, the paper's lambda)."""
    num_classes = probabilities.shape[-1]
    mean_count = probabilities.sum(dim=-1).mean(dim=-1)
    return (mean_count - expected) ** 2 / num_classes**2


def is_value(tensor: torch.Tensor, value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """0/1 mask of ``tensor == value`` in ``dtype`` (the tensor's float dtype by default)."""
    if dtype is None:
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    return (tensor == value).to(dtype)


@dataclass(frozen=True)
class Scores:
    """A vision-language model's scores of the training rows (``spl pseudo-labels`` or
    ``spl import-scores``), row for row with the observed labels the loss trains on: the
    cosine of the whole image with each class prompt ``[N, L]`` and, when the file has
    them, of each of the g x g tiles ``[N, g*g, L]``. NaN rows (images the scorer could not
    read) get no pseudo-labels."""

    image: torch.Tensor
    tiles: torch.Tensor | None = None
    tag: str | None = None

    @property
    def grid(self) -> int:
        """g of the g x g tiles (0: the whole image only)."""
        return 0 if self.tiles is None else math.isqrt(self.tiles.shape[1])


@dataclass(frozen=True)
class Context:
    """What a loss may know about the data: the number of classes, the expected positives
    per image k (the dataset's, or ``--expected-positives``), the prepared dataset's
    name (per-dataset defaults of the methods since the paper) and, for the losses that
    read them (``reads_scores``), a vision-language model's scores of the training rows."""

    num_classes: int | None = None
    expected_positives: float | None = None
    dataset: str | None = None
    scores: Scores | None = field(default=None, compare=False, repr=False)


@dataclass
class Batch:
    """What a loss sees for one batch. ``observed`` in {-1, 0, +1}; ``labels`` the full 0/1
    labels (read only by losses with ``reads_labels``); ``epoch`` is 1-based; ``state``
    holds the loss's per-row state for the batch rows (heads in front), e.g. ROLE's
    ``estimates``."""

    observed: torch.Tensor
    labels: torch.Tensor | None = None
    epoch: int = 1
    num_epochs: int | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def need(self, name: str, loss: str) -> torch.Tensor:
        if name not in self.state or self.state[name] is None:
            raise ValueError(f"{loss} needs the batch's {name!r} (pass {name}=... to loss())")
        return self.state[name]

    def need_labels(self, loss: str) -> torch.Tensor:
        if self.labels is None:
            raise ValueError(f"{loss} reads the full labels: pass labels=... [B, L] 0/1")
        return self.labels


@dataclass(frozen=True)
class NoOptions:
    """A loss without options."""


class FusedStep(typing.NamedTuple):
    """A stateful loss's part of one engine step, in the engine's layout (``[B, h, L]``
    for h heads of the loss): the weighted-form weights of its classifier columns, what its
    state adds to each head's loss ``[h]``, and the gradients of its trainable state for
    the batch rows (``[h, B, L]`` each, in ``trainable`` order). A named tuple: it is
    built inside the compiled step."""

    pos_weight: torch.Tensor
    neg_weight: torch.Tensor
    extra_loss: torch.Tensor
    state_grads: tuple[torch.Tensor, ...]


class Loss:
    """Base class of every loss; a subclass sets the class attributes and ``value``."""

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    labels_seen: ClassVar[str] = "1 pos"
    in_paper: ClassVar[bool] = False
    trains_on: ClassVar[str] = SINGLE_POSITIVE
    reads_labels: ClassVar[bool] = False
    # Whether it trains on pseudo-labels from a vision-language model's scores
    # (``Context.scores``; ``--scores TAG`` on the command line).
    reads_scores: ClassVar[bool] = False
    reduction: ClassVar[str] = "mean"  # over all B x L entries (the paper's); or "sum"
    Options: ClassVar[type] = NoOptions
    # State ``value`` reads from ``Batch.state``: keywords of the functional ``loss(...)``.
    batch_state_names: ClassVar[tuple[str, ...]] = ()
    # The weighted form: weight of R_k(P) beside pos * l+(p) + neg * l-(p).
    regulariser_weight: ClassVar[float] = 0.0
    # State tensors the engine trains with Adam, with their lr multiplier's option name.
    trainable: ClassVar[dict[str, str]] = {}
    # State tensors kept as they were at each head's best epoch, which
    # ``head_state(best=True)`` serves (ROLE's theta: the recovery of the hidden labels a run
    # records). The LinearInit hand-over needs none: the engine keeps every head's exported
    # state (``export_state``) at its best epoch itself (fit/group.py).
    snapshot: ClassVar[tuple[str, ...]] = ()
    # Whether the loss assumes single positives (no observed negatives: its release asserts
    # it); training it on a set with negatives is refused before a run starts.
    single_positive_only: ClassVar[bool] = False
    # Methods since the paper: the family's citation, for tables and `spl losses`.
    source: ClassVar[str] = "Cole et al., CVPR 2021"
    # Option defaults that depend on the prepared dataset's name (the methods' published
    # per-dataset settings): {dataset: {option: value}}; other datasets take voc12's.
    dataset_options: ClassVar[dict[str, dict[str, Any]]] = {}

    def overrides(self, hook: str) -> bool:
        """Whether this loss has its own ``hook`` (e.g. ``after_step``): the trainers call
        a hook, and gather what it needs across processes, only where one does work."""
        return getattr(type(self), hook) is not getattr(Loss, hook)

    def __init__(self, options: Any = None, context: Context | None = None) -> None:
        self.context = context or Context()
        self.options = options if options is not None else self.resolve({}, self.context)
        self._epoch_tensors: dict[tuple, torch.Tensor] = {}

    def epoch_tensor(
        self, value: float | int | bool, device: torch.device, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A number that changes at most once an epoch (a schedule's value, a switch, LL's
        k) as a tensor on ``device``: a tensor so that a compiled step does not recompile
        each epoch, made once per value so that a step does not copy it to the device."""
        key = (type(value), repr(value), str(device), dtype)  # repr: -0.0 is not 0.0
        tensor = self._epoch_tensors.get(key)
        if tensor is None:
            if len(self._epoch_tensors) >= 64:  # one value an epoch: old ones never return
                self._epoch_tensors.clear()
            tensor = self._epoch_tensors[key] = torch.tensor(value, dtype=dtype, device=device)
        return tensor

    # ------------------------------------------------------------------ options

    @classmethod
    def dataset_defaults(cls, context: Context) -> dict[str, Any]:
        """Options whose default depends on the dataset (the methods' per-dataset values):
        the prepared dataset's, or VOC's for a dataset the method has no values for."""
        if not cls.dataset_options:
            return {}
        table = cls.dataset_options
        return dict(table.get(context.dataset or "voc12", table["voc12"]))

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any], context: Context) -> Any:
        """The options dataclass: paper defaults, then the dataset's, then ``overrides``."""
        values = {**cls.dataset_defaults(context), **overrides}
        names = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SplError(
                f"loss {cls.key!r} has no option {unknown[0]!r}; its options: "
                f"{describe_options(cls)}"
            )
        # Typed and range-checked however they were given (a Python value, a dataset's
        # default); the defaults of the dataclass are checked too.
        options = cls.Options(**{name: coerce_option(cls, name, v) for name, v in values.items()})
        for f in dataclasses.fields(cls.Options):
            check_option(cls, f.name, getattr(options, f.name))
        return options

    @classmethod
    def make(cls, overrides: Mapping[str, Any] | None = None, context: Context | None = None):
        context = context or Context()
        loss = cls(cls.resolve(overrides or {}, context), context)
        loss.check_options()
        return loss

    def check_options(self) -> None:
        """Refuse option values the loss cannot train with (an SplError naming the option)."""

    def check_epochs(self, num_epochs: int) -> None:
        """Refuse a run of ``num_epochs`` that the loss's schedule cannot fit (a warm-up at
        or past the last epoch), before the run starts."""

    def check_scores(self, scores: Scores, where: str) -> None:
        """Refuse scores the loss cannot use (a loss with ``reads_scores``): an SplError
        naming ``where`` (the scores file) and what is missing."""

    def expected_positives(self) -> float:
        """k: this loss's ``expected_positives`` option, else the dataset's."""
        k = getattr(self.options, "expected_positives", None)
        if k is None:
            k = self.context.expected_positives
        if k is None:
            raise ValueError(f"{self.key} needs expected_positives (k, positives per image)")
        return float(k)

    # ------------------------------------------------------------------ the value

    def value(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(M ``[..., B, L]``, regulariser ``[...]``) for ``logits [..., B, L]``. The default
        is the weighted form of :meth:`weights`."""
        weights = self.weights(batch)
        if weights is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither value nor weights")
        p = torch.sigmoid(logits)
        pos_weight, neg_weight = weights
        matrix = pos_weight * log_pos(p) + neg_weight * log_neg(p)
        reg = logits.new_zeros(logits.shape[:-2])
        if self.regulariser_weight:
            reg = self.regulariser_weight * expected_positive_penalty(p, self.expected_positives())
        return matrix, reg

    def batch_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The batch's loss ``[...]``: sum(M) / (B * L) + reg (the mean over all entries,
        ignored entries counting as zeros), or sum(M) + reg for ``reduction = "sum"``."""
        matrix, reg = self.value(logits, batch)
        total = matrix.sum(dim=(-2, -1))
        if self.reduction == "mean":
            total = total / (matrix.shape[-1] * matrix.shape[-2])
        return total + reg

    # ------------------------------------------------------------------ fast paths

    def weights(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(pos, neg) when the loss is ``pos * l+(p) + neg * l-(p)`` (+ R_k) with weights
        that depend on the labels and the epoch only: the engine tables them once an epoch
        and computes the gradient in closed form. None otherwise."""
        return None

    def logit_gradient(
        self, logits: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(batch loss ``[...]``, d loss / d logits ``[..., B, L]``) in closed form, or None:
        the engine then differentiates :meth:`value` with autograd. A loss with a
        :meth:`kernel` gets this from it."""
        if type(self).kernel is Loss.kernel:
            return None
        return self.kernel(logits, *self.kernel_args(batch))

    @staticmethod
    def kernel(logits: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """The closed form as a pure function of tensors and numbers: (batch loss ``[...]``,
        logit gradient ``[..., B, L]``) from ``logits`` and :meth:`kernel_args`. The engine
        runs it inside its compiled step (one graph for every loss of a group)."""
        raise NotImplementedError

    def kernel_args(self, batch: Batch) -> tuple:
        """The kernel's inputs for a batch: the batch's tensors (observed labels, state
        rows) and this epoch's numbers (schedules, options)."""
        raise NotImplementedError

    @staticmethod
    def fused_step(
        probabilities: torch.Tensor,
        observed: torch.Tensor,
        state_rows: tuple[torch.Tensor, ...],
        expected_positives: float,
    ) -> FusedStep | None:
        """For a weighted loss whose weights come from its trainable state (ROLE): the
        weights and the state's gradient of one step, inside the engine's compiled step.
        ``probabilities [B, h, L]`` (detached), ``observed [B, L]``, ``state_rows`` the
        batch rows (``[h, B, L]``) of each ``trainable`` tensor, in that order. A pure
        function of tensors (a static method), so that it compiles with the step."""
        return None

    # ------------------------------------------------------------------ state

    def init_state(
        self, observed: torch.Tensor, *, heads: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """Per-row state for ``heads`` heads trained on ``observed [N, L]`` (empty: none)."""
        return {}

    def batch_state(
        self, state: dict[str, torch.Tensor], rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The state ``value`` reads for the batch ``rows`` (None: every row): by default the
        state tensors named in ``batch_state_names``, their row axis second to last (per-row
        ``[N, L]`` or per-head ``[h, N, L]``)."""
        return {
            name: state[name] if rows is None else state[name].index_select(-2, rows)
            for name in self.batch_state_names
            if name in state
        }

    def on_epoch_start(
        self, state: dict[str, torch.Tensor], *, epoch: int, num_epochs: int, seed: int
    ) -> None:
        """Before epoch ``epoch`` (1-based): a schedule or a per-epoch draw."""

    def after_step(
        self, state: dict[str, torch.Tensor], *, rows: torch.Tensor, logits: torch.Tensor,
        batch: Batch,
    ) -> None:  # fmt: skip
        """After the optimiser step on ``rows`` (``logits [h, B, L]`` before the step)."""

    def wants_scores(self, *, epoch: int, num_epochs: int) -> bool:
        """Whether :meth:`on_epoch_end` needs a scoring pass over the training rows."""
        return False

    def on_epoch_end(
        self,
        state: dict[str, torch.Tensor],
        *,
        epoch: int,
        num_epochs: int,
        seed: int,
        scores: torch.Tensor | None = None,
    ) -> None:
        """After epoch ``epoch``; ``scores [h, N, L]`` are the heads' probabilities on the
        training rows when :meth:`wants_scores` asked for them."""

    def lr_multiplier(self, name: str) -> float:
        return float(getattr(self.options, self.trainable[name]))

    # ------------------------------------------------------------------ hand-over

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One head's state as stored in a linear run's heads.pt (its best epoch)."""
        return {}

    def label_estimates(self, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Probabilities ``[..., N, L]`` (float32) that the loss's state estimates for the
        training labels (ROLE's estimator): a run records their histogram on the unobserved
        positives and their recovery of the hidden labels. None: the loss keeps none."""
        return None

    def state_from_linear(
        self, exported: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """LinearInit: fine-tuning's initial state from a linear head's exported state."""
        return state
