"""``spl fit-linear``: every loss's linear heads on cached features, as one resumable run.

A grid orchestrator: it reads the prepared dataset and the feature file, creates or resumes
the run (:class:`spl.runs.Run`), trains the engine (:class:`spl.fit.engine.StackedHeads`),
which also scores the test split, and writes what the engine computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spl.data import protocol
from spl.data.common import SplError
from spl.data.prepared import PreparedDataset, load_prepared
from spl.data.runtime import resolve_device
from spl.evaluate import paper, report
from spl.extract.features import load_features, unreadable_rows
from spl.fit import fused
from spl.fit.engine import StackedHeads
from spl.fit.losses import LOSSES, SINGLE_POSITIVE, WITH_NEGATIVES, Context, Loss, make_losses
from spl.runs import CHECKPOINT, Run
from spl.settings import LinearSettings

RESULT_COLUMNS = [
    "head", "loss", "lr", "batch_size", "seed", "best_epoch", "val_map", "test_map",
    "test_map_paper_metric", "train_recovery_map", "estimator_recovery_map",
    "test_p_at_1", "test_r_at_1", "test_p_at_3", "test_r_at_3", "observed", "val",
]  # fmt: skip


@dataclass
class SplitData:
    """Features and labels of the three splits, without the rows of unreadable images."""

    features: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]  # rows of the source file
    observed: dict[str, np.ndarray]  # training rows of each observed set the losses need
    excluded: dict[str, int]


def split_data(
    prepared: PreparedDataset, tag: str, settings: LinearSettings, trains_on: set[str]
) -> SplitData:
    """Slice features and labels per split; rows recorded as unreadable images are left out."""
    feature_set = load_features(prepared, tag)
    unreadable = unreadable_rows(prepared, tag)
    features, labels, rows, excluded = {}, {}, {}, {}
    for split in ("train", "val", "test"):
        source, split_rows = prepared.rows(split)
        keep = ~np.isin(split_rows, unreadable[source])
        excluded[split] = int((~keep).sum())
        rows[split] = split_rows[keep]
        features[split] = torch.from_numpy(
            np.ascontiguousarray(feature_set.features[source][rows[split]], dtype=np.float32)
        )
        labels[split] = prepared.labels[source][rows[split]]
        if len(rows[split]) == 0:
            raise SplError(f"the {split} split of {prepared.path} has no rows with features")
    if len(rows["train"]) < max(settings.batch_sizes):
        raise SplError(
            f"the train split has {len(rows['train'])} rows, fewer than batch size "
            f"{max(settings.batch_sizes)}: an epoch would have no batch. Use smaller "
            f"--batch-sizes (smallest given: {min(settings.batch_sizes)})"
        )
    observed = {}
    for kind in trains_on:
        name = settings.observed_for(kind)
        if kind == WITH_NEGATIVES:
            check_negatives(
                prepared, name, [k for k in settings.losses if LOSSES[k].trains_on == kind]
            )
        observed[kind] = prepared.observed_set(name)["trainval"][rows["train"]]
    return SplitData(features, labels, rows, observed, excluded)


def check_negatives(prepared: PreparedDataset, name: str, losses: list[str]) -> None:
    """Losses that train on observed negatives need a set that has them."""
    available = [n for n, p in prepared.observed_params.items() if p.get("num_neg", 0) != 0]
    who = ", ".join(losses)
    if name not in prepared.observed:
        raise SplError(
            f"{who} trains on observed negatives, but {prepared.path} has no observed set "
            f"{name!r}; sets with negatives: {', '.join(available) or 'none'}. Pass "
            f"--observed-iu with one of them, or add one with `spl data observe "
            f"{prepared.path.parent} --num-pos 1 --num-neg 1`"
        )
    if name not in available:
        raise SplError(
            f"{who} trains on observed negatives, but the set {name!r} has none; use "
            f"--observed-iu with a set that has (num_neg >= 1): {', '.join(available) or 'none'}"
        )


def resolve_losses(
    prepared: PreparedDataset, settings, keys: list[str], epochs: int
) -> dict[str, Loss]:
    """The run's loss objects, with their options resolved against the dataset and checked
    before a run exists: option values, schedules that must fit in ``epochs``, and losses
    that assume single positives against observed sets with negatives."""
    losses = make_losses(keys, settings.loss_options, loss_context(prepared, settings))
    for key, loss in losses.items():
        loss.check_epochs(epochs)
        name = settings.observed_for(loss.trains_on)
        negatives = prepared.observed_params.get(name, {}).get("num_neg", 0)
        if loss.single_positive_only and negatives:
            raise SplError(
                f"{key} assumes single positives (no observed negatives), but the observed set "
                f"{name!r} has {negatives if negatives != -1 else 'all'} negatives per image; "
                f"pass --observed with a set drawn with --num-neg 0 (e.g. {protocol.OBSERVED})"
            )
    return losses


def loss_context(prepared: PreparedDataset, settings) -> Context:
    k = settings.expected_positives
    return Context(
        num_classes=prepared.num_classes,
        expected_positives=prepared.expected_positives if k is None else k,
        dataset=prepared.name,
    )


def run_linear(
    dataset_dir: Path,
    tag: str,
    settings: LinearSettings,
    out_root: Path,
    *,
    resume: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the sweep and write the run directory; returns its path."""
    prepared = load_prepared(dataset_dir)
    context = loss_context(prepared, settings)
    losses = resolve_losses(prepared, settings, settings.losses, settings.epochs)
    trains_on = {SINGLE_POSITIVE} | {loss.trains_on for loss in losses.values()}
    data = split_data(prepared, tag, settings, trains_on)
    fused.setting()  # a bad SPL_COMPILE fails here, before a run directory exists
    device = resolve_device(settings.device)
    if resume is None:
        feature_attrs = load_features(prepared, tag, check_finite=False).attrs
        run = Run.create(Path(out_root) / prepared.name / tag, "linear", {
            "dataset": str(prepared.path.parent.resolve()),
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            "feature_tag": tag,
            "feature_attrs": {
                k: feature_attrs.get(k)
                for k in ("backbone", "weights", "weights_source", "image_size", "dtype")
            },
            "settings": dataclasses.asdict(settings),
            "loss_options": {k: dataclasses.asdict(v.options) for k, v in losses.items()},
            "expected_positives": context.expected_positives,
            "excluded_bad_rows": data.excluded,
            "classes": prepared.classes,
            "device": str(device),
        })  # fmt: skip
    else:
        run = Run.resume(resume, "linear")
    # A run killed before its first checkpoint starts again from the beginning.
    state = run.load(CHECKPOINT, "linear-run checkpoint")
    run.reset_history(state["history"] if state is not None else [])
    for split, count in data.excluded.items():
        if count:
            log(f"note: {count} {split} rows have no features (bad images) and are left out")
    model = StackedHeads(
        losses=settings.losses,
        lrs=settings.lrs,
        batch_sizes=settings.batch_sizes,
        seeds=settings.seeds,
        epochs=settings.epochs,
        loss_options=settings.loss_options,
        expected_positives=context.expected_positives,
        dataset=prepared.name,
        device=device,
        histogram_bins=settings.histogram_bins,
    )
    bar = _progress_bar(settings, len(data.features["train"]), state, progress)

    def on_epoch(model: StackedHeads, record: dict) -> None:
        run.save(CHECKPOINT, model.state_dict())
        run.append_history(model.history_[-len(record["group"].heads) :])
        if bar is not None:
            bar.set_postfix(best_val=f"{float(record['val_map'].max()):.1f}", refresh=False)

    model.fit(
        data.features["train"],
        data.observed[SINGLE_POSITIVE],
        labels=data.labels["train"],
        X_val=data.features["val"],
        Y_val=settings.selection_labels(prepared, data.rows["val"]),
        observed_iu=data.observed.get(WITH_NEGATIVES),
        X_test=data.features["test"],
        Y_test=data.labels["test"],
        state=state,
        on_epoch=on_epoch,
        on_step=None if bar is None else (lambda _: bar.update()),
    )
    if bar is not None:
        bar.close()
    write_results(run, prepared, tag, model, data, settings)
    run.complete(train_seconds=round(model.train_seconds_, 2))
    return run.path


def _progress_bar(settings: LinearSettings, num_rows: int, state: dict | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    group_sizes = [bs for _ in settings.seeds for bs in settings.batch_sizes]
    per_epoch = sum(num_rows // bs for bs in group_sizes)
    done = 0
    if state is not None:
        done = sum(
            g["epochs_done"] * (num_rows // bs)
            for g, bs in zip(state["groups"], group_sizes, strict=True)
        )
    return tqdm(
        total=per_epoch * settings.epochs, initial=done, unit="step", desc="fit-linear",
        leave=False,
    )  # fmt: skip


def write_results(run: Run, prepared, tag, model: StackedHeads, data: SplitData, settings) -> None:
    """results.csv, per_class_ap.csv, heads.pt and summary.md of a finished sweep."""
    # The protocol in every row: which observed labels trained it and which val labels
    # selected its epoch.
    rows = [{**row, "observed": settings.observed, "val": settings.val} for row in model.results_]
    run.write_csv("results.csv", rows, RESULT_COLUMNS)
    run.write_csv(
        "per_class_ap.csv",
        [{"head": r["head"], **dict(zip(prepared.classes, ap, strict=True))}
         for r, ap in zip(rows, model.per_class_ap_, strict=True)],
        ["head", *prepared.classes],
    )  # fmt: skip
    run.save(
        "heads.pt",
        {
            "heads": [dataclasses.asdict(h) for h in model.heads_],
            "names": [h.name for h in model.heads_],
            "weight": model.coef_.float(),
            "bias": model.intercept_.float(),
            "best_epoch": torch.from_numpy(model.best_epoch_),
            "classes": list(prepared.classes),
            "feature_tag": tag,
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            # Each head's loss state at its best epoch (ROLE: the label estimates) for the
            # training-split rows in `train_rows` order: LinearInit carries it over.
            "state": model.exported_state_,
            "train_rows": torch.from_numpy(data.rows["train"]),
        },
    )
    differences = paper.protocol_differences(
        "linear", tag=tag, lrs=settings.lrs, batch_sizes=settings.batch_sizes,
        epochs=settings.epochs, observed=settings.observed, val=settings.val,
    )  # fmt: skip
    run.write_text(
        "summary.md",
        report.linear_summary(
            prepared.name, tag, rows, LOSSES, differences,
            protocol=report.protocol_text(settings.observed, settings.val),
        ),
    )  # fmt: skip
