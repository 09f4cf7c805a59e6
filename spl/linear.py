"""``spl fit-linear``: every loss's linear heads on cached features, as one resumable run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spl.data.common import SplError, write_text_atomic
from spl.data.prepared import PreparedDataset, load_prepared
from spl.evaluate import paper
from spl.evaluate.metrics import average_precision, mean_average_precision, precision_recall_at_k
from spl.evaluate.selection import format_mean_std, select_best
from spl.extract.features import FeatureSet, load_features
from spl.fit import fused
from spl.fit.engine import (
    PAPER_BATCH_SIZES,
    PAPER_LINEAR_EPOCHS,
    PAPER_LRS,
    StackedHeads,
    resolve_device,
)
from spl.fit.losses import LOSSES, PAPER_LOSSES
from spl.runs import (
    append_jsonl,
    command_line,
    load_torch,
    mark_complete,
    new_run_dir,
    now,
    read_config,
    save_torch,
    write_config,
    write_csv,
)
from spl.settings import LossSettings

RESULT_COLUMNS = [
    "head", "loss", "lr", "batch_size", "seed", "best_epoch", "val_map", "test_map",
    "train_recovery_map", "estimator_recovery_map",
    "test_p_at_1", "test_r_at_1", "test_p_at_3", "test_r_at_3",
]  # fmt: skip
CHECKPOINT = "checkpoint.pt"


@dataclass
class LinearSettings(LossSettings):
    """The sweep; defaults are the paper's protocol (paper.md section 5)."""

    losses: list[str] = field(default_factory=lambda: list(PAPER_LOSSES))
    lrs: list[float] = field(default_factory=lambda: list(PAPER_LRS))
    batch_sizes: list[int] = field(default_factory=lambda: list(PAPER_BATCH_SIZES))
    epochs: int = PAPER_LINEAR_EPOCHS
    seeds: list[int] = field(default_factory=lambda: [0])
    histogram_bins: int = 20
    device: str = "auto"


@dataclass
class SplitData:
    """Features and labels of the three splits, with the rows a bad image removed."""

    features: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]  # rows of the source file
    observed: np.ndarray
    observed_iu: np.ndarray | None
    excluded: dict[str, int]


def split_data(
    prepared: PreparedDataset, feature_set: FeatureSet, settings: LinearSettings
) -> SplitData:
    """Slice features and labels per split; rows recorded as bad images are left out."""
    features, labels, rows, excluded = {}, {}, {}, {}
    for split in ("train", "val", "test"):
        source, split_rows = prepared.rows(split)
        keep = ~np.isin(split_rows, feature_set.bad_rows[source])
        excluded[split] = int((~keep).sum())
        rows[split] = split_rows[keep]
        features[split] = torch.from_numpy(
            np.ascontiguousarray(feature_set.features[source][rows[split]], dtype=np.float32)
        )
        labels[split] = prepared.labels[source][rows[split]]
    observed_all = prepared.observed_set(settings.observed)["trainval"]
    observed_iu = None
    if "iu" in settings.losses:
        available = [
            name for name, p in prepared.observed_params.items() if p.get("num_neg", 0) != 0
        ]
        if settings.observed_iu not in prepared.observed:
            raise SplError(
                f"iu trains on observed negatives, but {prepared.path} has no observed set "
                f"{settings.observed_iu!r}; sets with negatives: {', '.join(available) or 'none'}. "
                f"Pass --observed-iu with one of them, or add one with `spl data observe "
                f"{prepared.path.parent} --num-pos 1 --num-neg 1`"
            )
        if settings.observed_iu not in available:
            raise SplError(
                f"iu trains on observed negatives, but the set {settings.observed_iu!r} has none; "
                f"use --observed-iu with a set that has (num_neg >= 1): {', '.join(available) or 'none'}"
            )
        observed_iu = prepared.observed[settings.observed_iu]["trainval"][rows["train"]]
    for split, values in features.items():
        smallest = min(settings.batch_sizes)
        if split == "train" and len(values) < max(settings.batch_sizes):
            raise SplError(
                f"the train split has {len(values)} rows, fewer than batch size "
                f"{max(settings.batch_sizes)}: an epoch would have no batch. Use smaller "
                f"--batch-sizes (smallest given: {smallest})"
            )
        if len(values) == 0:
            raise SplError(f"the {split} split of {prepared.path} has no rows with features")
    return SplitData(
        features=features,
        labels=labels,
        rows=rows,
        observed=observed_all[rows["train"]],
        observed_iu=observed_iu,
        excluded=excluded,
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
    feature_set = load_features(prepared, tag)
    data = split_data(prepared, feature_set, settings)
    options = settings.loss_options(prepared)
    fused.setting()  # a bad SPL_COMPILE fails here, before a run directory exists
    if resume is None:
        run_dir = new_run_dir(Path(out_root) / prepared.name / tag, "linear")
        config = {
            "kind": "linear",
            "dataset": str(prepared.path.parent.resolve()),
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            "feature_tag": tag,
            "feature_attrs": {
                k: feature_set.attrs.get(k)
                for k in ("backbone", "weights", "weights_source", "image_size", "dtype")
            },
            "settings": dataclasses.asdict(settings),
            "loss_options": options.to_dict(),
            "excluded_bad_rows": data.excluded,
            "classes": prepared.classes,
            "started": now(),
            "command": command_line(),
            "device": str(resolve_device(settings.device)),
        }
        write_config(run_dir, config)
        state = None
    else:
        run_dir = Path(resume)
        state = load_torch(run_dir / CHECKPOINT, "linear-run checkpoint")
        # history.jsonl may hold rows past the checkpoint: rewrite it from the checkpoint
        (run_dir / "history.jsonl").unlink(missing_ok=True)
        append_jsonl(run_dir / "history.jsonl", state["history"])
    for split, count in data.excluded.items():
        if count:
            log(f"note: {count} {split} rows have no features (bad images) and are left out")
    model = StackedHeads(
        losses=settings.losses,
        lrs=settings.lrs,
        batch_sizes=settings.batch_sizes,
        seeds=settings.seeds,
        epochs=settings.epochs,
        options=options,
        device=settings.device,
        histogram_bins=settings.histogram_bins,
    )
    bar = _progress_bar(model, len(data.features["train"]), state, progress)

    def on_epoch(model: StackedHeads, record: dict) -> None:
        save_torch(run_dir / CHECKPOINT, model.state_dict())
        group = record["group"]
        append_jsonl(run_dir / "history.jsonl", model.history_[-len(group.heads) :])
        if bar is not None:
            bar.set_postfix(best_val=f"{float(record['val_map'].max()):.1f}", refresh=False)

    model.fit(
        data.features["train"],
        data.observed,
        labels=data.labels["train"],
        X_val=data.features["val"],
        Y_val=data.labels["val"],
        observed_iu=data.observed_iu,
        state=state,
        on_epoch=on_epoch,
        on_step=None if bar is None else (lambda _: bar.update()),
    )
    if bar is not None:
        bar.close()
    rows, per_class, estimates = evaluate_heads(model, data)
    write_results(run_dir, prepared, tag, model, rows, per_class, estimates, data)
    config = read_config(run_dir)
    config.update({"finished": now(), "train_seconds": round(model.train_seconds_, 2)})
    write_config(run_dir, config)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    mark_complete(run_dir)
    return run_dir


def _progress_bar(model: StackedHeads, num_rows: int, state: dict | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    per_epoch = sum(num_rows // bs for bs in model.batch_sizes) * len(model.seeds)
    done = 0
    if state is not None:
        done = sum(
            g["epochs_done"] * (num_rows // bs)
            for g, bs in zip(state["groups"], _group_batch_sizes(model), strict=True)
        )
    return tqdm(
        total=per_epoch * model.epochs, initial=done, unit="step", desc="fit-linear", leave=False
    )


def _group_batch_sizes(model: StackedHeads) -> list[int]:
    return [bs for _ in model.seeds for bs in model.batch_sizes]


@torch.no_grad()
def evaluate_heads(model: StackedHeads, data: SplitData):
    """Score every head once with its best weights: test mAP, per-class AP, P/R@k, and the
    training-set recovery of the hidden labels (paper Table 2; ROLE's estimator too)."""
    test_labels = torch.from_numpy(data.labels["test"].astype(np.float32))
    train_labels = torch.from_numpy(data.labels["train"].astype(np.float32))
    rows, per_class, estimates = [], [], {}
    offset = 0
    for group in model.groups_:
        n_heads = len(group.heads)
        index = slice(offset, offset + n_heads)
        offset += n_heads
        test_logits = _group_logits(model, group, data.features["test"])
        train_logits = _group_logits(model, group, data.features["train"])
        test_ap = torch.cat([average_precision(t[None], test_labels) for t in test_logits])
        train_map = mean_average_precision(train_logits, train_labels, chunk=4)
        for i, head in enumerate(group.heads):
            p1, r1 = precision_recall_at_k(test_logits[i], test_labels, 1)
            p3, r3 = precision_recall_at_k(test_logits[i], test_labels, 3)
            row = {
                "head": head.name,
                "loss": head.loss,
                "lr": head.lr,
                "batch_size": head.batch_size,
                "seed": head.seed,
                "best_epoch": int(model.best_epoch_[index][i]),
                "val_map": float(model.best_val_map_[index][i]),
                "test_map": float(100 * test_ap[i].mean()),
                "train_recovery_map": float(train_map[i]),
                "test_p_at_1": 100 * p1,
                "test_r_at_1": 100 * r1,
                "test_p_at_3": 100 * p3,
                "test_r_at_3": 100 * r3,
            }
            if head.loss == "role":
                probs = model.estimator_probabilities(head)
                estimates[head.name] = probs
                row["estimator_recovery_map"] = float(mean_average_precision(probs, train_labels))
            rows.append(row)
            per_class.append([head.name, *[round(100 * float(v), 4) for v in test_ap[i]]])
    return rows, per_class, estimates


def _group_logits(model: StackedHeads, group, X: torch.Tensor) -> torch.Tensor:
    from spl.fit.engine import _augment, _logits

    X = _augment(X.to(model.device_, model.dtype))
    return _logits(X, group.best_weight).float().cpu()


def write_results(run_dir, prepared, tag, model, rows, per_class, estimates, data) -> None:
    write_csv(run_dir / "results.csv", rows, RESULT_COLUMNS)
    write_csv(
        run_dir / "per_class_ap.csv",
        [dict(zip(["head", *prepared.classes], r, strict=True)) for r in per_class],
        ["head", *prepared.classes],
    )
    save_torch(
        run_dir / "heads.pt",
        {
            "heads": [dataclasses.asdict(h) for h in model.heads_],
            "weight": model.coef_.float(),
            "bias": model.intercept_.float(),
            "best_epoch": torch.from_numpy(model.best_epoch_),
            "classes": list(prepared.classes),
            "feature_tag": tag,
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            # ROLE's label estimates (probabilities) at each head's best epoch, for the
            # training-split rows in `train_rows` order: LinearInit carries them over.
            "estimates": estimates,
            "train_rows": torch.from_numpy(data.rows["train"]),
        },
    )
    write_text_atomic(run_dir / "summary.md", summary_markdown(prepared.name, tag, rows))


def summary_markdown(dataset: str, tag: str, rows: list[dict]) -> str:
    """Per loss, the selected configuration and its test mAP, beside the paper's value."""
    selected = select_best(rows)
    show_paper = tag == paper.PAPER_BACKBONE_TAG and dataset in paper.PAPER_DATASETS
    lines = [
        f"# Linear heads on {dataset} ({tag})",
        "",
        "Per loss, the (lr, batch size) with the highest best-epoch val mAP; its test mAP at "
        "that epoch (mean ± std over seeds). Recovery: training-set mAP against the hidden "
        "full labels.",
        "",
        "| loss | labels seen | lr | batch | epoch | val mAP | test mAP | recovery | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in [k for k in LOSSES if k in selected]:
        pick = selected[key]
        first = pick["picked"][0]
        reference = paper.paper_value("linear", key, dataset) if show_paper else None
        lines.append(
            f"| {LOSSES[key].title} | {LOSSES[key].labels_seen} | {float(first['lr']):g} | "
            f"{first['batch_size']} | {first['best_epoch']} | "
            f"{format_mean_std(pick.get('val_map'))} | {format_mean_std(pick.get('test_map'))} | "
            f"{format_mean_std(pick.get('train_recovery_map'))} | "
            f"{'-' if reference is None else reference} |"
        )
    role = selected.get("role")
    if role and "estimator_recovery_map" in role:
        lines += [
            "",
            f"ROLE's label estimator recovers the hidden training labels at "
            f"{format_mean_std(role['estimator_recovery_map'])} mAP.",
        ]
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
    """The per-loss table printed at the end of a run."""
    selected = select_best(rows)
    out = [
        f"{'loss':<11} {'lr':>7} {'bs':>3} {'ep':>3} {'val mAP':>14} {'test mAP':>14} {'recov':>7}"
    ]
    for key in [k for k in LOSSES if k in selected]:
        pick = selected[key]
        first = pick["picked"][0]
        recovery = pick.get("train_recovery_map")
        out.append(
            f"{LOSSES[key].title:<11} {float(first['lr']):>7g} {int(first['batch_size']):>3} "
            f"{int(first['best_epoch']):>3} {format_mean_std(pick.get('val_map')):>14} "
            f"{format_mean_std(pick.get('test_map')):>14} "
            f"{'' if recovery is None else f'{recovery[0]:.1f}':>7}"
        )
    return "\n".join(out)
