"""The linear sweep in units of work: engine groups, spread over the processes of a torchrun
job, each checkpointed on its own, and gathered back in the single process's order.

A *unit* is one engine group, a grid :class:`~spl.fit.engine.StackedHeads` trains: one
(seed, batch size) with every lr and the losses of one part (``--loss-parts``: the losses of
each (seed, batch size) split into parts of about equal work; 1, the default, keeps every
loss in one group, the engine's own grouping). A head's arithmetic depends on which heads
share its group (its matrix products and reductions are over the group's width: on the CPU,
one group of nine losses against two of four and five changes the last bits of some
heads), and on nothing else: a group trained alone, in another process, with other groups
before it or none, gives the same bits (the batches and the initial weights are functions
of the seed alone: :func:`spl.fit.heads.epoch_permutation`, :func:`~spl.fit.heads.initial_head`).
So the units are fixed by the grid and ``--loss-parts``, never by the number of processes,
and a run is identical whatever that number is; ``--loss-parts 1`` is the single process
of earlier versions, bit for bit.

The units go to the processes by work, largest first, each to the least loaded process
(:func:`assign`); work is (weight entries + trainable state entries) x lrs x steps, which
counts ROLE's estimator (one trainable logit per training row and class, all updated by
Adam each step) where the weights alone would not. Each process keeps its units' progress
in its own checkpoint file (rank 0 ``checkpoint.pt``, rank r ``checkpoint.rank<r>.pt``): a
finished unit as its results, a unit in training as its engine state. A resumed run reads
every checkpoint file there is, each unit where it went furthest (:func:`saved_units`), so
it may resume with another number of processes, a single process included: each process
first writes its own units' saved progress into its own file (:class:`ShareCheckpoints`),
and files of ranks the job does not have are only read (removed once the run is done).
Rank 0 gathers the finished units (:meth:`~spl.data.runtime.Processes.gather_in_order`) and
writes the run in the order of :func:`canonical_order`.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spl.data.common import SplError
from spl.fit.heads import HeadConfig
from spl.fit.losses import Loss
from spl.runs import CHECKPOINT, HISTORY, Run, load_torch

# A process that has trained its share waits at the gather for the slowest one: as long as
# the share it trains (hours, for a large sweep on a CPU), far beyond torch's default.
GATHER_WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Unit:
    """One engine group of the sweep: a (seed, batch size) and the losses of one part."""

    seed: int
    batch_size: int
    losses: tuple[str, ...]  # in the engine's order within a group (by key)
    group: int  # its (seed, batch size)'s position in the grid: seeds, then batch sizes
    part: int
    parts: int
    work: float  # (weight + trainable state entries) x lrs x steps

    @property
    def key(self) -> str:
        """Its name in checkpoints, e.g. ``s0_bs8`` or ``s0_bs8_part2of3``."""
        name = f"s{self.seed}_bs{self.batch_size}"
        return name if self.parts == 1 else f"{name}_part{self.part + 1}of{self.parts}"


def head_entries(loss: Loss, rows: int, features: int, classes: int) -> int:
    """What Adam updates each step for one head of ``loss``: its weights and biases, and its
    trainable per-row state (ROLE: one logit per training row and class)."""
    return (features + 1) * classes + len(loss.trainable) * rows * classes


def check_loss_parts(parts: object, losses: Sequence[str], option: str = "--loss-parts") -> int:
    """``--loss-parts``: an integer from 1 to the number of losses (each part needs one);
    ``option`` names where it was set in the message (the flag, or a --config file's key)."""
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= len(losses):
        raise SplError(
            f"{option} {parts!r} is outside its range 1..{len(losses)}: each part of a "
            f"(seed, batch size) group needs a loss, and this run trains {len(losses)} "
            f"({', '.join(losses)}); give at most {len(losses)}"
        )
    return parts


def loss_partition(weights: Mapping[str, float], parts: int) -> list[tuple[str, ...]]:
    """The losses split into ``parts`` of about equal summed weight (the heaviest first, each
    to the lightest part so far; ties to the earlier part), each part's losses by key.
    A function of the losses and ``parts`` alone."""
    check_loss_parts(parts, list(weights))
    loads = [0.0] * parts
    members: list[list[str]] = [[] for _ in range(parts)]
    for key in sorted(weights, key=lambda k: (-weights[k], k)):
        lightest = min(range(parts), key=lambda p: (loads[p], p))
        loads[lightest] += weights[key]
        members[lightest].append(key)
    return [tuple(sorted(keys)) for keys in members]


def sweep_units(
    settings, losses: Mapping[str, Loss], *, rows: int, features: int, classes: int
) -> list[Unit]:
    """The sweep's units, in the grid's order: per seed, per batch size, its parts."""
    parts = check_loss_parts(getattr(settings, "loss_parts", 1), list(losses))
    per_head = {k: head_entries(loss, rows, features, classes) for k, loss in losses.items()}
    partition = loss_partition(per_head, parts)
    units = []
    grid = [(seed, bs) for seed in settings.seeds for bs in settings.batch_sizes]
    for group, (seed, bs) in enumerate(grid):
        steps = (rows // bs) * settings.epochs
        for part, keys in enumerate(partition):
            work = float(len(settings.lrs) * sum(per_head[k] for k in keys) * steps)
            units.append(Unit(seed, bs, keys, group, part, parts, work))
    return units


def assign(units: Sequence[Unit], world: int) -> list[int]:
    """The rank that trains each unit: the largest units first, each to the least loaded
    rank so far (ties: the earlier unit, the lower rank). A function of the units and the
    number of processes alone, so every rank computes the same assignment."""
    loads = [0.0] * world
    owners = [0] * len(units)
    for index in sorted(range(len(units)), key=lambda i: (-units[i].work, i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += units[index].work
        owners[index] = rank
    return owners


# --------------------------------------------------------------------------- the order


def canonical_order(units: Sequence[Unit], heads: Sequence[Sequence[HeadConfig]]) -> list:
    """(unit index, position in the unit) of every head, in the run's order: per (seed,
    batch size), by decreasing lr, then by loss key, as the engine orders one group of all
    the losses. With ``--loss-parts 1`` it is the units' heads one after the other."""
    entries = [
        (u, i, head) for u, unit_heads in enumerate(heads) for i, head in enumerate(unit_heads)
    ]
    entries.sort(key=lambda e: (units[e[0]].group, -e[2].lr, e[2].loss))  # stable
    return [(u, i) for u, i, _ in entries]


def history_in_order(
    units: Sequence[Unit], heads: Sequence[Sequence[HeadConfig]], histories: Sequence[list]
) -> list[dict]:
    """The units' history rows in the run's order: per (seed, batch size), epoch by epoch,
    each epoch's heads in :func:`canonical_order` (a unit records one row per head and
    epoch, in its heads' order)."""
    position = {pair: n for n, pair in enumerate(canonical_order(units, heads))}
    keyed = []
    for u, rows in enumerate(histories):
        count = len(heads[u])
        for j, row in enumerate(rows):
            if row["head"] != heads[u][j % count].name:
                raise SplError(f"the history of {units[u].key} is out of order at row {j}")
            keyed.append(((units[u].group, row["epoch"], position[(u, j % count)]), row))
    keyed.sort(key=lambda item: item[0])
    return [row for _, row in keyed]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(rank: int) -> str:
    """The checkpoint file of a rank's units: ``checkpoint.pt`` for rank 0 (a single process's
    too), ``checkpoint.rank<r>.pt`` for the others."""
    return CHECKPOINT if rank == 0 else f"checkpoint.rank{rank}.pt"


def history_name(rank: int, world: int) -> str:
    """Where a rank appends its units' history rows while it trains: a single process's
    ``history.jsonl`` itself; under torchrun one file per rank, and rank 0 writes
    ``history.jsonl`` in the run's order once every unit is done."""
    return HISTORY if world == 1 else f"history.rank{rank}.jsonl"


def checkpoint_files(path: Path) -> list[Path]:
    """Every checkpoint file of a run directory, whichever number of processes wrote it."""
    return sorted(p for p in [path / CHECKPOINT, *path.glob("checkpoint.rank*.pt")] if p.is_file())


def unit_progress(entry: dict | None) -> float:
    """How far a saved unit is: finished, or the epochs its state has done."""
    if entry is None:
        return -1.0
    if "fit" in entry:
        return float("inf")
    return float(entry["state"]["groups"][0]["epochs_done"])


def saved_units(run: Run, units: Sequence[Unit], lrs: Sequence[float]) -> dict[str, dict]:
    """Each unit's furthest saved progress in the run's checkpoint files, by unit key:
    ``{"fit": ...}`` (finished: its results) or ``{"state": ...}`` (its engine state). Files
    from another number of processes are read alike; a unit saved in two (a resume with
    fewer processes) counts where it went furthest. A checkpoint written before the units
    (one engine state of the whole grid) is read as one unit per group."""
    known = {unit.key: unit for unit in units}
    found: dict[str, dict] = {}
    for path in checkpoint_files(run.path):
        saved = load_torch(path, "linear-run checkpoint")
        entries = saved["units"] if "units" in saved else _whole_grid(saved, units, lrs, path)
        for key, entry in entries.items():
            part = entry.get("fit") or entry.get("state") or {}
            losses = {head["loss"] for head in part.get("heads", [])}
            if key not in known or losses != set(known[key].losses):
                raise SplError(
                    f"{path} holds the engine group {key!r} ({', '.join(sorted(losses))}), "
                    "which this run does not train (its --loss-parts, grid or training rows "
                    "differ): it is not this run's checkpoint; start a new run"
                )
            if unit_progress(entry) > unit_progress(found.get(key)):
                found[key] = entry
    return found


def _whole_grid(saved: dict, units: Sequence[Unit], lrs: Sequence[float], path: Path) -> dict:
    """An earlier version's checkpoint, the engine's state of the whole grid (one group per
    (seed, batch size), in the units' order), as one entry per unit."""
    if any(unit.parts != 1 for unit in units) or len(saved["groups"]) != len(units):
        raise SplError(f"{path} is a checkpoint of another grid than this run's")
    entries, offset = {}, 0
    for unit, group in zip(units, saved["groups"], strict=True):
        count = len(lrs) * len(unit.losses)
        heads = saved["heads"][offset : offset + count]
        names = {HeadConfig(**h).name for h in heads}
        history = [row for row in saved["history"] if row["head"] in names]
        entries[unit.key] = {"state": {"heads": heads, "groups": [group], "history": history}}
        offset += count
    return entries


class ShareCheckpoints:
    """A rank's checkpoint file: the saved progress of its units (a finished unit's results,
    the engine state of one in training or interrupted), the file rewritten whole
    (atomically) each time. Every rank writes its own file only (``writer``: the run,
    writing on any rank); ``saved``: its units' progress found at the start."""

    def __init__(self, run: Run, rank: int, saved: Mapping[str, dict]) -> None:
        self.writer = Run(run.path, run.config, writes=True)
        self.name = checkpoint_name(rank)
        self.entries = dict(saved)
        self.current: str | None = None

    def pack(self, model) -> dict:
        """What the file holds after an epoch of ``model`` (the current unit's engine)."""
        units = dict(self.entries)
        if self.current is not None and model is not None:
            units[self.current] = {"state": model.state_dict()}
        return {"units": units}

    def write(self) -> None:
        """The file as of now: at the start of a resumed job, its units' progress gathered
        from whichever files held it (a later rewrite of those files by their own ranks
        then loses nothing)."""
        self.writer.save(self.name, self.pack(None))

    def finish(self, key: str, fit: dict) -> None:
        """A unit is done: its results replace its state in the file, written now (a resume
        then never trains it again)."""
        self.entries[key] = {"fit": fit}
        self.current = None
        self.write()


def unit_fit(model, results: list[dict], per_class_ap: list, timings: dict) -> dict:
    """What a finished unit hands to rank 0 (and keeps in its checkpoint): its heads, their
    best-epoch weights, results rows, per-class test AP, exported loss state and history,
    as tensors and plain containers."""
    import torch

    return {
        "heads": [dataclasses.asdict(h) for h in model.heads_],
        "weight": model.coef_.float().contiguous(),  # not a view of the biases' storage
        "bias": model.intercept_.float().contiguous(),
        "best_epoch": torch.from_numpy(model.best_epoch_),
        "results": results,
        "per_class_ap": per_class_ap,
        "exported_state": model.exported_state_,
        "history": [dict(row) for row in model.history_],
        "train_seconds": float(model.train_seconds_),
        "timings": dict(timings),
    }
