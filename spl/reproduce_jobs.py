"""``spl reproduce``, its jobs: the commands that compute the missing cells, and running them.

A job is one ``spl`` command (``data observe``, ``extract``, ``fit-linear``, ``finetune``)
given as its settings object: its command line is :func:`spl.settings_fields.to_args` of
them. Jobs run in three stages (observed sets and features, linear, fine-tune); the jobs
of a stage run in parallel, one per GPU (``--jobs N``), each in its own process. A training
job records its run's path in a file it is given (``--run-file``); an interrupted run is
resumed when the settings it recorded equal the job's.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

from spl.data import protocol
from spl.data.common import SplError, write_json_atomic
from spl.evaluate.selection import SUMMARY_COLUMNS, select_best
from spl.fit.losses import LOSSES
from spl.reproduce_plan import (
    BIASED,
    UNIFORM,
    Cell,
    Plan,
    cell_path,
    observed_sets_in,
)
from spl.runs import INCOMPLETE, read_csv
from spl.settings import (
    ExtractSettings,
    FinetuneSettings,
    FitLinearOptions,
    LinearSettings,
    ObserveSettings,
    RunOptions,
)
from spl.settings_fields import settings_from, to_args

VERBS = {"observe": ("data", "observe"), "extract": ("extract",), "linear": ("fit-linear",),
         "finetune": ("finetune",)}  # fmt: skip
# what a training job's command line shows even at the default: its grid and device
SHOWN = {
    "extract": ("backbone", "image_size", "device"),
    "linear": ("losses", "lrs", "batch_sizes", "epochs", "seeds", "device"),
    "finetune": ("loss", "backbone", "image_size", "seeds", "device"),
    "finetune-grid": ("lrs", "batch_sizes", "epochs"),  # not with --recipe source
}


@dataclass
class Job:
    """One command of the reproduction: ``spl VERB DATASET`` with ``settings``; a training
    job also has ``options`` (where its run goes, the file that says where it went)."""

    name: str
    stage: int
    dataset: str
    cells: list[Cell]
    kind: str  # observe | extract | linear | finetune
    target: Path  # the dataset folder
    settings: Any  # ObserveSettings | ExtractSettings | LinearSettings | FinetuneSettings
    shown: tuple[str, ...] = ()  # settings the command line shows even at their default
    options: RunOptions | None = None
    key: str = ""  # other jobs read its run (LinearInit's linear phase)
    init_key: str = ""  # it starts from the run of the job with this key (LinearInit)

    def settings_for(self, runs: dict[str, str]) -> Any:
        """The job's settings, with the run it starts from once that run exists."""
        if not self.init_key:
            return self.settings
        return dataclasses.replace(self.settings, init_from=runs[self.init_key])

    def command(self, runs: dict[str, str]) -> list[str]:
        """The command line: ``runs`` holds the runs of the keyed jobs it needs."""
        options = [] if self.options is None else to_args(self.options, always=("out",))
        settings = to_args(self.settings_for(runs), always=self.shown)
        return [*_spl(self.kind), str(self.target), *settings, *options]

    def resume_command(self, run: Path) -> list[str]:
        options = RunOptions(resume=run, quiet=True, run_file=self.options.run_file)
        return [*_spl(self.kind), *to_args(options)]

    @property
    def run_file(self) -> Path | None:
        return None if self.options is None else self.options.run_file


def _spl(kind: str) -> list[str]:
    return [sys.executable, "-m", "spl", *VERBS[kind]]


def jobs_cells(jobs: list[Job]) -> list[Cell]:
    return [cell for job in jobs for cell in job.cells]


# --------------------------------------------------------------------------- planning


def plan_jobs(plan: Plan, cells: list[Cell]) -> list[Job]:
    """Jobs computing the cells that are not done, in stages: observed sets and features,
    linear, fine-tune."""
    jobs: list[Job] = []
    todo = [c for c in cells if c.status != "done"]
    for dataset in plan.datasets:
        mine = [c for c in todo if c.dataset == dataset]
        if mine:
            jobs += _input_jobs(plan, dataset, mine)
            jobs += _linear_jobs(plan, dataset, [c for c in mine if c.table != "finetune"])
            for cell in [c for c in mine if c.table == "finetune"]:
                jobs += _finetune_jobs(plan, dataset, cell)
    return jobs


def _input_jobs(plan: Plan, dataset: str, cells: list[Cell]) -> list[Job]:
    """The observed sets the cells train on that labels.h5 lacks, and the feature file."""
    jobs = []
    present = observed_sets_in(plan, dataset)
    target = plan.root / dataset
    if present is not None:
        for name in dict.fromkeys(c.observed for c in cells):
            if name not in present:
                settings, shown = observe_settings(plan, name)
                jobs.append(Job(f"observe {dataset} {name}", 0, dataset, [], "observe", target,
                                settings, shown))  # fmt: skip
    if not (target / "features" / f"{plan.tag}.h5").exists():
        extract = ExtractSettings(
            backbone=plan.backbone, weights=plan.weights, image_size=plan.image_size,
            device=plan.device, **plan.extract_options,
        )  # fmt: skip
        jobs.append(Job(f"extract {dataset}", 0, dataset, [], "extract", target, extract,
                        SHOWN["extract"]))  # fmt: skip
    return jobs


def observe_settings(plan: Plan, name: str) -> tuple[ObserveSettings, tuple[str, ...]]:
    """The ``spl data observe`` settings that add the observed set ``name`` (a name
    :func:`spl.reproduce_plan.check_drawable` accepted), and what its command shows."""
    biased = BIASED.fullmatch(name)
    if biased:
        clicks = plan.clicks if biased[1] == "semantic" else None
        return ObserveSettings(bias=biased[1], seed=int(biased[2]), clicks=clicks), ("seed",)
    uniform = UNIFORM.fullmatch(name)
    count = {"all": "-1"}
    settings = ObserveSettings(
        num_pos=int(count.get(uniform[1], uniform[1])),
        num_neg=int(count.get(uniform[2], uniform[2])),
        seed=int(uniform[3]),
    )
    return settings, ("num_pos", "num_neg", "seed")


def _linear_jobs(plan: Plan, dataset: str, cells: list[Cell]) -> list[Job]:
    """One fit-linear sweep per observed set computes every missing linear and recovery
    cell of a dataset under it."""
    jobs = []
    for observed in dict.fromkeys(c.observed for c in cells):
        group = [c for c in cells if c.observed == observed]
        losses = list(dict.fromkeys(c.loss for c in group))
        settings = LinearSettings(
            losses=losses, lrs=plan.linear_lrs, batch_sizes=plan.linear_batch_sizes,
            epochs=plan.linear_epochs, seeds=plan.seeds, observed=observed, val=plan.val,
            scores=_scores(plan, losses), device=plan.device,
        )  # fmt: skip
        where = "" if observed == protocol.OBSERVED else f" [{observed}]"
        name = f"fit-linear {dataset}{where} ({','.join(losses)})"
        jobs.append(_training_job(plan, name, 1, dataset, group, "linear", settings))
    return jobs


def _finetune_jobs(plan: Plan, dataset: str, cell: Cell) -> list[Job]:
    """A fine-tuned cell's job; a LinearInit row's also its fixed linear phase first."""
    loss, _, variant = cell.loss.partition("+")
    grid = {}
    if variant == "source":  # the method's own recipe fixes its lr, batch size, epochs
        grid = {"recipe": "source"}
    else:
        grid = {"lrs": plan.finetune_lrs, "batch_sizes": plan.finetune_batch_sizes,
                "epochs": plan.finetune_epochs}  # fmt: skip
    settings = FinetuneSettings(
        loss=loss, backbone=plan.backbone, weights=plan.weights, image_size=plan.image_size,
        seeds=plan.seeds, observed=cell.observed, val=cell.val, scores=_scores(plan, [loss]),
        device=plan.device, **grid, **plan.finetune_options,
    )  # fmt: skip
    shown = SHOWN["finetune"] + (() if variant == "source" else SHOWN["finetune-grid"])
    name = f"finetune {dataset} {cell.loss}"
    if variant != "linearinit":
        return [_training_job(plan, name, 2, dataset, [cell], "finetune", settings, shown)]
    fixed = cell.options["linear_phase"]
    phase = LinearSettings(
        losses=[loss], lrs=[fixed["lr"]], batch_sizes=[fixed["batch_size"]],
        epochs=fixed["epochs"], seeds=plan.seeds, observed=cell.observed, val=cell.val,
        device=plan.device,
    )  # fmt: skip
    key = f"linearinit {dataset} {loss} {cell.observed}"
    return [
        _training_job(plan, f"LinearInit linear phase {dataset} {loss}", 1, dataset, [],
                      "linear", phase, key=key),
        _training_job(plan, name, 2, dataset, [cell], "finetune", settings, shown, init_key=key),
    ]  # fmt: skip


def _training_job(
    plan: Plan, name: str, stage: int, dataset: str, cells: list[Cell], kind: str, settings,
    shown: tuple[str, ...] | None = None, **keys: str,
) -> Job:  # fmt: skip
    """A fit-linear or finetune job: its run goes under ``plan.runs``, its path to a file
    beside the job's log."""
    run_file = plan.out / "logs" / f"{_slug(name)}.run"
    if kind == "linear":
        options = FitLinearOptions(features=plan.tag, out=plan.runs, quiet=True, run_file=run_file)
    else:
        options = RunOptions(out=plan.runs, quiet=True, run_file=run_file)
    return Job(name, stage, dataset, cells, kind, plan.root / dataset, settings,
               SHOWN["linear"] if shown is None else shown, options, **keys)  # fmt: skip


def _scores(plan: Plan, losses: list[str]) -> str | None:
    """--scores for the jobs whose losses read them."""
    readers = any(LOSSES[k.partition("+")[0]].reads_scores for k in losses)
    return plan.scores if readers and plan.scores else None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# --------------------------------------------------------------------------- running


def run_jobs(plan: Plan, jobs: list[Job], log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages in order; a stage's jobs in parallel on ``plan.jobs`` workers, each
    worker bound to one GPU when there are GPUs. Returns the run directory of keyed jobs."""
    gpus = _gpu_count()
    slots = list(range(max(1, plan.jobs)))
    free = list(slots)
    lock = threading.Lock()
    runs: dict[str, str] = {}
    # `spl data observe` rewrites labels.h5 (copy, add, rename): one at a time per dataset
    observing = {dataset: threading.Lock() for dataset in plan.datasets}
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    journal = plan.out / "logs" / "jobs.jsonl"

    def execute(job: Job) -> None:
        with lock:
            slot = free.pop(0)
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            lock_of = observing.get(job.dataset) if job.kind == "observe" else None
            with lock_of or contextlib.nullcontext():
                start, end, returncode, log_path = _execute(plan, job, runs, env, log)
            with lock:
                with open(journal, "a") as handle:
                    handle.write(json.dumps({"job": job.name, "slot": slot, "start": start,
                                             "end": end, "returncode": returncode}) + "\n")  # fmt: skip
            if returncode != 0:
                tail = log_path.read_text().splitlines()[-15:]
                raise SplError(f"job failed: {job.name} (log {log_path}):\n" + "\n".join(tail))
            run_dir = job_output(plan, job)
            if job.key:
                with lock:
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


def _execute(plan: Plan, job: Job, runs: dict[str, str], env: dict, log) -> tuple:
    """Run one job in its own process, its output to its log: (start, end, return code,
    the log's path)."""
    interrupted = interrupted_run(plan, job, runs)
    command = job.command(runs) if interrupted is None else job.resume_command(interrupted)
    if job.run_file is not None:
        job.run_file.unlink(missing_ok=True)  # what it holds afterwards is this job's run
    log_path = plan.out / "logs" / f"{_slug(job.name)}.log"
    start = time.time()
    log(f"start: {job.name}")
    with open(log_path, "w") as handle:
        handle.write(shlex.join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return start, time.time(), done.returncode, log_path


def job_output(plan: Plan, job: Job) -> str:
    """What a finished job made: a training job's run, as its run file names it; an extract
    job's feature file, whose name the plan knows ('' for an observe job)."""
    if job.kind == "extract":
        path = job.target / "features" / f"{plan.tag}.h5"
        if not path.is_file():
            raise SplError(f"job {job.name} finished without writing {path}")
        return str(path)
    if job.run_file is None:
        return ""
    if not job.run_file.is_file():
        raise SplError(f"job {job.name} finished without writing its run file {job.run_file}")
    return job.run_file.read_text().strip()


def interrupted_run(plan: Plan, job: Job, runs: dict[str, str]) -> Path | None:
    """An INCOMPLETE run of this job (an interrupted reproduction): same kind, dataset and
    feature tag, and recorded settings equal to the job's (as the command resolves them)."""
    if job.kind not in ("linear", "finetune"):
        return None
    wanted = job.settings_for(runs)
    if job.kind == "finetune":
        from spl.finetune import resolved_settings

        wanted = resolved_settings(wanted, job.dataset)
    dataset = str(job.target.resolve())
    for config_path in sorted((plan.runs / job.dataset / plan.tag).glob("*/config.json")):
        run = config_path.parent
        if not (run / INCOMPLETE).exists():
            continue
        config = json.loads(config_path.read_text())
        if config.get("kind") != job.kind or config.get("dataset") != dataset:
            continue
        try:
            recorded = settings_from(type(wanted), config.get("settings", {}))
        except SplError:
            continue  # recorded by another version, with settings this one refuses
        if recorded == wanted:
            return run
    return None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


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
            "observed": cell.observed,
            "val": cell.val,
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
