"""``spl reproduce``, its tables: each a view over cells, written as Markdown, CSV and JSON
beside the paper's numbers, the figure, and the paper's findings checked on our numbers.
The paper's three tables, ``since-2021`` (linear and fine-tuned cells of the methods since
the paper) and ``label-bias`` (linear cells under each biased draw)."""

from __future__ import annotations

from pathlib import Path

from spl.data.common import write_text_atomic
from spl.evaluate import paper, report
from spl.fit.losses import LOSSES
from spl.reproduce_plan import (
    BIAS_DATASET,
    Cell,
    Plan,
    bias_set,
    label_bias_rows,
    protocol_suffix,
    since_row_key,
)
from spl.runs import read_jsonl


def differences(plan: Plan, table: str) -> list[str]:
    """How this reproduction's protocol departs from the paper's, for a table."""
    observed = plan.observed_name
    if table == "since-2021":
        # the published numbers come with each method's own recipe: only the features and
        # the protocol can differ
        return paper.protocol_differences(
            "finetune", tag=plan.tag, observed=observed, val=plan.val
        )  # fmt: skip
    if table == "finetune":
        return paper.protocol_differences(
            table, tag=plan.tag, lrs=plan.finetune_lrs, batch_sizes=plan.finetune_batch_sizes,
            epochs=plan.finetune_epochs, observed=observed, val=plan.val,
        )  # fmt: skip
    return paper.protocol_differences(
        table, tag=plan.tag, lrs=plan.linear_lrs, batch_sizes=plan.linear_batch_sizes,
        epochs=plan.linear_epochs, observed=observed, val=plan.val,
    )  # fmt: skip


def _mine(plan: Plan, cells: list[Cell]) -> list[Cell]:
    """The cells of this reproduction's protocol."""
    return [c for c in cells if c.observed == plan.observed_name and c.val == plan.val]


def build_table(plan: Plan, table: str, cells: list[Cell]) -> dict:
    fields = report.protocol_fields(plan.observed_name, plan.val)
    if table == "since-2021":
        rows = set(plan.since_losses)
        since = [
            (c.loss.partition("+")[0], "linear" if c.table == "linear" else "finetune",
             c.dataset, c.status, c.record)
            for c in _mine(plan, cells)
            if c.table in ("linear", "finetune") and c.loss.partition("+")[0] in rows
            and (c.table == "linear" or c.loss == since_row_key(c.loss.partition("+")[0]))
        ]  # fmt: skip
        since.sort(key=lambda c: plan.since_losses.index(c[0]))
        return report.build_since_table(
            plan.datasets, since, LOSSES, tag=plan.tag, seeds=plan.seeds,
            differences=differences(plan, table), protocol=fields,
        )  # fmt: skip
    if table == "label-bias":
        kinds = plan.bias_kinds()
        drawn = {bias_set(k, plan.observed_seed): k for k in kinds}
        rows = label_bias_rows(plan)
        mine = [
            (c.loss, drawn[c.observed], c.status, c.record)
            for c in cells
            if c.table == "linear" and c.dataset == BIAS_DATASET and c.observed in drawn
            and c.val == plan.val and c.loss in rows
        ]  # fmt: skip
        mine.sort(key=lambda c: rows.index(c[0]))
        data = report.build_table(
            "label-bias", kinds, mine, LOSSES, tag=plan.tag, seeds=plan.seeds,
            protocol=report.protocol_fields("biased draws (see columns)", plan.val),
        )  # fmt: skip
        data["dataset"] = BIAS_DATASET
        data["observed_sets"] = drawn
        data["protocol"] = (
            f"{BIAS_DATASET}: one single positive per training image drawn uniformly or "
            "in proportion to the class's total segment area (size), to the sum of 1 / "
            "distance of its boxes' centres to the image centre (location), or to the class's "
            "crowdsourced-click weight (semantic); docs/biased-labels.md. Observed sets: "
            + ", ".join(f"{k} `{name}`" for name, k in drawn.items())
            + ". "
            + report.selection_text(plan.val)
        )
        return data
    mine = [(c.loss, c.dataset, c.status, c.record) for c in _mine(plan, cells) if c.table == table]
    return report.build_table(
        table, plan.datasets, mine, LOSSES, tag=plan.tag, seeds=plan.seeds,
        differences=differences(plan, table), protocol=fields,
    )  # fmt: skip


def table_stem(plan: Plan, table: str) -> str:
    """A table's file name: the paper's protocol keeps the plain names; another protocol
    adds its observed set and val labels (``linear.size-p1-s1200.val-observed``)."""
    if table == "label-bias":
        return table if plan.val == "full" else f"{table}.val-{plan.val}"
    suffix = protocol_suffix(plan.observed_name, plan.val)
    return f"{table}.{suffix}" if suffix else table


def write_tables(plan: Plan, cells: list[Cell]) -> list[Path]:
    written = []
    for table in plan.tables:
        data = build_table(plan, table, cells)
        markdown = (
            report.render_since_markdown(data)
            if table == "since-2021"
            else report.render_markdown(data)
        )
        for suffix, text in (
            ("md", markdown),
            ("csv", report.render_csv(data)),
            ("json", report.render_json(data)),
        ):
            path = plan.out / f"{table_stem(plan, table)}.{suffix}"
            write_text_atomic(path, text)
            written.append(path)
    return written


def _history(run_dir: str) -> list[dict]:
    return read_jsonl(Path(run_dir) / "history.jsonl")


def write_figure(plan: Plan, cells: list[Cell]) -> Path | None:
    """The paper's figure: per epoch, the distribution of predicted probabilities on the
    unobserved positives (y=1, z=0) under AN and ROLE, from the linear runs."""
    dataset = plan.figure_dataset or next(
        (d for d in ("coco14", *plan.datasets) if d in plan.datasets), None
    )
    panels = []
    for loss in ("an", "role"):
        cell = next((c for c in _mine(plan, cells) if c.table in ("linear", "recovery")
                     and c.dataset == dataset and c.loss == loss and c.status == "done"), None)  # fmt: skip
        if cell is None:
            continue
        head = cell.record["picked"][0]["head"]
        history = _history(cell.record["run"])
        panels.append((f"{LOSSES[loss].title} ({head})", report.histogram_series(history, head)))
        estimates = report.histogram_series(history, head, "estimator_histogram")
        if estimates:
            panels.append((f"{LOSSES[loss].title} label estimator", estimates))
    if not panels:
        return None
    suffix = protocol_suffix(plan.observed_name, plan.val)
    path = plan.out / f"figure_unobserved_positives{'.' + suffix if suffix else ''}.png"
    return path if report.save_figure(path, dataset, panels) else None


def _cell_value(cells: list[Cell], table: str, dataset: str, loss: str, column: str):
    for cell in cells:
        if cell.protocol_dir:
            continue  # the paper's findings are checked under the paper's protocol
        if (cell.table, cell.dataset, cell.loss, cell.status) == (table, dataset, loss, "done"):
            return cell.record[column][0] if column in cell.record else None
    return None


def hidden_positive_mean(cell: Cell) -> float | None:
    """Mean predicted probability on the unobserved positives (y=1, z=0) at the selected
    head's best epoch: how far a loss recovers the labels it never saw."""
    head = cell.record["picked"][0]
    series = report.histogram_series(_history(cell.record["run"]), head["head"])
    if not series:
        return None
    return report.mean_of_histogram(series[int(head["best_epoch"]) - 1])


def paper_agreement(cells: list[Cell]) -> list[str]:
    """The paper's qualitative findings, checked on our numbers (used by the demo)."""
    out = []
    for dataset in dict.fromkeys(c.dataset for c in cells):
        bce = _cell_value(cells, "linear", dataset, "bce", "test_map")
        an = _cell_value(cells, "linear", dataset, "an", "test_map")
        if bce is not None and an is not None:
            verdict = "agrees with" if bce > an else "DISAGREES with"
            out.append(
                f"{dataset}: full-label BCE {bce:.1f} vs single-positive AN {an:.1f} test mAP: "
                f"{verdict} the paper (BCE above AN)"
            )
        done = {
            c.loss: c
            for c in cells
            if c.dataset == dataset and c.table == "recovery" and c.status == "done"
            and not c.protocol_dir
        }  # fmt: skip
        if "role" in done and "an" in done:
            role, an_mean = hidden_positive_mean(done["role"]), hidden_positive_mean(done["an"])
            if role is not None and an_mean is not None:
                verdict = "agrees with" if role > an_mean else "DISAGREES with"
                out.append(
                    f"{dataset}: mean predicted probability on unobserved positives: ROLE "
                    f"{role:.2f} vs AN {an_mean:.2f}: {verdict} the paper (ROLE recovers more)"
                )
            role_map = done["role"].record["train_recovery_map"][0]
            an_map = done["an"].record["train_recovery_map"][0]
            relation = "above" if role_map > an_map else "below"
            out.append(
                f"{dataset}: training-set recovery mAP: ROLE {role_map:.1f} vs AN {an_map:.1f} "
                f"(ROLE {relation} AN; the paper has ROLE above AN on all four datasets)"
            )
    return out
