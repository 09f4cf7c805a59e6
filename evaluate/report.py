"""Everything a person reads: run summaries, the printed tables, the reproduced tables
(Markdown, CSV, JSON) and the figure of probabilities on unobserved positives.

One rule for the paper's column everywhere: the paper's value is shown wherever the
dataset is one of the paper's, and the column is marked (``†``, with a note saying what
differs) when the backbone or the protocol differs from the one the paper measured with.
Losses are passed in as objects with ``title`` and ``labels_seen`` (the registry's), so
that this module needs nothing from ``fit``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spl.evaluate import paper
from spl.evaluate.selection import format_mean_std, select_best

MARK = "†"


def paper_note(differences: Sequence[str]) -> tuple[str, str]:
    """(mark for the paper column's header, note under the table); both empty when the
    run's backbone and protocol are the paper's."""
    if not differences:
        return "", ""
    return MARK, (
        f"{MARK} The paper's values were measured with its own backbone and protocol; this "
        f"one differs: {'; '.join(differences)}."
    )


def _title(losses: Mapping[str, Any], key: str) -> str:
    base, _, init = key.partition("+")
    return losses[base].title + (" + LinearInit" if init else "")


# --------------------------------------------------------------------------- run summaries


def protocol_text(observed: str, val: str) -> str:
    """One line naming the protocol that made a result: which observed labels trained it and
    which val labels selected its epoch and configuration (test mAP always uses full labels)."""
    return f"Protocol: trained on observed set `{observed}`; {selection_text(val)}"


def selection_text(val: str) -> str:
    """Which val labels selected the epoch and configuration, as a clause."""
    if val == "full":
        return "selected on the val split's full labels (the paper's)."
    return "selected on the val split's observed single positives (no full labels used)."


def linear_summary(
    dataset: str,
    tag: str,
    rows: list[dict],
    losses: Mapping[str, Any],
    differences=(),
    protocol: str = "",
) -> str:
    """summary.md of a linear run: per loss the selected configuration and its test mAP
    (logit ranking, and the paper's float32-probability ranking), recovery, the paper's."""
    selected = select_best(rows)
    show_paper = dataset in paper.PAPER_DATASETS
    mark, note = paper_note(differences) if show_paper else ("", "")
    lines = [
        f"# Linear heads on {dataset} ({tag})",
        "",
        *([protocol, ""] if protocol else []),
        "Per loss, the (lr, batch size) with the highest best-epoch val mAP; its test mAP at "
        "that epoch (mean ± std over seeds), also as the paper's code ranks it (float32 "
        "probabilities). Recovery: training-set mAP against the hidden full labels.",
        "",
        "| loss | labels seen | lr | batch | epoch | val mAP | test mAP | test mAP (paper's "
        f"ranking) | recovery | paper{mark} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in [k for k in losses if k in selected]:
        pick = selected[key]
        first = pick["picked"][0]
        reference = paper.paper_value("linear", key, dataset) if show_paper else None
        lines.append(
            f"| {losses[key].title} | {losses[key].labels_seen} | {float(first['lr']):g} | "
            f"{first['batch_size']} | {first['best_epoch']} | "
            f"{format_mean_std(pick.get('val_map'))} | {format_mean_std(pick.get('test_map'))} | "
            f"{format_mean_std(pick.get('test_map_paper_metric'))} | "
            f"{format_mean_std(pick.get('train_recovery_map'))} | "
            f"{'-' if reference is None else reference} |"
        )
    estimators = [k for k in losses if "estimator_recovery_map" in selected.get(k, {})]
    for key in estimators:
        lines += [
            "",
            f"{losses[key].title}'s label estimator recovers the hidden training labels at "
            f"{format_mean_std(selected[key]['estimator_recovery_map'])} mAP.",
        ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def linear_table(rows: list[dict], losses: Mapping[str, Any]) -> str:
    """The per-loss table printed at the end of a linear run."""
    selected = select_best(rows)
    out = [
        f"{'loss':<11} {'lr':>7} {'bs':>3} {'ep':>3} {'val mAP':>14} {'test mAP':>14} {'recov':>7}"
    ]
    for key in [k for k in losses if k in selected]:
        pick = selected[key]
        first = pick["picked"][0]
        recovery = pick.get("train_recovery_map")
        out.append(
            f"{losses[key].title:<11} {float(first['lr']):>7g} {int(first['batch_size']):>3} "
            f"{int(first['best_epoch']):>3} {format_mean_std(pick.get('val_map')):>14} "
            f"{format_mean_std(pick.get('test_map')):>14} "
            f"{'' if recovery is None else f'{recovery[0]:.1f}':>7}"
        )
    return "\n".join(out)


def finetune_summary(
    dataset: str,
    tag: str,
    key: str,
    rows: list[dict],
    losses: Mapping[str, Any],
    differences=(),
    protocol: str = "",
) -> str:
    """summary.md of a fine-tune run (``key``: a loss, or ``<loss>+linearinit``)."""
    loss = key.partition("+")[0]
    selected = select_best(rows).get(loss)
    reference = None
    if dataset in paper.PAPER_DATASETS:
        reference = paper.paper_value("finetune", key, dataset)
    mark, note = paper_note(differences) if reference is not None else ("", "")
    lines = [
        f"# Fine-tuned {_title(losses, key)} on {dataset} ({tag})",
        "",
        *([protocol, ""] if protocol else []),
        "| config | best epoch | val mAP | test mAP | test mAP (paper's ranking) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        paper_metric = row.get("test_map_paper_metric")
        lines.append(
            f"| {row['config']} | {row['best_epoch']} | {float(row['val_map']):.2f} | "
            f"{float(row['test_map']):.2f} | "
            f"{'-' if paper_metric in (None, '') else f'{float(paper_metric):.2f}'} |"
        )
    if selected:
        lines += [
            "",
            f"Selected (best val per seed): test mAP {format_mean_std(selected.get('test_map'))}"
            + ("" if reference is None else f"; paper{mark}: {reference}"),
        ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def finetune_table(rows: list[dict], losses: Mapping[str, Any]) -> str:
    """The configurations' table printed at the end of a fine-tune run."""
    out = [f"{'config':<22} {'epoch':>5} {'val mAP':>8} {'test mAP':>9}"]
    for row in rows:
        out.append(
            f"{row['config']:<22} {int(row['best_epoch']):>5} {float(row['val_map']):>8.2f} "
            f"{float(row['test_map']):>9.2f}"
        )
    for loss, pick in select_best(rows).items():
        out.append(f"selected {losses[loss].title}: test mAP {format_mean_std(pick['test_map'])}")
    return "\n".join(out)


# --------------------------------------------------------------------------- reproduced tables

TITLES = {
    "linear": "Linear heads on frozen features: test mAP",
    "finetune": "Fine-tuned end to end: test mAP",
    "recovery": "Training-set mAP against the hidden full labels (label recovery)",
    "label-bias": "Linear heads trained on biased single positives: test mAP",
    "since-2021": "Methods since the paper: test mAP",
}


def build_table(
    table: str,
    datasets: Sequence[str],
    cells: Sequence[tuple[str, str, str, dict | None]],
    losses: Mapping[str, Any],
    *,
    tag: str,
    seeds: Sequence[int],
    differences: Sequence[str] = (),
    protocol: dict | None = None,
) -> dict:
    """Rows of (ours mean ± std, the paper's, the difference) per dataset, for one table.

    ``cells`` are ``(loss, dataset, status, record)``; a done cell's record holds
    ``[mean, std]`` per result column. ``protocol`` (observed set, val labels) is recorded
    in the table and said under its title."""
    column = "train_recovery_map" if table == "recovery" else "test_map"
    rows = []
    for loss in dict.fromkeys(c[0] for c in cells):
        row: dict[str, Any] = {"loss": loss, "title": _title(losses, loss), "cells": {}}
        for dataset in datasets:
            found = next((c for c in cells if c[0] == loss and c[1] == dataset), None)
            reference = None
            if dataset in paper.PAPER_DATASETS:
                reference = paper.paper_value(table, loss, dataset)
            row["cells"][dataset] = cell_entry(found, column, reference, table != "recovery")
        rows.append(row)
    shown = any(d in paper.PAPER_DATASETS for d in datasets)
    mark, note = paper_note(differences) if shown else ("", "")
    return {"table": table, "title": TITLES[table], "feature_tag": tag, "seeds": list(seeds),
            "datasets": list(datasets), "rows": rows, "paper_mark": mark, "paper_note": note,
            **(protocol or {})}  # fmt: skip


def cell_entry(found, column: str, reference: float | None, with_metric: bool = True) -> dict:
    """One table entry from a cell ``(loss, dataset, status, record)`` (or None): ours as
    mean ± std over seeds, the reference number, their difference."""
    entry: dict[str, Any] = {"paper": reference, "status": found[2] if found else "missing"}
    record = found[3] if found else None
    if record is not None and found[2] == "done" and column in record:
        mean, std = record[column]
        entry.update({"mean": mean, "std": _none_if_nan(std), "seeds": len(record["picked"])})
        if reference is not None:
            entry["difference"] = mean - reference
        if with_metric and "test_map_paper_metric" in record:
            pm_mean, pm_std = record["test_map_paper_metric"]
            entry.update({"paper_metric_mean": pm_mean, "paper_metric_std": _none_if_nan(pm_std)})
            if reference is not None:
                entry["paper_metric_difference"] = pm_mean - reference
    return entry


def protocol_fields(observed: str, val: str) -> dict:
    """What a table records of the protocol that made it."""
    return {"observed": observed, "val": val, "protocol": protocol_text(observed, val)}


def build_since_table(
    datasets: Sequence[str],
    cells: Sequence[tuple[str, str, str, str, dict | None]],
    losses: Mapping[str, Any],
    *,
    tag: str,
    seeds: Sequence[int],
    differences: Sequence[str] = (),
    protocol: dict | None = None,
) -> dict:
    """The since-2021 table: per method and dataset, our linear probe on the cached features
    (nobody publishes one) and our fine-tuned result under the method's own recipe beside
    its published number; AN and ROLE (the paper's recipe, the paper's numbers) for
    reference. ``cells`` are ``(row, kind, dataset, status, record)`` with kind ``linear`` or
    ``finetune``."""
    rows = []
    for key in dict.fromkeys(c[0] for c in cells):
        in_paper = key in paper.FINETUNE
        row: dict[str, Any] = {
            "loss": key,
            "title": _title(losses, key),
            "source": paper.SINCE_2021_SOURCES.get(key, "Cole et al., CVPR 2021 (the paper)"),
            "recipe": "paper" if in_paper else "source",
            "cells": {},
        }
        for dataset in datasets:
            for kind in ("linear", "finetune"):
                found = next(
                    ((r, d, s, rec) for r, k, d, s, rec in cells
                     if r == key and k == kind and d == dataset), None,
                )  # fmt: skip
                reference = None
                if dataset in paper.PAPER_DATASETS:
                    if in_paper:
                        reference = paper.paper_value(kind, key, dataset)
                    elif kind == "finetune":
                        reference = paper.paper_value("since-2021", key, dataset)
                row["cells"][f"{dataset}/{kind}"] = cell_entry(found, "test_map", reference)
        rows.append(row)
    shown = any(d in paper.PAPER_DATASETS for d in datasets)
    mark, note = paper_note(differences) if shown else ("", "")
    return {"table": "since-2021", "title": TITLES["since-2021"], "feature_tag": tag,
            "seeds": list(seeds), "datasets": list(datasets), "rows": rows, "paper_mark": mark,
            "paper_note": note, **(protocol or {})}  # fmt: skip


def render_since_markdown(data: dict) -> str:
    mark = data.get("paper_mark", "")
    header = ["method"]
    for dataset in data["datasets"]:
        header += [f"{dataset} linear", f"{dataset} fine-tuned{mark}"]
    header.append("published number from")
    lines = [f"## {data['title']}", ""]
    if data.get("protocol"):
        lines += [data["protocol"], ""]
    lines += [
        f"Backbone features: `{data['feature_tag']}`; seeds {data['seeds']}. Linear: ours (a "
        "head on the cached features, the paper's grid and selection; nobody publishes "
        "these), beside the paper's for AN and ROLE. Fine-tuned: ours with the method's own "
        "recipe (`spl finetune --recipe source`; AN and ROLE with the paper's) / the "
        "published number (difference). Rows marked * use an external model's scores "
        "(`spl pseudo-labels`).",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for row in data["rows"]:
        cells = [
            _cell_text(row["cells"][f"{d}/{k}"], "mean", "std", "difference")
            for d in data["datasets"]
            for k in ("linear", "finetune")
        ]
        star = "*" if "external model" in row["source"] else ""
        lines.append(f"| {row['title']}{star} | " + " | ".join(cells) + f" | {row['source']} |")
    if data.get("paper_note"):
        lines += ["", data["paper_note"]]
    return "\n".join(lines) + "\n"


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def render_markdown(data: dict) -> str:
    mark = data.get("paper_mark", "")
    with_metric = data["table"] != "recovery"
    header = ["loss"]
    for dataset in data["datasets"]:
        header.append(dataset + mark)
        if with_metric:
            header.append(f"{dataset}, paper's ranking")
    lines = [f"## {data['title']}", "", *([data["protocol"], ""] if data.get("protocol") else []),
             f"Backbone features: `{data['feature_tag']}`; seeds {data['seeds']}. "
             "Each cell: ours (mean ± std over seeds) / paper (difference)."
             + (" The paper's-ranking columns rank float32 probabilities as the paper's code "
                "does (ties at 1.0), ours rank logits." if with_metric else ""), "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
    for row in data["rows"]:
        cells = []
        for dataset in data["datasets"]:
            entry = row["cells"][dataset]
            cells.append(_cell_text(entry, "mean", "std", "difference"))
            if with_metric:
                cells.append(
                    _cell_text(
                        entry, "paper_metric_mean", "paper_metric_std", "paper_metric_difference"
                    )
                )
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    if data.get("paper_note"):
        lines += ["", data["paper_note"]]
    return "\n".join(lines) + "\n"


def _cell_text(entry: dict, mean_key: str, std_key: str, difference_key: str) -> str:
    if mean_key not in entry:
        text = entry["status"]
    else:
        std = entry.get(std_key)
        text = format_mean_std((entry[mean_key], math.nan if std is None else std))
    if entry.get("paper") is not None:
        diff = entry.get(difference_key)
        text += f" / {entry['paper']:.1f}" + (f" ({diff:+.1f})" if diff is not None else "")
    return text


def render_csv(data: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "loss", "dataset", "kind", "mean", "std", "seeds", "paper",
                     "difference", "mean_paper_metric", "std_paper_metric", "status", "observed",
                     "val"])  # fmt: skip
    for row in data["rows"]:
        for column, entry in row["cells"].items():
            # since-2021 cells are keyed dataset/kind; the others by dataset (or bias kind)
            dataset, _, kind = column.partition("/")
            writer.writerow([data["table"], row["loss"], dataset, kind or data["table"],
                             entry.get("mean", ""), _blank(entry.get("std")),
                             entry.get("seeds", ""), _blank(entry.get("paper")),
                             entry.get("difference", ""), _blank(entry.get("paper_metric_mean")),
                             _blank(entry.get("paper_metric_std")), entry["status"],
                             data.get("observed", ""), data.get("val", "")])  # fmt: skip
    return buffer.getvalue()


def _blank(value):
    return "" if value is None else value


def render_json(data: dict) -> str:
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


# --------------------------------------------------------------------------- the figure


def histogram_series(
    history: list[dict], head: str, key: str = "hidden_positive_histogram"
) -> list[list[float]]:
    """Per-epoch normalised histograms of one head, from a linear run's history rows."""
    series = [
        r[key] for r in sorted(history, key=lambda r: r["epoch"]) if r["head"] == head and key in r
    ]
    out = []
    for counts in series:
        total = sum(counts)
        out.append([c / total if total else 0.0 for c in counts])
    return out


def mean_of_histogram(shares: Sequence[float]) -> float:
    """The mean probability a normalised histogram of [0, 1] stands for (bin centres)."""
    bins = len(shares)
    return sum(share * (i + 0.5) / bins for i, share in enumerate(shares))


def save_figure(path: Path, dataset: str, panels: list[tuple[str, list[list[float]]]]) -> bool:
    """The paper's figure: per epoch (columns), the distribution of predicted probabilities
    on the unobserved positives (y=1, z=0), one panel per head; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    from spl.data.common import atomic_path

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        grid = np.array(series).T  # bins x epochs
        ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                  extent=(0.5, grid.shape[1] + 0.5, 0, 1))  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("predicted probability")
    fig.suptitle(f"{dataset}: probabilities on unobserved positives (y=1, z=0)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True
