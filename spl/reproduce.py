"""``spl reproduce``: the paper's tables in batch, cell by cell, side by side with the paper.

A *cell* is one (kind, dataset, row) under one protocol (the observed set that trains it,
the val labels that select it); kind is ``linear``, ``recovery`` or ``finetune``. Its result
record (``tables/cells/...json``) holds the options it was computed with; a rerun skips
cells whose record matches the options, recomputes cells whose options differ (never
mixing them into a table) and computes the missing ones. A *table* is a view over cells:
the paper's three, ``since-2021`` (linear and fine-tuned cells of the methods since the
paper) and ``label-bias`` (linear cells under each biased draw). The work is a list of
*jobs* (``spl data observe`` / ``spl extract`` / ``spl fit-linear`` / ``spl finetune``
commands, each given as its settings) in three stages; jobs of a stage run in parallel,
one per GPU (``--jobs N``), each in its own process.

The parts: :mod:`spl.reproduce_plan` (the plan and its cells), :mod:`spl.reproduce_jobs`
(the jobs and running them), :mod:`spl.reproduce_tables` (tables, figure, findings).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from spl.data.common import SplError
from spl.fit.losses import LOSSES
from spl.reproduce_jobs import Job, jobs_cells, plan_jobs, run_jobs
from spl.reproduce_plan import LINEARINIT, Cell, Plan, fingerprint_of, plan_cells
from spl.reproduce_tables import paper_agreement, write_figure, write_tables
from spl.settings import DATASETS, TABLES

__all__ = ["DATASETS", "LINEARINIT", "TABLES", "Plan", "paper_agreement", "reproduce"]


def reproduce(plan: Plan, *, dry_run: bool = False, log: Callable[[str], None] = print) -> dict:
    """Plan, run what is missing (unless ``dry_run``), and write tables and the figure."""
    cells = plan_cells(plan)
    jobs = plan_jobs(plan, cells)
    if dry_run:
        return {"cells": cells, "jobs": jobs, "text": describe(plan, cells, jobs)}
    missing = [d for d in plan.datasets if fingerprint_of(plan, d) is None]
    if missing:
        raise SplError(
            "not prepared: " + ", ".join(missing) + ". Prepare with `spl data prepare NAME "
            f"--source RAW_DIR --root {plan.root}` (see `spl reproduce --dry-run`)"
        )
    if plan.scores and any(LOSSES[c.loss.partition("+")[0]].reads_scores for c in jobs_cells(jobs)):
        from spl.extract.scores import scores_path

        for dataset in plan.datasets:
            path = scores_path(plan.root / dataset, plan.scores)
            if not path.exists():
                raise SplError(
                    f"{path} not found: make it with `spl pseudo-labels {plan.root / dataset} "
                    f"--tag {plan.scores}` (docs/scores.md), or pass another --scores"
                )
    if jobs:
        run_jobs(plan, jobs, log=log)
        cells = plan_cells(plan)
    written = write_tables(plan, cells)
    figure = write_figure(plan, cells)
    return {"cells": cells, "jobs": jobs, "written": written, "figure": figure}


def describe(plan: Plan, cells: list[Cell], jobs: list[Job]) -> str:
    """The --dry-run listing: each cell and its state, then the commands in order."""
    lines = [f"{'table':<9} {'dataset':<8} {'loss':<18} state"]
    for cell in cells:
        state = cell.status + (f" ({cell.why})" if cell.why else "")
        where = f" [{cell.protocol_dir}]" if cell.protocol_dir else ""
        lines.append(f"{cell.table:<9} {cell.dataset:<8} {cell.loss:<18} {state}{where}")
    if plan.scores and any(LOSSES[c.loss.partition("+")[0]].reads_scores for c in cells):
        from spl.extract.scores import scores_path

        absent = [d for d in plan.datasets if not scores_path(plan.root / d, plan.scores).exists()]
        if absent:
            lines += ["", f"Scores file {plan.scores}.h5 missing (make it first; docs/scores.md):"]
            lines += [f"  spl pseudo-labels {plan.root / d} --tag {plan.scores}" for d in absent]
    missing = [d for d in plan.datasets if fingerprint_of(plan, d) is None]
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
