"""The stacked linear-head engine: every loss x lr x batch size x seed in one pass.

Heads that share a batch size and a seed form a *group* (:mod:`.group`): they see the same
batches, so one matrix product computes all their logits, one product all their weight
gradients, and one fused Adam call per learning rate updates them (:mod:`.adam`; on a CPU,
one compiled pass forms the gradient inside the update: :mod:`.fused`). Features sit on the
device once. Val mAP is computed for every head after every epoch; each head keeps its
best-epoch weights and loss state (docs/protocol.md section 5). The test split is scored from the
fitted model by :func:`spl.evaluate.scoring.linear_results`.

The losses are objects (:mod:`spl.fit.losses`); the engine asks each how to get its
gradient (:func:`gradient_route`, :mod:`.step`): label-only weights (tabled once an epoch,
closed form), a fused closed form for losses with trainable state (ROLE), a loss's own
closed form, or autograd on its value. A loss's state (per row, per head) lives in the
group; the loss's hooks update it (:mod:`.epoch`).

The estimator interface follows scikit-learn: ``StackedHeads(...)`` stores options,
``fit(...)`` trains and returns ``self``, learned state ends in ``_``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from spl.data import protocol
from spl.data.runtime import resolve_device
from spl.evaluate.blocks import SCORE_BYTES
from spl.fit import fused
from spl.fit.data import (
    Features,
    HiddenPositives,
    LabelInput,
    LabelRows,
    as_features,
    as_labels,
    split_logits,
)
from spl.fit.epoch import split_map, train_epoch, validate
from spl.fit.group import HeadGroup, TrainingData, gradient_route
from spl.fit.heads import (
    HeadConfig,
    epoch_batches,
    epoch_permutation,
    head_name,
    initial_head,
)
from spl.fit.losses import WITH_NEGATIVES, Context, Loss, Scores, get_loss, make_losses
from spl.fit.step import batch_gradients

__all__ = [
    "HeadConfig", "StackedHeads", "batch_gradients", "epoch_batches", "epoch_permutation",
    "gradient_route", "head_name", "initial_head",
]  # fmt: skip

# Where a fit's time goes (``timings_``, seconds): building the groups (on a CPU the first
# time a machine meets a group's shapes, timing its update paths), each group's first step
# of each epoch (the first one compiles on a CPU), the other steps, the time the steps waited
# for a batch read ahead (streamed data; its share of the step time is
# feature_wait / (first_step + steps + feature_wait)), the losses' epoch hooks (with their
# scoring passes), validation, and the caller's on_epoch (checkpoints).
TIMINGS = (
    "setup", "first_step", "steps", "feature_wait", "loss_hooks", "validation", "on_epoch",
)  # fmt: skip

# What ``losses=`` takes: loss keys (resolved here), or losses resolved already.
LossesArgument = Sequence[str] | Mapping[str, Loss] | Sequence[Loss]
# Features: an array or tensor [N, D] (held on the device), or streamed (fit.data).
FeaturesArgument = np.ndarray | torch.Tensor | Features
# A label matrix [N, L]: dense, or a CSR of its entries (spl.data.labels).
LabelArgument = LabelInput | LabelRows


class StackedHeads:
    """Train many linear heads on cached features at once (one per loss x lr x bs x seed).

    >>> model = StackedHeads(losses=["an", "role"], lrs=[1e-3], batch_sizes=[8]).fit(
    ...     X, observed, labels=Y, X_val=Xv, Y_val=Yv)
    >>> model.best_val_map_, model.exported_state_, model.decision_function(X_test)

    ``losses`` are loss keys, resolved here with ``loss_options`` (a loss key to its
    option overrides, ``{"role": {"estimator_lr_multiplier": 5}}``), ``expected_positives``
    and ``dataset`` (what the losses know of the data: k, and the name that picks
    per-dataset defaults); or losses resolved already (a mapping key -> :class:`Loss`, or a
    list of them), taken as they are. On a CPU, ``update`` picks the compiled Adam path
    (``auto``: the fastest on this machine, see :func:`spl.fit.fused.choose_update`;
    ``inpass``, ``gemm``; ``eager`` never compiles it) and ``flush_denormals`` treats
    denormal floats as zero while training (fused.py).

    Data that would not fit on the device is read a batch at a time (:mod:`.data`): give
    ``X`` (and ``X_val``) as :class:`~spl.fit.data.StreamedFeatures` to stream the
    features from their HDF5 file, and ``resident_labels=False`` to read the observed sets
    and labels per batch (label matrices may be :class:`~spl.data.labels.CSR`). Neither
    changes a number. ``score_bytes`` bounds the blocks of heads x classes validation
    scores at once (:mod:`spl.evaluate.blocks`).
    """

    def __init__(
        self,
        losses: LossesArgument = ("an",),
        lrs: Sequence[float] = protocol.LRS,
        batch_sizes: Sequence[int] = protocol.BATCH_SIZES,
        seeds: Sequence[int] = (0,),
        epochs: int = protocol.LINEAR_EPOCHS,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
        expected_positives: float | None = None,
        dataset: str | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        histogram_bins: int = protocol.HISTOGRAM_BINS,
        eval_chunk_heads: int = 16,
        cuda_graphs: bool = True,
        flush_denormals: bool = True,
        update: str = "auto",
        resident_labels: bool = True,
        score_bytes: int = SCORE_BYTES,
    ) -> None:
        self.losses = dict(losses) if isinstance(losses, Mapping) else list(losses)
        self.lrs = list(lrs)
        self.batch_sizes = list(batch_sizes)
        self.seeds = list(seeds)
        self.epochs = epochs
        self.loss_options = loss_options
        self.expected_positives = expected_positives
        self.dataset = dataset
        self.device = device
        self.dtype = dtype
        self.histogram_bins = histogram_bins
        self.eval_chunk_heads = eval_chunk_heads
        self.cuda_graphs = cuda_graphs
        self.flush_denormals = flush_denormals
        self.update = update
        self.resident_labels = resident_labels
        self.score_bytes = score_bytes

    # ------------------------------------------------------------------ training

    def fit(
        self,
        X: FeaturesArgument,
        observed: LabelArgument,
        *,
        labels: LabelArgument,
        X_val: FeaturesArgument,
        Y_val: LabelArgument,
        observed_iu: LabelArgument | None = None,
        state: dict | None = None,
        on_epoch: Callable[[StackedHeads, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        scores: Scores | np.ndarray | torch.Tensor | None = None,
        val_known: LabelArgument | None = None,
    ) -> StackedHeads:
        """Train every head; ``state`` (from :meth:`state_dict`) resumes an interrupted sweep.

        ``labels`` are the full training labels: read only by the losses that read them
        (the full-label baselines, IUN's true negatives) and for the recovery analysis.
        ``observed_iu`` is the observed set with negatives (1 positive + 1 negative per
        image) that losses training on observed negatives (IU) see. ``scores`` are a
        vision-language model's scores of the training rows, for the losses that train on
        pseudo-labels from them (VLPL, AEVLP): a :class:`~spl.fit.losses.Scores`, or the
        whole-image cosines ``[N, L]``. ``on_epoch(model, record)`` is called after each
        epoch of each group (``record["group"]``, its ``epoch``, ``val_map``...).
        ``val_known`` (bool ``[N_val, L]``): the verified entries of a partially labelled
        val split, scored as OpenImages is (each class's AP over its verified entries).

        Learned: ``coef_ [H, L, D]``, ``intercept_ [H, L]`` (best-epoch weights),
        ``best_epoch_``, ``best_val_map_``, ``heads_``, ``history_`` (one row per head and
        epoch), ``exported_state_`` (per head name, its loss's exported state at its best
        epoch; only heads whose loss exports one), ``losses_``, ``train_seconds_``,
        ``timings_`` (where the time went: :data:`TIMINGS`).
        """
        started = time.perf_counter()
        self.prepare(X, observed, labels=labels, X_val=X_val, Y_val=Y_val,
                     observed_iu=observed_iu, state=state, scores=scores,
                     val_known=val_known)  # fmt: skip
        self.train_seconds_ = 0.0
        timings = self.timings_ = dict.fromkeys(TIMINGS, 0.0)
        timings["setup"] = time.perf_counter() - started
        with self.numerics():
            for group in self.groups_:
                while group.epochs_done < self.epochs:
                    start = time.perf_counter()
                    record = train_epoch(group, on_step, self.cuda_graphs)
                    validated = time.perf_counter()
                    record.update(
                        validate(group, chunk_heads=self.eval_chunk_heads,
                                 histogram_bins=self.histogram_bins,
                                 score_bytes=self.score_bytes)
                    )  # fmt: skip
                    for key, seconds in record.pop("seconds").items():
                        timings[key] += seconds
                    timings["validation"] += time.perf_counter() - validated
                    record["seconds"] = time.perf_counter() - start
                    self.train_seconds_ += record["seconds"]
                    self.history_.extend(_split_record(group, record))
                    if on_epoch is not None:
                        called = time.perf_counter()
                        on_epoch(self, {"group": group, **record})
                        timings["on_epoch"] += time.perf_counter() - called
                group.graph = None
                group.tables = None  # the next group tables its own
            self._collect()
        for group in self.groups_:
            group.data = None  # the device's copy of the data goes with the sweep
        return self

    def prepare(
        self,
        X: FeaturesArgument,
        observed: LabelArgument,
        *,
        labels: LabelArgument,
        X_val: FeaturesArgument,
        Y_val: LabelArgument,
        observed_iu: LabelArgument | None = None,
        state: dict | None = None,
        scores: Scores | np.ndarray | torch.Tensor | None = None,
        val_known: LabelArgument | None = None,
    ) -> StackedHeads:
        """What :meth:`fit` does before training (its arguments, less the callbacks): check
        the inputs, resolve the losses, put the data on the device (or ready to stream) and
        build the groups (:attr:`groups_`, each with its
        :attr:`~spl.fit.group.HeadGroup.data`), resumed from ``state`` if given. Public for
        the checks that step a group by hand (:mod:`spl.fit.step`)."""
        if not self._resolved_losses_given():
            for key in self.losses:
                get_loss(key)
        device = resolve_device(self.device)
        self.device_ = device
        dtype, resident = self.dtype, self.resident_labels
        X = as_features(X, dtype, device)
        observed = as_labels(observed, dtype, device, resident)
        labels = as_labels(labels, dtype, device, resident)
        if scores is not None and not isinstance(scores, Scores):
            scores = Scores(
                torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores)
            )
        context = Context(observed.shape[1], self.expected_positives, self.dataset, scores)
        self.losses_ = self._resolve_losses(context)
        for loss in self.losses_.values():
            loss.check_epochs(self.epochs)
        observed_sets = self._observed_sets(observed, observed_iu)
        small = [b for b in self.batch_sizes if b > X.num_rows]
        if small:
            raise ValueError(
                f"the training split has {X.num_rows} rows, fewer than batch size {small[0]}"
            )
        # Entries whose probabilities the paper's figure follows: unobserved positives.
        hidden = None
        if self.histogram_bins:
            hidden = HiddenPositives.find(labels, observed, device)
        data = TrainingData(
            X=X,
            observed=observed_sets,
            labels=labels,
            X_val=as_features(X_val, dtype, device),
            Y_val=as_labels(Y_val, dtype, device, resident),
            hidden_positives=hidden,
            val_known=None if val_known is None else as_labels(
                val_known, torch.bool, device, resident
            ),
        )  # fmt: skip
        self._build_groups(data)
        self.history_: list[dict] = []
        if state is not None:
            self._load_state(state)
        return self

    def numerics(self) -> contextlib.AbstractContextManager:
        """The arithmetic the engine trains in, for computing with the fitted heads as
        training did: on a CPU with ``flush_denormals``, denormal floats as zero."""
        return fused.denormals_flushed(self.device_.type == "cpu" and self.flush_denormals)

    # ------------------------------------------------------------------ the fitted heads

    def decision_function(self, X: FeaturesArgument, *, best: bool = True) -> torch.Tensor:
        """Logits ``[H, N, L]`` of every head (best-epoch weights by default), on the CPU."""
        return torch.cat([logits for _, logits in self.decision_blocks(X, best=best)])

    def decision_blocks(
        self, X: FeaturesArgument, *, best: bool = True
    ) -> Iterator[tuple[list[HeadConfig], torch.Tensor]]:
        """:meth:`decision_function` one group at a time, in :attr:`heads_` order: (the
        group's heads, their logits ``[h, N, L]`` on the CPU), one group's logits in memory
        at a time."""
        X = self.features(X)
        for heads, weight in self.group_weights(best=best):
            yield heads, split_logits(X, weight).cpu()

    def features(self, X: FeaturesArgument) -> Features:
        """Features as the fitted heads read them (:mod:`.data`): an array or tensor
        ``[N, D]`` on the device with its ones column; a :class:`Features` as it is."""
        return as_features(X, self.dtype, self.device_)

    def group_weights(
        self, *, best: bool = True
    ) -> Iterator[tuple[list[HeadConfig], torch.Tensor]]:
        """(a group's heads, their weights ``[h, L, D + 1]`` on the device, the bias last),
        one group at a time in :attr:`heads_` order: what scoring in blocks reads."""
        for group in self.groups_:
            yield group.heads, group.best_weight if best else group.weight

    def score(self, X, Y, *, best: bool = True, known=None) -> np.ndarray:
        """mAP (x100) of every head on (X, Y), in :attr:`heads_` order; with ``known``, over
        the verified entries (a partially labelled split)."""
        X = self.features(X)
        Y = as_labels(Y, self.dtype, self.device_, resident=True)
        known = None if known is None else as_labels(known, torch.bool, self.device_, True)
        return torch.cat(
            [
                split_map(X, weight, Y, self.eval_chunk_heads, known=known,
                          score_bytes=self.score_bytes)
                for _, weight in self.group_weights(best=best)
            ]
        ).numpy()  # fmt: skip

    def head_state(self, head: HeadConfig, *, best: bool = True) -> dict[str, torch.Tensor]:
        """The loss state of one head (e.g. ROLE's ``theta`` ``[N_train, L]``), at its best
        epoch by default (for the tensors its loss keeps a ``snapshot`` of)."""
        for group in self.groups_:
            if head in group.heads:
                return group.head_state(group.heads.index(head), best=best)
        raise KeyError(f"no head {head.name}")

    def estimator_probabilities(
        self, head: HeadConfig, *, best: bool = True
    ) -> torch.Tensor | None:
        """The label estimates of one head's loss (ROLE: sigmoid(theta)) ``[N_train, L]``
        on the CPU; None for a loss that keeps none."""
        estimates = self.losses_[head.loss].label_estimates(self.head_state(head, best=best))
        return None if estimates is None else estimates.cpu()

    def state_dict(self) -> dict:
        """Everything needed to resume after the last finished epoch of each group."""
        return {
            "heads": [asdict(h) for g in self.groups_ for h in g.heads],
            "groups": [g.state_dict() for g in self.groups_],
            "history": [dict(row) for row in self.history_],
        }

    # ------------------------------------------------------------------ internals

    def _resolved_losses_given(self) -> bool:
        given = self.losses.values() if isinstance(self.losses, Mapping) else self.losses
        return any(isinstance(loss, Loss) for loss in given)

    def _resolve_losses(self, context: Context) -> dict[str, Loss]:
        """Loss objects by key: the keys resolved against ``context``, or the resolved
        losses given (with the data's scores, when given to fit, in their context)."""
        if not self._resolved_losses_given():
            return make_losses(self.losses, self.loss_options, context)
        if isinstance(self.losses, Mapping):
            given = dict(self.losses)
        else:
            given = {}
            for loss in self.losses:
                if isinstance(loss, Loss) and loss.key in given:
                    raise ValueError(f"losses= holds two losses with key {loss.key!r}")
                given[getattr(loss, "key", loss)] = loss
        wrong = [k for k, loss in given.items() if not isinstance(loss, Loss)]
        if wrong:
            raise TypeError(
                f"losses= mixes loss keys and loss objects ({wrong[0]!r}): give keys, or "
                "spl.fit.losses.Loss objects resolved already"
            )
        if self.loss_options:
            raise ValueError(
                "loss_options apply to loss keys; these losses are resolved already (their "
                "options are in them): resolve them with the options instead"
            )
        if context.scores is None:
            return given
        out = {}
        for key, loss in given.items():
            out[key] = copy.copy(loss)  # the caller's object keeps its own context
            out[key].context = dataclasses.replace(loss.context, scores=context.scores)
        return out

    def _observed_sets(self, observed: LabelRows, observed_iu) -> dict[str, LabelRows]:
        """Each observed set the losses train on."""
        observed_sets = {loss.trains_on: observed for loss in self.losses_.values()}
        needs_negatives = [k for k, v in self.losses_.items() if v.trains_on == WITH_NEGATIVES]
        if needs_negatives:
            if observed_iu is None:
                raise ValueError(
                    f"{needs_negatives[0]} trains on observed negatives: pass observed_iu, an "
                    "observed set with 1 positive + 1 negative per image"
                )
            observed_sets[WITH_NEGATIVES] = as_labels(
                observed_iu, self.dtype, self.device_, self.resident_labels
            )
        return observed_sets

    def _build_groups(self, data: TrainingData) -> None:
        """One group per (seed, batch size), in that order; :attr:`heads_` in group order."""
        num_rows, num_features = data.X.num_rows, data.X.width - 1
        num_classes = next(iter(data.observed.values())).shape[1]
        self.heads_: list[HeadConfig] = []
        self.groups_: list[HeadGroup] = []
        for seed in self.seeds:
            for bs in self.batch_sizes:
                heads = [HeadConfig(loss, lr, bs, seed) for lr in self.lrs for loss in self.losses_]
                # Weight entries times steps: compiling pays off only for large sweeps.
                work = (num_features + 1) * num_classes * len(heads)
                work *= (num_rows // bs) * self.epochs
                group = HeadGroup(
                    heads, self.losses_, data, self.epochs, dtype=self.dtype,
                    graphs=self.cuda_graphs, compiled=fused.enabled(self.device_, work),
                    update=self.update,
                )  # fmt: skip
                self.groups_.append(group)
                self.heads_.extend(group.heads)

    def _load_state(self, state: dict) -> None:
        saved = [HeadConfig(**h) for h in state["heads"]]
        if saved != [h for g in self.groups_ for h in g.heads]:
            raise ValueError("the saved sweep has other heads than this one")
        for group, group_state in zip(self.groups_, state["groups"], strict=True):
            group.load_state_dict(group_state)
        self.history_ = list(state["history"])

    def _collect(self) -> None:
        self.best_val_map_ = np.concatenate([g.best_val.numpy() for g in self.groups_])
        self.best_epoch_ = np.concatenate([g.best_epoch.numpy() for g in self.groups_])
        weight = torch.cat([g.best_weight.cpu() for g in self.groups_])
        self.coef_ = weight[..., :-1]
        self.intercept_ = weight[..., -1]
        self.exported_state_: dict[str, dict[str, torch.Tensor]] = {}
        for group in self.groups_:
            for position, head in enumerate(group.heads):
                exported = group.exported_state(position)
                if exported:
                    self.exported_state_[head.name] = exported


def _split_record(group: HeadGroup, record: dict) -> list[dict]:
    """One history row per head of a group's epoch record."""
    rows = []
    estimates = record.get("estimator_histogram", {})
    for i, head in enumerate(group.heads):
        row = {
            "head": head.name,
            "epoch": record["epoch"],
            "val_map": float(record["val_map"][i]),
            "train_loss": float(record["train_loss"][i]),
        }
        if "histogram" in record:
            row["hidden_positive_histogram"] = record["histogram"][i].tolist()
        if i in estimates:
            row["estimator_histogram"] = estimates[i].tolist()
        rows.append(row)
    return rows
