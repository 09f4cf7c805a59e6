"""``spl fit-linear``: every loss's linear heads on cached features, as one resumable run.

A grid orchestrator: it resolves what the run trains on (:func:`spl.training.training_inputs`),
reads the feature file, creates or resumes the run (:func:`spl.training.open_run`), trains
the engine and scores the test split with it (:func:`fit_heads`:
:class:`spl.fit.engine.StackedHeads`, :func:`spl.evaluate.scoring.linear_results`), and
writes what they computed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spl.data.common import SplError
from spl.data.prepared import load_prepared
from spl.data.runtime import Processes, process_seconds
from spl.evaluate import paper, report
from spl.evaluate.scoring import linear_results
from spl.extract.features import (
    unreadable_rows,
)
from spl.fit import fused
from spl.fit.data import StreamedFeatures
from spl.fit.engine import TIMINGS, HeadConfig, StackedHeads
from spl.fit.losses import LOSSES, SINGLE_POSITIVE, WITH_NEGATIVES
from spl.linear_plan import (
    FEATURE_ATTRS,
    engine_options,
    memory_plan,
    scoring_options,
    split_features,
    streamed_split_features,
    val_known,
)
from spl.linear_shards import (
    GATHER_WAIT,
    ShareCheckpoints,
    Unit,
    assign,
    canonical_order,
    history_in_order,
    history_name,
    saved_units,
    sweep_units,
    unit_fit,
    unit_progress,
)
from spl.memory_plan import MemoryPlan
from spl.runs import CHECKPOINT, CONFIG, HISTORY, Run
from spl.settings import LinearSettings
from spl.training import TrainingInputs, open_run, training_inputs, write_pseudo_labels

RESULT_COLUMNS = [
    "head", "loss", "lr", "batch_size", "seed", "best_epoch", "val_map", "test_map",
    "test_map_paper_metric", "train_recovery_map", "estimator_recovery_map",
    "test_p_at_1", "test_r_at_1", "test_p_at_3", "test_r_at_3", "observed", "val",
    "test_classes_evaluated",
]  # fmt: skip


def run_linear(
    dataset_dir: Path,
    tag: str,
    settings: LinearSettings,
    out_root: Path,
    *,
    resume: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run_file: Path | None = None,
) -> Path:
    """Train the sweep and write the run directory; returns its path (also written to
    ``run_file``, as soon as the run exists). Under torchrun the sweep's engine groups are
    spread over the processes and rank 0 writes the run a single process writes
    (:mod:`spl.linear_shards`)."""
    laps = Laps(command=process_seconds())
    procs = Processes.start(settings.device, timeout=GATHER_WAIT)
    try:
        path = _run_linear(dataset_dir, tag, settings, out_root, procs, laps, resume=resume,
                           progress=progress, log=log, run_file=run_file)  # fmt: skip
    except BaseException:
        procs.close(failed=True)
        raise
    procs.close()
    return path


def _run_linear(
    dataset_dir: Path,
    tag: str,
    settings: LinearSettings,
    out_root: Path,
    procs: Processes,
    laps: Laps,
    *,
    resume: Path | None,
    progress: bool,
    log: Callable[[str], None],
    run_file: Path | None,
) -> Path:
    prepared = load_prepared(dataset_dir)
    inputs = training_inputs(prepared, settings, settings.losses, unreadable_rows(prepared, tag))
    laps.lap("read_labels")
    plan = memory_plan(inputs, tag, procs.device)  # refused here, before a run exists
    if plan.stream_features:
        features, feature_attrs = streamed_split_features(prepared, tag, inputs.rows)
    else:
        features, feature_attrs = split_features(prepared, tag, inputs.rows)
    laps.lap("read_features")
    fused.setting()  # a bad SPL_COMPILE fails here, before a run directory exists
    units = sweep_units(
        settings, inputs.losses, rows=len(inputs.rows["train"]),
        features=features["train"].shape[1], classes=prepared.num_classes,
    )  # fmt: skip
    owners = assign(units, procs.world)
    source = {
        "feature_tag": tag,
        "feature_attrs": {k: feature_attrs.get(k) for k in FEATURE_ATTRS},
    }
    runtime = {"device": str(procs.device), "memory_plan": plan.record()}
    if procs.world > 1:
        runtime["processes"] = procs.world
    record = inputs.record(source, runtime=runtime)
    parent = Path(out_root) / prepared.name / tag
    run = open_run(inputs, parent, "linear", record, resume=resume, run_file=run_file,
                   procs=procs if procs.world > 1 else None)  # fmt: skip
    procs.together(lambda: _check_shared(run, procs))
    pseudo_summary = write_pseudo_labels(run, inputs)
    mine = [index for index, owner in enumerate(owners) if owner == procs.rank]
    # Every unit's progress, whichever number of processes saved it (every rank reads
    # every file before any rank writes its own); a run killed before a unit's first
    # checkpoint trains that unit from the beginning.
    saved = procs.together(lambda: saved_units(run, units, settings.lrs))
    checkpoints = ShareCheckpoints(
        run, procs.rank, {units[i].key: saved[units[i].key] for i in mine if units[i].key in saved}
    )
    procs.together(lambda: _restart_share(run, procs, units, mine, saved, checkpoints))
    if procs.rank == 0:
        _note_left_out(inputs, log)
        _note_processes(units, owners, procs.world, log)
    bar = _progress_bar(units, mine, saved, len(inputs.rows["train"]), settings.epochs,
                        progress and procs.rank == 0)  # fmt: skip
    laps.lap("open_run")
    live_history = history_name(procs.rank, procs.world)

    def train() -> tuple[dict[int, dict], dict[str, float]]:
        fits, timings = fit_heads(inputs, features, procs.device, units, mine, saved,
                                  checkpoints, live_history, bar, plan=plan)  # fmt: skip
        laps.add(timings)  # what follows, until the gather's end, is waiting for the others
        return fits, timings

    fits, timings = procs.together(train)
    if bar is not None:
        bar.close()
    for split_features_ in features.values():  # streamed: the feature file closes
        if isinstance(split_features_, StreamedFeatures):
            split_features_.close()
    gathered = procs.gather_in_order(owners, fits)
    if procs.world > 1:
        laps.lap("gather")
    procs.together(
        lambda: _write_run(run, inputs, tag, units, owners, gathered, timings, pseudo_summary,
                           laps, procs.world),
        everyone=False,
    )  # fmt: skip
    return run.path


def _write_run(
    run: Run,
    inputs: TrainingInputs,
    tag: str,
    units: list[Unit],
    owners: list[int],
    fits: list[dict],
    timings: dict[str, float],
    pseudo_summary: str,
    laps: Laps,
    world: int,
) -> None:
    """Rank 0: the run a single process writes, from every unit's fit (in the units'
    order); then the processes' own files go."""
    fitted = merge_fits(units, fits, timings)
    write_results(run, inputs, tag, fitted, pseudo_summary)
    heads = [_entry_heads({"fit": fit}) for fit in fits]
    run.write_text(HISTORY, _jsonl(history_in_order(units, heads, [f["history"] for f in fits])))
    laps.lap("write_results")
    shares = _shares(run, units, owners, fits, world)
    run.complete(train_seconds=round(fitted.train_seconds, 2), timings=laps.record(),
                 **shares)  # fmt: skip
    # After the run is marked complete: a kill before this leaves a resumable run whose
    # every unit is saved somewhere; a kill after, at worst files a finished run ignores.
    _remove_share_files(run)


def _check_shared(run: Run, procs: Processes) -> None:
    """Every process reads and writes its share's checkpoints in the run directory: it must
    be on a filesystem each of them sees."""
    if not (run.path / CONFIG).is_file():
        raise SplError(
            f"process {procs.rank} of this torchrun job cannot see the run directory "
            f"{run.path} that rank 0 made: each process keeps its share's checkpoints there. "
            "Put --out on a filesystem every node shares"
        )


def _note_processes(units: list[Unit], owners: list[int], world: int, log) -> None:
    if world == 1:
        return
    total = sum(unit.work for unit in units) or 1.0
    shares = []
    for rank in range(world):
        mine = [u for u, owner in zip(units, owners, strict=True) if owner == rank]
        work = sum(u.work for u in mine)
        shares.append(f"rank {rank}: {len(mine)} ({100 * work / total:.0f} % of the work)")
    log(f"{len(units)} engine groups over {world} processes; " + ", ".join(shares))
    idle = world - len(set(owners))
    if idle:
        parts = max(unit.parts for unit in units)
        log(
            f"note: {idle} of the {world} processes have no engine group to train: "
            f"--loss-parts (now {parts}) splits each (seed, batch size) group's losses into "
            "that many groups, which more processes can share (it changes the last bits of "
            "the results, whatever the number of processes)"
        )


def _shares(run: Run, units: list[Unit], owners: list[int], fits: list[dict], world: int) -> dict:
    """What config.json records of a torchrun job that finished the run: its number of
    processes and each rank's units and training time."""
    if world == 1:  # a run torchrun started, finished by a single process, says so
        return {"processes": 1} if "processes" in run.config else {}
    shares = []
    for rank in range(world):
        theirs = [i for i, owner in enumerate(owners) if owner == rank]
        seconds = sum(fits[i]["train_seconds"] for i in theirs)
        shares.append(
            {
                "rank": rank,
                "units": [units[i].key for i in theirs],
                "train_seconds": round(seconds, 2),
            }
        )
    return {"processes": world, "shares": shares}


def _restart_share(
    run: Run,
    procs: Processes,
    units: list[Unit],
    mine: list[int],
    saved: dict[str, dict],
    checkpoints: ShareCheckpoints,
) -> None:
    """A process's files as of its units' saved progress: its checkpoint file holds what
    any file saved of its units (a resume with another number of processes), its live
    history those units' rows (rows written after a checkpoint, by a kill before the next,
    are dropped). Rank 0 removes the live histories this job has no rank for."""
    if checkpoints.entries:
        checkpoints.write()
    if procs.rank == 0:
        ours = {history_name(rank, procs.world) for rank in range(procs.world)}
        stale = [HISTORY, *(p.name for p in run.path.glob("history.rank*.jsonl"))]
        for name in stale:
            if name not in ours:
                run.remove(name)
    entries = [(units[i], saved[units[i].key]) for i in mine if units[i].key in saved]
    heads = [_entry_heads(entry) for _, entry in entries]
    histories = [_entry_history(entry) for _, entry in entries]
    rows = history_in_order([u for u, _ in entries], heads, histories)
    checkpoints.writer.reset_history(rows, history_name(procs.rank, procs.world))


def _entry_heads(entry: dict) -> list[HeadConfig]:
    part = entry["fit"] if "fit" in entry else entry["state"]
    return [HeadConfig(**h) for h in part["heads"]]


def _entry_history(entry: dict) -> list[dict]:
    return entry["fit"]["history"] if "fit" in entry else entry["state"]["history"]


def _remove_share_files(run: Run) -> None:
    """The processes' own files, once rank 0 has written the run (the checkpoint of rank 0
    went with :meth:`Run.complete`)."""
    for path in [*run.path.glob("checkpoint.rank*.pt"), *run.path.glob("history.rank*.jsonl")]:
        run.remove(path.name)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


class Laps:
    """Where a command's time went, in seconds by phase, for ``config.json``'s ``timings``:
    ``command`` is the time from the process's start to the command's first line (the
    interpreter and the imports); ``total`` from the process's start to the record."""

    def __init__(self, command: float | None) -> None:
        self.seconds: dict[str, float] = {"command": command or 0.0}
        self.start = command
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def add(self, seconds: dict[str, float]) -> None:
        """Phases timed elsewhere (the engine's) within the lap being run."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        self.last = time.perf_counter()

    def record(self) -> dict[str, float]:
        total = process_seconds()
        out = {name: round(value, 3) for name, value in self.seconds.items()}
        out["total"] = round(total if total is not None else sum(self.seconds.values()), 3)
        return out


@dataclass
class FittedHeads:
    """What a finished sweep computed, as the run writes it."""

    heads: list[HeadConfig]
    weight: torch.Tensor  # [H, L, D]
    bias: torch.Tensor  # [H, L]
    best_epoch: np.ndarray
    results: list[dict]  # one row per head: selection, test scores, recovery
    per_class_ap: list  # per head, the test AP of each class
    exported_state: dict  # per head, its loss state at its best epoch (LinearInit)
    train_seconds: float
    timings: dict  # seconds by phase: the engine's (its TIMINGS) and the test scoring


def fit_heads(
    inputs: TrainingInputs,
    features: dict[str, torch.Tensor],
    device: torch.device,
    units: list[Unit],
    mine: list[int],
    saved: dict[str, dict],
    checkpoints: ShareCheckpoints,
    history: str,
    bar=None,
    *,
    plan: MemoryPlan | None = None,
) -> tuple[dict[int, dict], dict[str, float]]:
    """This process's share of the sweep: each of its units (``mine``, indices into
    ``units``) trained by the engine and scored on the test split, resumed from ``saved``
    (a finished unit is taken as saved); returns each unit's fit (:func:`unit_fit`) by index,
    and where the time went (the engine's :data:`TIMINGS`, summed, and ``test_scoring``)."""
    timings = dict.fromkeys((*TIMINGS, "test_scoring"), 0.0)
    on_epoch = checkpoint_writer(checkpoints.writer, bar, name=checkpoints.name, history=history,
                            pack=checkpoints.pack)  # fmt: skip
    fits = {}
    for index in mine:
        unit = units[index]
        entry = saved.get(unit.key, {})
        if "fit" in entry:
            fits[index] = entry["fit"]
            continue
        checkpoints.current = unit.key
        fits[index] = fit_unit(inputs, features, device, unit, entry.get("state"), on_epoch, bar,
                               plan=plan)  # fmt: skip
        for name, seconds in fits[index]["timings"].items():
            timings[name] += seconds
        written = time.perf_counter()
        checkpoints.finish(unit.key, fits[index])
        timings["on_epoch"] += time.perf_counter() - written
    return fits, timings


def fit_unit(
    inputs: TrainingInputs,
    features: dict[str, torch.Tensor],
    device: torch.device,
    unit: Unit,
    state: dict | None,
    on_epoch: Callable[[StackedHeads, dict], None],
    bar=None,
    *,
    plan: MemoryPlan | None = None,
) -> dict:
    """One unit of the sweep (an engine group: a seed, a batch size, the losses of a part,
    every lr) trained by the engine, resumed from ``state``, and what it computed: the one
    place that trains the engine and reads its results. ``plan``: what stays resident
    (:func:`memory_plan`; default everything)."""
    settings = inputs.settings
    model = StackedHeads(
        # resolved and checked before the run existed; the unit's, in the run's order
        losses={k: loss for k, loss in inputs.losses.items() if k in unit.losses},
        lrs=settings.lrs,
        batch_sizes=[unit.batch_size],
        seeds=[unit.seed],
        epochs=settings.epochs,
        device=device,
        histogram_bins=settings.histogram_bins,
        **engine_options(plan),
    )
    model.fit(
        features["train"],
        inputs.observed[SINGLE_POSITIVE],
        labels=inputs.label_matrix("train"),
        X_val=features["val"],
        Y_val=inputs.selection_labels,
        observed_iu=inputs.observed.get(WITH_NEGATIVES),
        state=state,
        on_epoch=on_epoch,
        on_step=None if bar is None else (lambda _: bar.update()),
        scores=inputs.scores,
        val_known=val_known(inputs),
    )
    scoring = time.perf_counter()
    results, per_class_ap = linear_results(
        model, features["test"], inputs.label_matrix("test"),
        X_train=features["train"], Y_train=inputs.label_matrix("train"),
        **scoring_options(inputs, plan),
    )  # fmt: skip
    timings = {**model.timings_, "test_scoring": time.perf_counter() - scoring}
    return unit_fit(model, results, per_class_ap, timings)


def merge_fits(units: list[Unit], fits: list[dict], timings: dict[str, float]) -> FittedHeads:
    """The units' fits (in the units' order) as one sweep's, its heads in the run's order
    (:func:`spl.linear_shards.canonical_order`); ``timings``: this process's."""
    heads = [_entry_heads({"fit": fit}) for fit in fits]
    order = canonical_order(units, heads)
    exported = {}
    for u, i in order:
        state = fits[u]["exported_state"].get(heads[u][i].name)
        if state is not None:
            exported[heads[u][i].name] = state
    return FittedHeads(
        heads=[heads[u][i] for u, i in order],
        weight=torch.stack([fits[u]["weight"][i] for u, i in order]),
        bias=torch.stack([fits[u]["bias"][i] for u, i in order]),
        best_epoch=np.array([int(fits[u]["best_epoch"][i]) for u, i in order], dtype=np.int64),
        results=[fits[u]["results"][i] for u, i in order],
        per_class_ap=[fits[u]["per_class_ap"][i] for u, i in order],
        exported_state=exported,
        train_seconds=sum(fit["train_seconds"] for fit in fits),
        timings=timings,
    )


# Checkpoints take at most this share of a run's time: after the first epoch, the next one is
# written once the training since the last has taken 1 / share times what writing it took
# (the VOC-sized sweep wrote ~50 MB after each of its 50 epochs: 6 % of its time on a CPU).
CHECKPOINT_SHARE = 0.02


def checkpoint_writer(
    run: Run,
    bar,
    *,
    name: str = CHECKPOINT,
    history: str = HISTORY,
    pack: Callable[[StackedHeads], dict] | None = None,
) -> Callable[[StackedHeads, dict], None]:
    """After each epoch: the epoch's history rows (appended to ``history``), and the
    checkpoint ``name`` when it is due (:data:`CHECKPOINT_SHARE`), holding ``pack(model)``
    (the model's state by default). A resumed run starts from the last checkpoint (its
    history as of then), so an interruption loses at most the epochs since."""
    due = {"after": 0.0, "at": time.perf_counter()}

    def on_epoch(model: StackedHeads, record: dict) -> None:
        if time.perf_counter() - due["at"] >= due["after"]:
            started = time.perf_counter()
            run.save(name, model.state_dict() if pack is None else pack(model))
            due["at"] = time.perf_counter()
            due["after"] = (due["at"] - started) / CHECKPOINT_SHARE
        run.append_history(model.history_[-len(record["group"].heads) :], history)
        if bar is not None:
            bar.set_postfix(best_val=f"{float(record['val_map'].max()):.1f}", refresh=False)

    return on_epoch


def _note_left_out(inputs: TrainingInputs, log: Callable[[str], None]) -> None:
    for split, count in inputs.excluded_counts.items():
        if count:
            log(f"note: {count} {split} rows have no features (bad images) and are left out")
    if inputs.scores is not None:
        unscored = int((~torch.isfinite(inputs.scores.image).all(dim=1)).sum())
        if unscored:
            log(f"note: {unscored} train rows have no scores (bad images): no pseudo-labels")


def _progress_bar(
    units: list[Unit],
    mine: list[int],
    saved: dict[str, dict],
    num_rows: int,
    epochs: int,
    enabled: bool,
):
    """Steps of this process's units, those saved counted as done."""
    if not enabled:
        return None
    from tqdm import tqdm

    total = done = 0
    for index in mine:
        unit = units[index]
        steps = num_rows // unit.batch_size
        total += steps * epochs
        finished = unit_progress(saved.get(unit.key))
        done += steps * (epochs if finished == float("inf") else max(int(finished), 0))
    return tqdm(total=total, initial=done, unit="step", desc="fit-linear", leave=False)


def write_results(
    run: Run, inputs: TrainingInputs, tag: str, fitted: FittedHeads, extra: str = ""
) -> None:
    """results.csv, per_class_ap.csv, heads.pt and summary.md of a finished sweep (``extra``:
    sections appended to the summary)."""
    prepared, settings = inputs.prepared, inputs.settings
    # The protocol in every row: which observed labels trained it and which val labels
    # selected its epoch.
    rows = [{**row, "observed": settings.observed, "val": settings.val} for row in fitted.results]
    run.write_csv("results.csv", rows, RESULT_COLUMNS)
    run.write_csv(
        "per_class_ap.csv",
        [{"head": r["head"], **dict(zip(prepared.classes, ap, strict=True))}
         for r, ap in zip(rows, fitted.per_class_ap, strict=True)],
        ["head", *prepared.classes],
    )  # fmt: skip
    run.save(
        "heads.pt",
        {
            "heads": [dataclasses.asdict(h) for h in fitted.heads],
            "names": [h.name for h in fitted.heads],
            "weight": fitted.weight,
            "bias": fitted.bias,
            "best_epoch": torch.from_numpy(fitted.best_epoch),
            "classes": list(prepared.classes),
            "feature_tag": tag,
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            # Each head's loss state at its best epoch (ROLE: the label estimates) for the
            # training-split rows in `train_rows` order: LinearInit carries it over.
            "state": fitted.exported_state,
            "train_rows": torch.from_numpy(inputs.rows["train"]),
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
