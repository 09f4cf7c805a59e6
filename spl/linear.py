"""``spl fit-linear``: every loss's linear heads on cached features, as one resumable run.

A grid orchestrator: it reads the prepared dataset and the feature file, creates or resumes
the run (:class:`spl.runs.Run`), trains the engine (:class:`spl.fit.engine.StackedHeads`),
scores the test split with it (:func:`spl.evaluate.scoring.linear_results`) and writes
what the engine computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from spl.evaluate.scoring import linear_results
from spl.extract.features import load_features, unreadable_rows
from spl.extract.scores import ScoreSet, load_scores
from spl.fit import fused
from spl.fit.engine import StackedHeads
from spl.fit.losses import (
    LOSSES,
    SINGLE_POSITIVE,
    VISION_LANGUAGE,
    WITH_NEGATIVES,
    Context,
    Loss,
    Scores,
    make_losses,
)
from spl.fit.pseudo_labels import QUALITY_COLUMNS, pseudo_label_quality
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
    feature_attrs: dict  # the feature file's attributes (its provenance)


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
    return SplitData(features, labels, rows, observed, excluded, feature_set.attrs)


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


def load_training_scores(
    prepared: PreparedDataset, settings, losses: dict[str, Loss]
) -> ScoreSet | None:
    """The scores file of ``--scores`` for the losses that train on pseudo-labels from a
    vision-language model, checked before a run exists: refused when such a loss has no
    ``--scores``, when no loss of the run reads it, when the file is missing or was made
    from another prepared dataset, and when it lacks what a loss needs (AEVLP's tiles)."""
    readers = [key for key, loss in losses.items() if loss.reads_scores]
    tag = getattr(settings, "scores", None)
    folder = prepared.path.parent / "scores"
    if readers and tag is None:
        available = sorted(p.stem for p in folder.glob("*.h5"))
        raise SplError(
            f"{', '.join(readers)} {'trains' if len(readers) == 1 else 'train'} on "
            "pseudo-labels from a vision-language model's "
            f"scores: pass --scores TAG, the file {folder}/TAG.h5 (tags there: "
            f"{', '.join(available) or 'none'}). Make one with `spl pseudo-labels "
            f"{prepared.path.parent}` or `spl import-scores {prepared.path.parent} ...`"
        )
    if tag is None:
        return None
    if not readers:
        raise SplError(
            f"--scores {tag}: no loss of this run reads scores (those that do: "
            f"{', '.join(VISION_LANGUAGE)})"
        )
    try:
        score_set = load_scores(prepared, tag)
    except SplError as exc:
        raise SplError(f"--scores {tag}: {exc}") from None
    whole = Scores(
        torch.from_numpy(score_set.scores["trainval"]),
        None if score_set.tiles is None else torch.from_numpy(score_set.tiles["trainval"]),
        tag,
    )
    for key in readers:
        losses[key].check_scores(whole, str(score_set.path))
    return score_set


def training_scores(score_set: ScoreSet | None, rows: np.ndarray) -> Scores | None:
    """The scores of the training ``rows`` (of the trainval file), in their order."""
    if score_set is None:
        return None

    def take(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array[rows], dtype=np.float32))

    tiles = None if score_set.tiles is None else take(score_set.tiles["trainval"])
    return Scores(take(score_set.scores["trainval"]), tiles, score_set.tag)


def pseudo_labels_of(
    losses: dict[str, Loss], scores: Scores | None, observed: np.ndarray
) -> dict[str, np.ndarray]:
    """Each score-reading loss's pseudo-positives ``[N, L]`` of the training rows, by the
    rule and options it trains with."""
    if scores is None:
        return {}
    observed_t = torch.from_numpy(np.asarray(observed, dtype=np.float32))
    return {
        key: loss.pseudo_labels(observed_t, scores)[0].numpy()
        for key, loss in losses.items()
        if loss.reads_scores
    }


def scores_record(score_set: ScoreSet | None, pseudo: dict[str, np.ndarray]) -> dict | None:
    """What a run records of its scores file, with a digest of each loss's pseudo-labels
    (which --resume checks again)."""
    if score_set is None:
        return None
    keys = ("scorer", "weights", "weights_sha256", "prompt", "grid", "image_size", "normalize",
            "created", "imported_from")  # fmt: skip
    digests = {
        key: hashlib.sha256(np.packbits(positives).tobytes()).hexdigest()
        for key, positives in pseudo.items()
    }
    return {"tag": score_set.tag, **{k: score_set.attrs.get(k) for k in keys},
            "pseudo_positives_sha256": digests}  # fmt: skip


def check_resumed_scores(run: Run, record: dict | None) -> None:
    """A resumed run must train on the pseudo-labels it started with."""
    saved = (run.config.get("scores") or {}).get("pseudo_positives_sha256")
    now = (record or {}).get("pseudo_positives_sha256")
    if saved is not None and saved != now:
        raise SplError(
            f"--resume {run.path}: the pseudo-labels from --scores {record['tag']} differ from "
            f"those the run started with (the scores file was rebuilt since, created "
            f"{run.config['scores'].get('created')}, now {record.get('created')}); start a "
            "new run"
        )


def pseudo_label_rows(
    pseudo: dict[str, np.ndarray], observed: np.ndarray, labels: np.ndarray, classes: list[str]
) -> list[dict]:
    """Per loss and class, its pseudo-positives on the training rows against their hidden
    full labels (:func:`spl.fit.pseudo_labels.pseudo_label_quality`)."""
    rows: list[dict] = []
    for key, positives in pseudo.items():
        rows += pseudo_label_quality(positives, observed, labels, classes, key)
    return rows


def write_pseudo_labels(run: Run, rows: list[dict], tag: str | None, num_rows: int) -> str:
    """pseudo_labels.csv and .json in the run; returns the summary.md section."""
    if not rows:
        return ""
    run.write_csv("pseudo_labels.csv", rows, QUALITY_COLUMNS)
    run.write_json("pseudo_labels.json", rows)

    def cell(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [
        f"\n## Pseudo-labels (scores `{tag}`)\n",
        f"Computed once from the scores file for the {num_rows} training rows (no random "
        "flip, no graph network: docs/scores.md); precision and recall (%) of the "
        "pseudo-positives against the hidden full labels, overall and on the unobserved "
        "entries, where they are trained on. Per class: pseudo_labels.csv.\n",
        "| loss | pseudo-positives | precision | recall | unobserved | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["class"] == "(all)":
            lines.append(
                f"| {row['loss']} | {row['pseudo_positives']} | {cell(row['precision'])} | "
                f"{cell(row['recall'])} | {row['unobserved_pseudo_positives']} | "
                f"{cell(row['unobserved_precision'])} | {cell(row['unobserved_recall'])} |"
            )
    return "\n".join(lines) + "\n"


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
    score_set = load_training_scores(prepared, settings, losses)
    trains_on = {SINGLE_POSITIVE} | {loss.trains_on for loss in losses.values()}
    data = split_data(prepared, tag, settings, trains_on)
    scores = training_scores(score_set, data.rows["train"])
    pseudo = pseudo_labels_of(losses, scores, data.observed[SINGLE_POSITIVE])
    fused.setting()  # a bad SPL_COMPILE fails here, before a run directory exists
    device = resolve_device(settings.device)
    if resume is None:
        run = Run.create(Path(out_root) / prepared.name / tag, "linear", {
            "dataset": str(prepared.path.parent.resolve()),
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            "feature_tag": tag,
            "feature_attrs": {
                k: data.feature_attrs.get(k)
                for k in ("backbone", "weights", "weights_source", "image_size", "dtype")
            },
            "settings": dataclasses.asdict(settings),
            "loss_options": {k: dataclasses.asdict(v.options) for k, v in losses.items()},
            "expected_positives": context.expected_positives,
            "excluded_bad_rows": data.excluded,
            "classes": prepared.classes,
            "device": str(device),
            "scores": scores_record(score_set, pseudo),
        })  # fmt: skip
    else:
        run = Run.resume(resume, "linear")
        check_resumed_scores(run, scores_record(score_set, pseudo))
    quality = pseudo_label_rows(
        pseudo, data.observed[SINGLE_POSITIVE], data.labels["train"], prepared.classes
    )
    pseudo_summary = write_pseudo_labels(run, quality, settings.scores, len(data.rows["train"]))
    # A run killed before its first checkpoint starts again from the beginning.
    state = run.load(CHECKPOINT, "linear-run checkpoint")
    run.reset_history(state["history"] if state is not None else [])
    for split, count in data.excluded.items():
        if count:
            log(f"note: {count} {split} rows have no features (bad images) and are left out")
    if scores is not None:
        unscored = int((~torch.isfinite(scores.image).all(dim=1)).sum())
        if unscored:
            log(f"note: {unscored} train rows have no scores (bad images): no pseudo-labels")
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
        state=state,
        on_epoch=on_epoch,
        on_step=None if bar is None else (lambda _: bar.update()),
        scores=scores,
    )
    if bar is not None:
        bar.close()
    write_results(run, prepared, tag, model, data, settings, pseudo_summary)
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


def write_results(
    run: Run, prepared, tag, model: StackedHeads, data: SplitData, settings, extra: str = ""
) -> None:
    """results.csv, per_class_ap.csv, heads.pt and summary.md of a finished sweep (``extra``:
    sections appended to the summary)."""
    # The protocol in every row: which observed labels trained it and which val labels
    # selected its epoch.
    results, per_class_ap = linear_results(
        model, data.features["test"], data.labels["test"],
        X_train=data.features["train"], Y_train=data.labels["train"],
    )  # fmt: skip
    rows = [{**row, "observed": settings.observed, "val": settings.val} for row in results]
    run.write_csv("results.csv", rows, RESULT_COLUMNS)
    run.write_csv(
        "per_class_ap.csv",
        [{"head": r["head"], **dict(zip(prepared.classes, ap, strict=True))}
         for r, ap in zip(rows, per_class_ap, strict=True)],
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
        ) + extra,
    )  # fmt: skip
