"""``spl reproduce``: the paper's tables in batch, cell by cell, side by side with the paper.

A *cell* is one (table, dataset, loss). Its result record (``tables/cells/...json``) holds
the options it was computed with; a rerun skips cells whose record matches the options,
recomputes cells whose options differ (never mixing them into a table) and computes the
missing ones. The work is a list of *jobs* (``spl extract`` / ``spl fit-linear`` /
``spl finetune`` commands) in three stages; jobs of a stage run in parallel, one per GPU
(``--jobs N``), each in its own process.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from spl.data import protocol
from spl.data.common import SplError, write_json_atomic, write_text_atomic
from spl.evaluate import paper, report
from spl.evaluate.selection import SUMMARY_COLUMNS, select_best
from spl.fit.losses import LOSSES, PAPER_LOSSES
from spl.runs import read_csv, read_jsonl
from spl.settings import DATASETS, TABLES, ReproduceSettings, setting

RECOVERY_LOSSES = ("an", "an_ls", "role")
LINEARINIT = tuple(protocol.LINEARINIT)
__all__ = ["DATASETS", "TABLES", "Plan", "reproduce"]


@dataclass
class Plan(ReproduceSettings):
    """What to reproduce and how (the command's settings, and what only code sets);
    defaults are the paper's protocol."""

    linear_losses: list[str] = setting(
        factory=lambda: list(PAPER_LOSSES), cli=False, help="Rows of the linear table."
    )
    extract_args: list[str] = setting(factory=list, cli=False, help="Extra `spl extract` flags.")
    finetune_args: list[str] = setting(factory=list, cli=False, help="Extra `spl finetune` flags.")

    def __post_init__(self) -> None:
        if self.finetune_losses is None:
            self.finetune_losses = [*PAPER_LOSSES, *(f"{k}+linearinit" for k in LINEARINIT)]
        if self.jobs is None:
            self.jobs = 1
        self.root, self.runs, self.out = Path(self.root), Path(self.runs), Path(self.out)

    @functools.cached_property
    def tag(self) -> str:
        """The feature tag of the backbone: resolved without building the model, so that
        planning works offline."""
        from spl.extract.backbones import backbone_tag, weights_id

        if self.weights is not None and Path(self.weights).is_file():
            resolved = weights_id(self.backbone, weights_path=self.weights)
        else:
            resolved = weights_id(self.backbone, self.weights)
        return backbone_tag(self.backbone, resolved, self.image_size)


@dataclass
class Cell:
    table: str
    dataset: str
    loss: str  # a loss key, or '<key>+linearinit'
    options: dict
    record: dict | None = None
    status: str = "missing"  # done | missing | stale
    why: str = ""

    @property
    def path_parts(self) -> tuple[str, str, str]:
        return (self.table, self.dataset, self.loss.replace("+", "_"))


@dataclass
class Job:
    name: str
    stage: int
    dataset: str
    cells: list[Cell]
    command: Callable[[dict], list[str]]  # built when it runs: may need earlier jobs' runs
    kind: str
    key: str = ""  # jobs that produce a run others read (LinearInit's linear phase)


# --------------------------------------------------------------------------- cells


def cell_path(plan: Plan, cell: Cell) -> Path:
    table, dataset, loss = cell.path_parts
    return plan.out / "cells" / table / dataset / f"{loss}.json"


def _fingerprint(plan: Plan, dataset: str) -> str | None:
    from spl.data.prepared import load_prepared

    labels = plan.root / dataset / "labels.h5"
    if not labels.exists():
        return None
    return load_prepared(labels.parent).fingerprint


def cell_options(plan: Plan, table: str, dataset: str, loss: str, fingerprint: str | None) -> dict:
    """The options a cell's value depends on: a stored record with others is stale."""
    base = {"dataset_fingerprint": fingerprint, "feature_tag": plan.tag, "seeds": plan.seeds}
    if table in ("linear", "recovery"):
        return {**base, "lrs": plan.linear_lrs, "batch_sizes": plan.linear_batch_sizes,
                "epochs": plan.linear_epochs}  # fmt: skip
    options = {**base, "lrs": plan.finetune_lrs, "batch_sizes": plan.finetune_batch_sizes,
               "epochs": plan.finetune_epochs, "extra": plan.finetune_args}  # fmt: skip
    if loss.endswith("+linearinit"):
        options["linear_phase"] = linearinit_settings(loss.split("+")[0], dataset, plan)
    return options


def linearinit_settings(loss: str, dataset: str, plan: Plan) -> dict:
    """LinearInit's fixed linear phase (paper.md section 5), with its dataset exceptions."""
    fixed = protocol.LINEARINIT[loss]
    return {
        "lr": fixed["lr"],
        "batch_size": fixed["batch_size_for"].get(dataset, fixed["batch_size"]),
        "epochs": plan.linear_epochs,
    }


def plan_cells(plan: Plan) -> list[Cell]:
    cells = []
    for dataset in plan.datasets:
        fingerprint = _fingerprint(plan, dataset)
        wanted: list[tuple[str, str]] = []
        if "linear" in plan.tables:
            wanted += [("linear", loss) for loss in plan.linear_losses]
        if "recovery" in plan.tables:
            wanted += [("recovery", loss) for loss in RECOVERY_LOSSES]
        if "finetune" in plan.tables:
            wanted += [("finetune", loss) for loss in plan.finetune_losses]
        for table, loss in wanted:
            options = cell_options(plan, table, dataset, loss, fingerprint)
            cell = Cell(table, dataset, loss, options)
            path = cell_path(plan, cell)
            if path.exists():
                record = json.loads(path.read_text())
                if record.get("options") == options:
                    cell.record, cell.status = record, "done"
                else:
                    cell.status = "stale"
                    cell.why = _differences(record.get("options", {}), options)
            cells.append(cell)
    return cells


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    )


# --------------------------------------------------------------------------- jobs


def plan_jobs(plan: Plan, cells: list[Cell]) -> list[Job]:
    """Jobs computing the cells that are not done, in stages: features, linear, fine-tune."""
    jobs: list[Job] = []
    todo = [c for c in cells if c.status != "done"]
    python = [sys.executable, "-m", "spl"]
    device = ["--device", plan.device]
    for dataset in plan.datasets:
        mine = [c for c in todo if c.dataset == dataset]
        if not mine:
            continue
        dataset_dir = str(plan.root / dataset)
        features = plan.root / dataset / "features" / f"{plan.tag}.h5"
        if not features.exists():
            extract = [*python, "extract", dataset_dir, "--backbone", plan.backbone,
                       "--image-size", str(plan.image_size), *device, *plan.extract_args]  # fmt: skip
            if plan.weights:
                extract += ["--weights", plan.weights]
            jobs.append(
                Job(f"extract {dataset}", 0, dataset, [], lambda _, c=extract: c, "extract")
            )
        # one fit-linear sweep computes every missing linear and recovery cell of a dataset
        linear_cells = [c for c in mine if c.table in ("linear", "recovery")]
        losses = list(dict.fromkeys(c.loss for c in linear_cells))
        if losses:
            command = [*python, "fit-linear", dataset_dir, "--features", plan.tag,
                       "--losses", ",".join(losses), "--lrs", _join(plan.linear_lrs),
                       "--batch-sizes", _join(plan.linear_batch_sizes),
                       "--epochs", str(plan.linear_epochs), "--seeds", _join(plan.seeds),
                       "--out", str(plan.runs), "--quiet", *device]  # fmt: skip
            jobs.append(Job(f"fit-linear {dataset} ({','.join(losses)})", 1, dataset,
                            linear_cells, lambda _, c=command: c, "linear"))  # fmt: skip
        for cell in [c for c in mine if c.table == "finetune"]:
            loss, _, init = cell.loss.partition("+")
            finetune = [*python, "finetune", dataset_dir, "--loss", loss,
                        "--backbone", plan.backbone, "--image-size", str(plan.image_size),
                        "--lrs", _join(plan.finetune_lrs),
                        "--batch-sizes", _join(plan.finetune_batch_sizes),
                        "--epochs", str(plan.finetune_epochs), "--seeds", _join(plan.seeds),
                        "--out", str(plan.runs), "--quiet", *device, *plan.finetune_args]  # fmt: skip
            if plan.weights:
                finetune += ["--weights", plan.weights]
            if init:
                fixed = cell.options["linear_phase"]
                key = f"linearinit {dataset} {loss}"
                phase = [*python, "fit-linear", dataset_dir, "--features", plan.tag,
                         "--losses", loss, "--lrs", f"{fixed['lr']:g}",
                         "--batch-sizes", str(fixed["batch_size"]),
                         "--epochs", str(fixed["epochs"]), "--seeds", _join(plan.seeds),
                         "--out", str(plan.runs), "--quiet", *device]  # fmt: skip
                jobs.append(Job(f"LinearInit linear phase {dataset} {loss}", 1, dataset, [],
                                lambda _, c=phase: c, "linear", key=key))  # fmt: skip
                jobs.append(Job(
                    f"finetune {dataset} {cell.loss}", 2, dataset, [cell],
                    lambda runs, c=finetune, k=key: [*c, "--init-from", runs[k]], "finetune",
                ))  # fmt: skip
            else:
                jobs.append(Job(f"finetune {dataset} {loss}", 2, dataset, [cell],
                                lambda _, c=finetune: c, "finetune"))  # fmt: skip
    return jobs


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def describe(plan: Plan, cells: list[Cell], jobs: list[Job]) -> str:
    """The --dry-run listing: each cell and its state, then the commands in order."""
    lines = [f"{'table':<9} {'dataset':<8} {'loss':<18} state"]
    for cell in cells:
        state = cell.status + (f" ({cell.why})" if cell.why else "")
        lines.append(f"{cell.table:<9} {cell.dataset:<8} {cell.loss:<18} {state}")
    missing = [d for d in plan.datasets if _fingerprint(plan, d) is None]
    if missing:
        lines += ["", "Datasets not prepared (prepare them first):"]
        for dataset in missing:
            source = "" if dataset == "demo" else " --source RAW_DIR"
            lines.append(f"  spl data prepare {dataset}{source} --root {plan.root}")
    if jobs:
        lines += ["", "Commands, in order (a stage's commands may run in parallel):"]
        for job in sorted(jobs, key=lambda j: j.stage):
            runs = {j.key: f"<run of: {j.name}>" for j in jobs if j.key}
            command = ["spl", *job.command(runs)[3:]]
            lines.append(f"  [{job.stage}] " + shlex.join(command))
    else:
        lines += ["", "Every cell is done."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def run_jobs(plan: Plan, jobs: list[Job], log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages in order; a stage's jobs in parallel on ``plan.jobs`` workers, each
    worker bound to one GPU when there are GPUs. Returns the run directory of keyed jobs."""
    gpus = _gpu_count()
    slots = list(range(max(1, plan.jobs)))
    free = list(slots)
    lock = threading.Lock()
    runs: dict[str, str] = {}
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    journal = plan.out / "logs" / "jobs.jsonl"

    def execute(job: Job) -> None:
        with lock:
            slot = free.pop(0)
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            command = _resume_if_interrupted(plan, job, job.command(runs))
            log_path = plan.out / "logs" / f"{_slug(job.name)}.log"
            start = time.time()
            log(f"start: {job.name}")
            with open(log_path, "w") as handle:
                handle.write(shlex.join(command) + "\n")
                handle.flush()
                done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            end = time.time()
            with lock:
                with open(journal, "a") as handle:
                    handle.write(json.dumps({"job": job.name, "slot": slot, "start": start,
                                             "end": end, "returncode": done.returncode}) + "\n")  # fmt: skip
            if done.returncode != 0:
                tail = log_path.read_text().splitlines()[-15:]
                raise SplError(f"job failed: {job.name} (log {log_path}):\n" + "\n".join(tail))
            run_dir = _run_from_log(log_path)
            if job.key:
                runs[job.key] = run_dir
            if job.cells:
                record_cells(plan, job, Path(run_dir))
            log(f"done: {job.name} ({end - start:.0f} s)")
        finally:
            with lock:
                free.append(slot)

    for stage in sorted({j.stage for j in jobs}):
        batch = [j for j in jobs if j.stage == stage]
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            errors = [f.exception() for f in [pool.submit(execute, j) for j in batch]]
        failures = [e for e in errors if e is not None]
        if failures:
            raise failures[0]
    return runs


def _resume_if_interrupted(plan: Plan, job: Job, command: list[str]) -> list[str]:
    """An interrupted reproduction left an INCOMPLETE run of this very command: resume it."""
    if job.kind not in ("linear", "finetune"):
        return command
    wanted = shlex.join(["spl", *command[3:]])
    for config_path in sorted((plan.runs / job.dataset).glob("*/*/config.json")):
        run = config_path.parent
        if (run / "INCOMPLETE").exists():
            config = json.loads(config_path.read_text())
            if config.get("command") == wanted:
                verb = "fit-linear" if job.kind == "linear" else "finetune"
                return [*command[:3], verb, "--resume", str(run), "--quiet"]
    return command


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _run_from_log(path: Path) -> str:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("run: "):
            return line[5:].strip()
    for line in path.read_text().splitlines():
        if line.startswith("wrote "):  # extract
            return line[6:].strip()
    return ""


def record_cells(plan: Plan, job: Job, run_dir: Path) -> None:
    """Write one result record per cell the job computed (selection over its grid)."""
    rows = read_csv(run_dir / "results.csv")
    for cell in job.cells:
        loss = cell.loss.partition("+")[0]
        picked = select_best([r for r in rows if r["loss"] == loss]).get(loss)
        if picked is None:
            raise SplError(f"{run_dir}: no results for {loss}")
        record = {
            "table": cell.table,
            "dataset": cell.dataset,
            "loss": cell.loss,
            "options": cell.options,
            "run": str(run_dir),
            "picked": picked["picked"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        for column in SUMMARY_COLUMNS:
            if column in picked:
                record[column] = list(picked[column])
        write_json_atomic(cell_path(plan, cell), record)
        cell.record, cell.status = record, "done"


# --------------------------------------------------------------------------- tables


def differences(plan: Plan, table: str) -> list[str]:
    """How this reproduction's protocol departs from the paper's, for a table."""
    if table == "finetune":
        return paper.protocol_differences(
            table, tag=plan.tag, lrs=plan.finetune_lrs, batch_sizes=plan.finetune_batch_sizes,
            epochs=plan.finetune_epochs,
        )  # fmt: skip
    return paper.protocol_differences(
        table, tag=plan.tag, lrs=plan.linear_lrs, batch_sizes=plan.linear_batch_sizes,
        epochs=plan.linear_epochs,
    )  # fmt: skip


def build_table(plan: Plan, table: str, cells: list[Cell]) -> dict:
    mine = [(c.loss, c.dataset, c.status, c.record) for c in cells if c.table == table]
    return report.build_table(
        table, plan.datasets, mine, LOSSES, tag=plan.tag, seeds=plan.seeds,
        differences=differences(plan, table),
    )  # fmt: skip


def write_tables(plan: Plan, cells: list[Cell]) -> list[Path]:
    written = []
    for table in plan.tables:
        data = build_table(plan, table, cells)
        for suffix, text in (
            ("md", report.render_markdown(data)),
            ("csv", report.render_csv(data)),
            ("json", report.render_json(data)),
        ):
            path = plan.out / f"{table}.{suffix}"
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
        cell = next((c for c in cells if c.table in ("linear", "recovery") and c.dataset == dataset
                     and c.loss == loss and c.status == "done"), None)  # fmt: skip
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
    path = plan.out / "figure_unobserved_positives.png"
    return path if report.save_figure(path, dataset, panels) else None


def reproduce(plan: Plan, *, dry_run: bool = False, log: Callable[[str], None] = print) -> dict:
    """Plan, run what is missing (unless ``dry_run``), and write tables and the figure."""
    cells = plan_cells(plan)
    jobs = plan_jobs(plan, cells)
    if dry_run:
        return {"cells": cells, "jobs": jobs, "text": describe(plan, cells, jobs)}
    missing = [d for d in plan.datasets if _fingerprint(plan, d) is None]
    if missing:
        raise SplError(
            "not prepared: " + ", ".join(missing) + ". Prepare with `spl data prepare NAME "
            f"--source RAW_DIR --root {plan.root}` (see `spl reproduce --dry-run`)"
        )
    if jobs:
        run_jobs(plan, jobs, log=log)
        cells = plan_cells(plan)
    written = write_tables(plan, cells)
    figure = write_figure(plan, cells)
    return {"cells": cells, "jobs": jobs, "written": written, "figure": figure}


def _cell_value(cells: list[Cell], table: str, dataset: str, loss: str, column: str):
    for cell in cells:
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
        }
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
