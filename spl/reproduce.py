"""``spl reproduce``: the paper's tables in batch, cell by cell, side by side with the paper.

A *cell* is one (kind, dataset, row) under one protocol (the observed set that trains it,
the val labels that select it); kind is ``linear``, ``recovery`` or ``finetune``. Its result
record (``tables/cells/...json``) holds the options it was computed with; a rerun skips
cells whose record matches the options, recomputes cells whose options differ (never
mixing them into a table) and computes the missing ones. A *table* is a view over cells:
the paper's three, ``since-2021`` (linear and fine-tuned cells of the methods since the
paper) and ``label-bias`` (linear cells under each biased draw). The work is a list of
*jobs* (``spl data observe`` / ``spl extract`` / ``spl fit-linear`` / ``spl finetune``
commands) in three stages; jobs of a stage run in parallel, one per GPU (``--jobs N``),
each in its own process.
"""

from __future__ import annotations

import dataclasses
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
from spl.fit.losses import LOSSES, PAPER_LOSSES, SINCE_2021, VISION_LANGUAGE
from spl.fit.losses.base import SINGLE_POSITIVE, WITH_NEGATIVES
from spl.fit.recipes import RECIPES, source_recipe
from spl.runs import read_csv, read_jsonl
from spl.settings import BIAS_KINDS, DATASETS, TABLES, ReproduceSettings
from spl.settings_fields import setting

RECOVERY_LOSSES = ("an", "an_ls", "role")
LINEARINIT = tuple(protocol.LINEARINIT)
SINCE_REFERENCE = ("an", "role")  # the paper's rows in the since-2021 table
BIAS_DATASET = "coco14"  # the biased draws read COCO's instance annotations
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
        if self.since_losses is None:
            # VLPL and AEVLP need a vision-language model's scores: rows only with --scores
            external = list(VISION_LANGUAGE) if self.scores else []
            self.since_losses = [*SINCE_2021, *external, *SINCE_REFERENCE]
        if self.jobs is None:
            self.jobs = 1
        self.root, self.runs, self.out = Path(self.root), Path(self.runs), Path(self.out)
        if self.clicks is not None:
            self.clicks = Path(self.clicks)

    @property
    def observed_name(self) -> str:
        """The observed set of the plan's protocol (``--observed``, resolved)."""
        return bias_set(self.observed, self.observed_seed)

    @property
    def default_protocol(self) -> bool:
        return not protocol_suffix(self.observed_name, self.val)

    def bias_kinds(self) -> list[str]:
        """The label-bias table's columns: semantic only with the click files."""
        return [k for k in BIAS_KINDS if k != "semantic" or self.clicks is not None]

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


def bias_set(observed: str, seed: int) -> str:
    """The observed-set name of ``--observed``: a draw's kind (uniform, size, location,
    semantic) with its seed, or a set's name as given."""
    if observed == "uniform":
        return protocol.observed_set_name(
            protocol.NUM_POSITIVES, protocol.NUM_NEGATIVES, seed
        )  # fmt: skip
    if observed in BIAS_KINDS:
        return protocol.observed_set_name(1, 0, seed, bias=observed)
    return observed


@dataclass
class Cell:
    table: str  # what computes it: linear | recovery | finetune
    dataset: str
    loss: str  # a loss key, '<key>+linearinit' or '<key>+source' (the method's own recipe)
    options: dict
    observed: str = protocol.OBSERVED
    val: str = "full"
    record: dict | None = None
    status: str = "missing"  # done | missing | stale
    why: str = ""

    @property
    def path_parts(self) -> tuple[str, str, str]:
        return (self.table, self.dataset, self.loss.replace("+", "_"))

    @property
    def protocol_dir(self) -> str:
        """'' under the paper's protocol (the cell paths of earlier versions), else a folder
        naming the observed set and the val labels."""
        return protocol_suffix(self.observed, self.val)


def protocol_suffix(observed: str, val: str) -> str:
    """'' under the paper's protocol, else what names the protocol in cell folders and
    table and figure file names (``size-p1-s1200.val-observed``): the paper's protocol
    keeps the names of earlier versions."""
    if observed == protocol.OBSERVED and val == "full":
        return ""
    return f"{observed}.val-{val}"


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
    folder = plan.out / "cells" / cell.protocol_dir if cell.protocol_dir else plan.out / "cells"
    return folder / table / dataset / f"{loss}.json"


def _prepared_facts(plan: Plan, dataset: str) -> tuple[str, frozenset[str]] | None:
    """(fingerprint, observed set names) of a prepared dataset, None when not prepared;
    ``labels.h5`` is read once per version of the file (an observe job adds sets), not
    once per question: planning asks several times, and COCO's file takes seconds."""
    labels = plan.root / dataset / "labels.h5"
    if not labels.exists():
        return None
    stat = labels.stat()
    return _read_prepared_facts(str(labels.parent), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_prepared_facts(
    folder: str, inode: int, mtime_ns: int, size: int
) -> tuple[str, frozenset[str]]:
    from spl.data.prepared import load_prepared

    prepared = load_prepared(Path(folder))
    return prepared.fingerprint, frozenset(prepared.observed)


def _observed_sets(plan: Plan, dataset: str) -> set[str] | None:
    facts = _prepared_facts(plan, dataset)
    return None if facts is None else set(facts[1])


def _fingerprint(plan: Plan, dataset: str) -> str | None:
    facts = _prepared_facts(plan, dataset)
    return None if facts is None else facts[0]


def cell_options(
    plan: Plan, table: str, dataset: str, loss: str, fingerprint: str | None,
    observed: str = protocol.OBSERVED, val: str = "full",
) -> dict:  # fmt: skip
    """The options a cell's value depends on: a stored record with others is stale. The
    protocol is named only when it is not the paper's (records of earlier versions stay
    valid)."""
    base: dict = {"dataset_fingerprint": fingerprint, "feature_tag": plan.tag, "seeds": plan.seeds}
    if protocol_suffix(observed, val):
        base.update({"observed": observed, "val": val})
    if LOSSES[loss.partition("+")[0]].reads_scores:
        base["scores"] = plan.scores
    if table in ("linear", "recovery"):
        return {**base, "lrs": plan.linear_lrs, "batch_sizes": plan.linear_batch_sizes,
                "epochs": plan.linear_epochs}  # fmt: skip
    key, _, variant = loss.partition("+")
    if variant == "source":
        # as JSON stores it (tuples become lists), so that a stored record compares equal
        recipe = json.loads(json.dumps(dataclasses.asdict(source_recipe(key, dataset))))
        return {**base, "recipe": recipe, "extra": plan.finetune_args}
    options = {**base, "lrs": plan.finetune_lrs, "batch_sizes": plan.finetune_batch_sizes,
               "epochs": plan.finetune_epochs, "extra": plan.finetune_args}  # fmt: skip
    if variant == "linearinit":
        options["linear_phase"] = linearinit_settings(key, dataset, plan)
    return options


def linearinit_settings(loss: str, dataset: str, plan: Plan) -> dict:
    """LinearInit's fixed linear phase (paper.md section 5), with its dataset exceptions."""
    fixed = protocol.LINEARINIT[loss]
    return {
        "lr": fixed["lr"],
        "batch_size": fixed["batch_size_for"].get(dataset, fixed["batch_size"]),
        "epochs": plan.linear_epochs,
    }


def since_row_key(loss: str) -> str:
    """The fine-tuned cell of a since-2021 row: the method's own recipe, or the paper's for
    the paper's losses."""
    return f"{loss}+source" if loss in RECIPES else loss


def trains_under(loss: str, observed: str) -> bool:
    """Whether a linear/fine-tuned row belongs to a table made under ``observed``: a loss
    that trains on observed negatives (IU) has no place under another single-positive draw
    (its negatives come from the paper's uniform set)."""
    key = loss.partition("+")[0]
    return observed == protocol.OBSERVED or LOSSES[key].trains_on != WITH_NEGATIVES


def label_bias_rows(plan: Plan) -> list[str]:
    """The label-bias table's rows: the losses that learn from the single positives alone
    (not the full-label baselines, not IU)."""
    return [
        k for k in plan.linear_losses
        if LOSSES[k].trains_on == SINGLE_POSITIVE and not LOSSES[k].reads_labels
    ]  # fmt: skip


def wanted_cells(plan: Plan, dataset: str) -> list[tuple[str, str, str]]:
    """(kind, row, observed set) of every cell the plan's tables need on ``dataset``."""
    observed = plan.observed_name
    wanted: list[tuple[str, str, str]] = []
    if "linear" in plan.tables:
        wanted += [("linear", k, observed) for k in plan.linear_losses if trains_under(k, observed)]
    if "recovery" in plan.tables:
        wanted += [("recovery", k, observed) for k in RECOVERY_LOSSES]
    if "finetune" in plan.tables:
        wanted += [
            ("finetune", k, observed) for k in plan.finetune_losses if trains_under(k, observed)
        ]
    if "since-2021" in plan.tables:
        wanted += [("linear", k, observed) for k in plan.since_losses]
        wanted += [("finetune", since_row_key(k), observed) for k in plan.since_losses]
    if "label-bias" in plan.tables and dataset == BIAS_DATASET:
        for kind in plan.bias_kinds():
            drawn = bias_set(kind, plan.observed_seed)
            wanted += [("linear", k, drawn) for k in label_bias_rows(plan)]
    return list(dict.fromkeys(wanted))


def plan_cells(plan: Plan) -> list[Cell]:
    if "label-bias" in plan.tables and BIAS_DATASET not in plan.datasets:
        raise SplError(
            f"--table label-bias needs {BIAS_DATASET} among --datasets: the biased draws read "
            "COCO's instance annotations"
        )
    if plan.observed == "semantic" and plan.clicks is None:
        raise SplError(
            "--observed semantic needs --clicks DIR, the folder with COCO's crowdsourced "
            "click files (docs/biased-labels.md)"
        )
    readers = [k for k in plan.since_losses if LOSSES[k].reads_scores]
    if "since-2021" in plan.tables and readers and not plan.scores:
        raise SplError(
            f"{', '.join(readers)} train on a vision-language model's pseudo-labels: pass "
            "--scores TAG (a file written by `spl pseudo-labels ROOT/<dataset>`; docs/scores.md)"
        )
    cells = []
    for dataset in plan.datasets:
        fingerprint = _fingerprint(plan, dataset)
        for table, loss, observed in wanted_cells(plan, dataset):
            options = cell_options(plan, table, dataset, loss, fingerprint, observed, plan.val)
            cell = Cell(table, dataset, loss, options, observed, plan.val)
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


def observe_command(plan: Plan, dataset: str, name: str) -> list[str]:
    """The ``spl data observe`` command that adds the observed set ``name``."""
    import re

    command = [sys.executable, "-m", "spl", "data", "observe", str(plan.root / dataset)]
    biased = re.fullmatch(r"(size|location|semantic)-p1-s(\d+)", name)
    uniform = re.fullmatch(r"uniform-p(\d+|all)-n(\d+|all)-s(\d+)", name)
    if biased:
        command += ["--bias", biased[1], "--seed", biased[2]]
        if biased[1] == "semantic":
            command += ["--clicks", str(plan.clicks) if plan.clicks else "DIR"]
    elif uniform:
        count = {"all": "-1"}
        command += ["--num-pos", count.get(uniform[1], uniform[1]),
                    "--num-neg", count.get(uniform[2], uniform[2]), "--seed", uniform[3]]  # fmt: skip
    else:
        raise SplError(
            f"observed set {name!r} is not in {plan.root / dataset / 'labels.h5'} and its name "
            "does not say how to draw it: add it with `spl data observe` first"
        )
    return command


def _protocol_flags(observed: str, val: str) -> list[str]:
    flags = [] if observed == protocol.OBSERVED else ["--observed", observed]
    return flags + ([] if val == "full" else ["--val", val])


def _scores_flags(plan: Plan, losses: list[str]) -> list[str]:
    readers = any(LOSSES[k.partition("+")[0]].reads_scores for k in losses)
    return ["--scores", plan.scores] if readers and plan.scores else []


def plan_jobs(plan: Plan, cells: list[Cell]) -> list[Job]:
    """Jobs computing the cells that are not done, in stages: observed sets and features,
    linear, fine-tune."""
    jobs: list[Job] = []
    todo = [c for c in cells if c.status != "done"]
    python = [sys.executable, "-m", "spl"]
    device = ["--device", plan.device]
    for dataset in plan.datasets:
        mine = [c for c in todo if c.dataset == dataset]
        if not mine:
            continue
        dataset_dir = str(plan.root / dataset)
        present = _observed_sets(plan, dataset)
        if present is not None:
            for name in dict.fromkeys(c.observed for c in mine):
                if name not in present:
                    command = observe_command(plan, dataset, name)
                    jobs.append(Job(f"observe {dataset} {name}", 0, dataset, [],
                                    lambda _, c=command: c, "observe"))  # fmt: skip
        features = plan.root / dataset / "features" / f"{plan.tag}.h5"
        if not features.exists():
            extract = [*python, "extract", dataset_dir, "--backbone", plan.backbone,
                       "--image-size", str(plan.image_size), *device, *plan.extract_args]  # fmt: skip
            if plan.weights:
                extract += ["--weights", plan.weights]
            jobs.append(
                Job(f"extract {dataset}", 0, dataset, [], lambda _, c=extract: c, "extract")
            )
        # one fit-linear sweep per observed set computes every missing linear and recovery
        # cell of a dataset under it
        linear_cells = [c for c in mine if c.table in ("linear", "recovery")]
        for observed in dict.fromkeys(c.observed for c in linear_cells):
            group = [c for c in linear_cells if c.observed == observed]
            losses = list(dict.fromkeys(c.loss for c in group))
            command = [*python, "fit-linear", dataset_dir, "--features", plan.tag,
                       "--losses", ",".join(losses), "--lrs", _join(plan.linear_lrs),
                       "--batch-sizes", _join(plan.linear_batch_sizes),
                       "--epochs", str(plan.linear_epochs), "--seeds", _join(plan.seeds),
                       *_protocol_flags(observed, plan.val), *_scores_flags(plan, losses),
                       "--out", str(plan.runs), "--quiet", *device]  # fmt: skip
            where = "" if observed == protocol.OBSERVED else f" [{observed}]"
            jobs.append(Job(f"fit-linear {dataset}{where} ({','.join(losses)})", 1, dataset,
                            group, lambda _, c=command: c, "linear"))  # fmt: skip
        for cell in [c for c in mine if c.table == "finetune"]:
            loss, _, variant = cell.loss.partition("+")
            finetune = [*python, "finetune", dataset_dir, "--loss", loss,
                        "--backbone", plan.backbone, "--image-size", str(plan.image_size),
                        "--seeds", _join(plan.seeds), *_protocol_flags(cell.observed, cell.val),
                        *_scores_flags(plan, [loss]),
                        "--out", str(plan.runs), "--quiet", *device, *plan.finetune_args]  # fmt: skip
            if variant == "source":
                # the method's own recipe fixes its lr, batch size, epochs and early stop
                finetune += ["--recipe", "source"]
            else:
                finetune += ["--lrs", _join(plan.finetune_lrs),
                             "--batch-sizes", _join(plan.finetune_batch_sizes),
                             "--epochs", str(plan.finetune_epochs)]  # fmt: skip
            if plan.weights:
                finetune += ["--weights", plan.weights]
            if variant == "linearinit":
                fixed = cell.options["linear_phase"]
                key = f"linearinit {dataset} {loss} {cell.observed}"
                phase = [*python, "fit-linear", dataset_dir, "--features", plan.tag,
                         "--losses", loss, "--lrs", f"{fixed['lr']:g}",
                         "--batch-sizes", str(fixed["batch_size"]),
                         "--epochs", str(fixed["epochs"]), "--seeds", _join(plan.seeds),
                         *_protocol_flags(cell.observed, cell.val),
                         "--out", str(plan.runs), "--quiet", *device]  # fmt: skip
                jobs.append(Job(f"LinearInit linear phase {dataset} {loss}", 1, dataset, [],
                                lambda _, c=phase: c, "linear", key=key))  # fmt: skip
                jobs.append(Job(
                    f"finetune {dataset} {cell.loss}", 2, dataset, [cell],
                    lambda runs, c=finetune, k=key: [*c, "--init-from", runs[k]], "finetune",
                ))  # fmt: skip
            else:
                jobs.append(Job(f"finetune {dataset} {cell.loss}", 2, dataset, [cell],
                                lambda _, c=finetune: c, "finetune"))  # fmt: skip
    return jobs


def jobs_cells(jobs: list[Job]) -> list[Cell]:
    return [cell for job in jobs for cell in job.cells]


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


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
            command = _resume_if_interrupted(plan, job, job.command(runs))
            log_path = plan.out / "logs" / f"{_slug(job.name)}.log"
            start = time.time()
            log(f"start: {job.name}")
            with open(log_path, "w") as handle, _held(observing, job):
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


def _held(locks: dict, job: Job):
    import contextlib

    lock = locks.get(job.dataset) if job.kind == "observe" else None
    return lock if lock is not None else contextlib.nullcontext()


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


# --------------------------------------------------------------------------- tables


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
