"""Model selection (docs/protocol.md section 5): per loss, the (lr, batch size) whose best-epoch val
mAP is highest; its test mAP at that epoch is the result; over seeds, mean and std."""

from __future__ import annotations

import math
from collections.abc import Iterable

# Result columns summarised over seeds (mean, sample std) for the selected rows.
SUMMARY_COLUMNS = (
    "test_map", "test_map_paper_metric", "val_map", "train_recovery_map",
    "estimator_recovery_map",
)  # fmt: skip


def select_best(rows: Iterable[dict], key: str = "loss") -> dict[str, dict]:
    """Group result rows by ``key`` (and seed), pick the best-val row per seed, summarise.

    Each row needs ``key``, ``seed``, ``val_map``, ``test_map``; other numeric columns
    (``train_recovery_map`` ...) are averaged over the chosen rows too. Ties go to the row
    that comes first, as a strict maximum over the grid would.
    """
    chosen: dict[str, dict[int, dict]] = {}
    for row in rows:
        per_seed = chosen.setdefault(row[key], {})
        seed = int(row["seed"])
        if seed not in per_seed or float(row["val_map"]) > float(per_seed[seed]["val_map"]):
            per_seed[seed] = row
    out = {}
    for name, per_seed in chosen.items():
        picked = [per_seed[s] for s in sorted(per_seed)]
        summary = {"picked": picked, "seeds": sorted(per_seed)}
        for column in SUMMARY_COLUMNS:
            values = [float(r[column]) for r in picked if _present(r.get(column))]
            if values:
                summary[column] = mean_std(values)
        out[name] = summary
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value: no spread measured)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def format_mean_std(value: tuple[float, float] | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    mean, std = value
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _present(value) -> bool:
    if value is None or value == "":
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def best_row(rows: Iterable[dict]) -> dict:
    """The row with the highest val mAP; ties go to the first (a strict maximum)."""
    best = None
    for row in rows:
        if best is None or float(row["val_map"]) > float(best["val_map"]):
            best = row
    if best is None:
        raise ValueError("no rows to select from")
    return best
