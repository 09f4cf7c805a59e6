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
from spl.fit import fused
from spl.fit.epoch import split_map, train_epoch, validate
from spl.fit.group import HeadGroup, TrainingData, gradient_route
from spl.fit.heads import (
    HeadConfig,
    as_tensor,
    augment,
    epoch_batches,
    epoch_permutation,
    head_name,
    initial_head,
    stacked_logits,
)
from spl.fit.losses import WITH_NEGATIVES, Context, Loss, Scores, get_loss, make_losses
from spl.fit.step import batch_gradients

__all__ = [
    "HeadConfig", "StackedHeads", "batch_gradients", "epoch_batches", "epoch_permutation",
    "gradient_route", "head_name", "initial_head",
]  # fmt: skip

# Where a fit's time goes (``timings_``, seconds): building the groups (on a CPU the first
# time a machine meets a group's shapes, timing its update paths), each group's first step
# of each epoch (the first one compiles on a CPU), the other steps, the losses' epoch hooks
# (with their scoring passes), validation, and the caller's on_epoch (checkpoints).
TIMINGS = ("setup", "first_step", "steps", "loss_hooks", "validation", "on_epoch")

# What ``losses=`` takes: loss keys (resolved here), or losses resolved already.
LossesArgument = Sequence[str] | Mapping[str, Loss] | Sequence[Loss]


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

    # ------------------------------------------------------------------ training

    def fit(
        self,
        X: np.ndarray | torch.Tensor,
        observed: np.ndarray | torch.Tensor,
        *,
        labels: np.ndarray | torch.Tensor,
        X_val: np.ndarray | torch.Tensor,
        Y_val: np.ndarray | torch.Tensor,
        observed_iu: np.ndarray | torch.Tensor | None = None,
        state: dict | None = None,
        on_epoch: Callable[[StackedHeads, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        scores: Scores | np.ndarray | torch.Tensor | None = None,
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

        Learned: ``coef_ [H, L, D]``, ``intercept_ [H, L]`` (best-epoch weights),
        ``best_epoch_``, ``best_val_map_``, ``heads_``, ``history_`` (one row per head and
        epoch), ``exported_state_`` (per head name, its loss's exported state at its best
        epoch; only heads whose loss exports one), ``losses_``, ``train_seconds_``,
        ``timings_`` (where the time went: :data:`TIMINGS`).
        """
        started = time.perf_counter()
        self.prepare(X, observed, labels=labels, X_val=X_val, Y_val=Y_val,
                     observed_iu=observed_iu, state=state, scores=scores)  # fmt: skip
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
                                 histogram_bins=self.histogram_bins)
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
            self._collect()
        for group in self.groups_:
            group.data = None  # the device's copy of the data goes with the sweep
        return self

    def prepare(
        self,
        X: np.ndarray | torch.Tensor,
        observed: np.ndarray | torch.Tensor,
        *,
        labels: np.ndarray | torch.Tensor,
        X_val: np.ndarray | torch.Tensor,
        Y_val: np.ndarray | torch.Tensor,
        observed_iu: np.ndarray | torch.Tensor | None = None,
        state: dict | None = None,
        scores: Scores | np.ndarray | torch.Tensor | None = None,
    ) -> StackedHeads:
        """What :meth:`fit` does before training (its arguments, less the callbacks): check
        the inputs, resolve the losses, put the data on the device and build the groups
        (:attr:`groups_`, each with its :attr:`~spl.fit.group.HeadGroup.data`), resumed
        from ``state`` if given. Public for the checks that step a group by hand
        (:mod:`spl.fit.step`)."""
        if not self._resolved_losses_given():
            for key in self.losses:
                get_loss(key)
        device = resolve_device(self.device)
        self.device_ = device
        dtype = self.dtype
        X = augment(as_tensor(X, dtype, device))
        observed = as_tensor(observed, dtype, device)
        labels = as_tensor(labels, dtype, device)
        if scores is not None and not isinstance(scores, Scores):
            scores = Scores(
                torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores)
            )
        context = Context(observed.shape[1], self.expected_positives, self.dataset, scores)
        self.losses_ = self._resolve_losses(context)
        for loss in self.losses_.values():
            loss.check_epochs(self.epochs)
        observed_sets = self._observed_sets(observed, observed_iu)
        small = [b for b in self.batch_sizes if b > X.shape[0]]
        if small:
            raise ValueError(
                f"the training split has {X.shape[0]} rows, fewer than batch size {small[0]}"
            )
        data = TrainingData(
            X=X,
            observed=observed_sets,
            labels=labels,
            X_val=augment(as_tensor(X_val, dtype, device)),
            Y_val=as_tensor(Y_val, dtype, device),
            # Entries whose probabilities the paper's figure follows: unobserved positives.
            hidden_positives=(labels == 1) & (observed == 0),
        )
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

    def decision_function(self, X: np.ndarray | torch.Tensor, *, best: bool = True) -> torch.Tensor:
        """Logits ``[H, N, L]`` of every head (best-epoch weights by default), on the CPU."""
        return torch.cat([logits for _, logits in self.decision_blocks(X, best=best)])

    def decision_blocks(
        self, X: np.ndarray | torch.Tensor, *, best: bool = True
    ) -> Iterator[tuple[list[HeadConfig], torch.Tensor]]:
        """:meth:`decision_function` one group at a time, in :attr:`heads_` order: (the
        group's heads, their logits ``[h, N, L]`` on the CPU), one group's logits in memory
        at a time."""
        X = augment(as_tensor(X, self.dtype, self.device_))
        for group in self.groups_:
            weight = group.best_weight if best else group.weight
            yield group.heads, stacked_logits(X, weight).cpu()

    def score(self, X, Y, *, best: bool = True) -> np.ndarray:
        """mAP (x100) of every head on (X, Y), in :attr:`heads_` order."""
        X = augment(as_tensor(X, self.dtype, self.device_))
        Y = as_tensor(Y, self.dtype, self.device_)
        return torch.cat(
            [
                split_map(X, g.best_weight if best else g.weight, Y, self.eval_chunk_heads)
                for g in self.groups_
            ]
        ).numpy()

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

    def _observed_sets(self, observed: torch.Tensor, observed_iu) -> dict[str, torch.Tensor]:
        """Each observed set the losses train on, on the device."""
        observed_sets = {loss.trains_on: observed for loss in self.losses_.values()}
        needs_negatives = [k for k, v in self.losses_.items() if v.trains_on == WITH_NEGATIVES]
        if needs_negatives:
            if observed_iu is None:
                raise ValueError(
                    f"{needs_negatives[0]} trains on observed negatives: pass observed_iu, an "
                    "observed set with 1 positive + 1 negative per image"
                )
            observed_sets[WITH_NEGATIVES] = as_tensor(observed_iu, self.dtype, self.device_)
        return observed_sets

    def _build_groups(self, data: TrainingData) -> None:
        """One group per (seed, batch size), in that order; :attr:`heads_` in group order."""
        num_rows, num_features = data.X.shape[0], data.X.shape[1] - 1
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
