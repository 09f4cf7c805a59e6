"""Run directories (docs/architecture.md contracts 3 and 4): one lifecycle for ``fit-linear`` and
``finetune`` (:class:`Run`: created once and never reused, marked incomplete until its
results are written, resumable from its checkpoint), and a reader of finished linear runs
(:class:`LinearRun`) for LinearInit and ``predict``."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spl.data.common import SplError, atomic_path, write_json_atomic, write_text_atomic

INCOMPLETE = "INCOMPLETE"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"
COMMANDS = {"linear": "fit-linear", "finetune": "finetune"}


class Run:
    """A run directory ``<parent>/<kind>-<UTC time>/``.

    ``writes`` is False on the ranks of a torchrun job other than 0: they follow the same
    lifecycle without touching files.
    """

    def __init__(self, path: Path, config: dict, *, writes: bool = True) -> None:
        self.path = Path(path)
        self.config = config
        self.writes = writes

    @classmethod
    def create(cls, parent: Path, kind: str, config: dict, *, writes: bool = True) -> Run:
        """A new, never-used directory holding ``config.json`` and the INCOMPLETE marker."""
        config = {"kind": kind, **config, "started": now(), "command": command_line()}
        if not writes:
            return cls(Path(parent), config, writes=False)
        path = new_run_dir(Path(parent), kind)
        write_config(path, config)
        return cls(path, config)

    @classmethod
    def resume(cls, path: Path, kind: str, *, writes: bool = True) -> Run:
        """An interrupted run of ``kind``; a finished one or another kind is refused."""
        path = Path(path)
        config = read_config(path)
        if config.get("kind") != kind:
            raise SplError(f"{path} is not a {COMMANDS[kind]} run (it is {config.get('kind')!r})")
        if not (path / INCOMPLETE).exists():
            raise SplError(f"{path} has finished; nothing to resume")
        return cls(path, config, writes=writes)

    def at(self, path: Path) -> Run:
        """The same run at ``path`` (ranks other than 0 learn the path rank 0 created)."""
        self.path = Path(path)
        return self

    # ------------------------------------------------------------------ files

    def update_config(self, **values: Any) -> None:
        self.config.update(values)
        if self.writes:
            write_config(self.path, self.config)

    def save(self, name: str, obj: Any) -> None:
        """A torch file (tensors only) written atomically."""
        if self.writes:
            save_torch(self.path / name, obj)

    def load(self, name: str, what: str) -> Any | None:
        """A torch file of this run, or None when it does not exist (yet)."""
        path = self.path / name
        return load_torch(path, what) if path.exists() else None

    def write_text(self, name: str, text: str) -> None:
        if self.writes:
            write_text_atomic(self.path / name, text)

    def write_json(self, name: str, obj: Any) -> None:
        if self.writes:
            write_json_atomic(self.path / name, obj)

    def write_csv(self, name: str, rows: list[dict], columns: list[str]) -> None:
        if self.writes:
            write_csv(self.path / name, rows, columns)

    def append_history(self, rows: list[dict], name: str = HISTORY) -> None:
        if self.writes:
            append_jsonl(self.path / name, rows)

    def reset_history(self, rows: list[dict], name: str = HISTORY) -> None:
        """The history as of a checkpoint: rows written after it (a kill between the
        checkpoint and the next epoch's rows) are dropped."""
        if self.writes:
            (self.path / name).unlink(missing_ok=True)
            append_jsonl(self.path / name, rows)

    def remove(self, name: str) -> None:
        if self.writes:
            (self.path / name).unlink(missing_ok=True)

    def complete(self, **values: Any) -> None:
        """Record the finishing time, drop the checkpoint, remove the INCOMPLETE marker."""
        self.update_config(finished=now(), **values)
        if self.writes:
            (self.path / CHECKPOINT).unlink(missing_ok=True)
            mark_complete(self.path)


# --------------------------------------------------------------------------- linear runs


@dataclass
class LinearHead:
    """One head of a finished linear run: what LinearInit and ``predict`` need."""

    run: Path
    name: str
    loss: str
    seed: int
    weight: torch.Tensor  # [L, D]
    bias: torch.Tensor  # [L]
    val_map: float
    state: dict[str, torch.Tensor]  # the loss's exported state at the head's best epoch
    train_rows: np.ndarray  # rows (of trainval) that state's rows stand for

    def state_for_rows(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The exported per-row state reordered to ``rows`` (a fine-tune's training rows);
        refused when a row is missing (the splits differ)."""
        position = {int(r): i for i, r in enumerate(self.train_rows)}
        missing = [int(r) for r in rows if int(r) not in position]
        if missing and self.state:
            raise SplError(
                f"{self.run}: its {self.loss} state lacks {len(missing)} training rows of this "
                f"fine-tune (e.g. trainval row {missing[0]}); the splits differ"
            )
        order = [position[int(r)] for r in rows] if self.state else []
        return {name: tensor[order] for name, tensor in self.state.items()}


class LinearRun:
    """A finished ``fit-linear`` run directory, read back."""

    def __init__(self, path: Path, *, option: str = "the run") -> None:
        self.path = Path(path)
        self.config = read_config(self.path)
        if self.config.get("kind") != "linear":
            raise SplError(f"{option} {self.path} is not a fit-linear run directory")
        if not (self.path / "results.csv").exists() or (self.path / INCOMPLETE).exists():
            raise SplError(f"{option} {self.path} has not finished; resume it first")
        self.results = read_csv(self.path / "results.csv")
        self._heads: dict | None = None

    @property
    def feature_tag(self) -> str:
        return self.config["feature_tag"]

    @property
    def losses(self) -> list[str]:
        return list(dict.fromkeys(r["loss"] for r in self.results))

    def heads_file(self) -> dict:
        if self._heads is None:
            self._heads = load_torch(self.path / "heads.pt", "fit-linear heads file")
        return self._heads

    def select(self, loss: str | None = None, seed: int | None = None) -> LinearHead:
        """The head with the best val mAP for ``loss`` (any loss when None), among those of
        ``seed`` when it has any (else all seeds)."""
        from spl.evaluate.selection import best_row

        rows = [r for r in self.results if loss is None or r["loss"] == loss]
        if not rows:
            raise SplError(
                f"{self.path} has no {loss!r} heads (it trained {', '.join(self.losses)})"
            )
        same_seed = [r for r in rows if seed is None or int(r["seed"]) == seed] or rows
        return self.head(best_row(same_seed)["head"])

    def head(self, name: str) -> LinearHead:
        heads = self.heads_file()
        names = list(heads["names"])
        if name not in names:
            raise SplError(f"{self.path} has no head {name!r}; heads: {', '.join(names[:6])} ...")
        index = names.index(name)
        row = next(r for r in self.results if r["head"] == name)
        return LinearHead(
            run=self.path,
            name=name,
            loss=row["loss"],
            seed=int(row["seed"]),
            weight=heads["weight"][index],
            bias=heads["bias"][index],
            val_map=float(row["val_map"]),
            state=dict(heads["state"].get(name, {})),
            train_rows=heads["train_rows"].numpy(),
        )


# --------------------------------------------------------------------------- helpers


def new_run_dir(parent: Path, kind: str) -> Path:
    """``parent/<kind>-<UTC time>``; a clash gets a suffix, an earlier run is never reused."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        path = parent / (f"{kind}-{stamp}" + (f"-{attempt + 1}" if attempt else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        mark_incomplete(path, kind)
        return path
    raise SplError(f"cannot create a new run directory under {parent}")


def mark_incomplete(path: Path, kind: str) -> None:
    write_text_atomic(
        path / INCOMPLETE,
        "This run has not finished (interrupted, or still running).\n"
        f"Resume it:  spl {COMMANDS.get(kind, kind)} --resume {path}\n"
        f"Or remove it:  rm -r {path}\n",
    )


def mark_complete(path: Path) -> None:
    (path / INCOMPLETE).unlink(missing_ok=True)


def write_config(path: Path, config: dict) -> None:
    write_json_atomic(path / CONFIG, config)


def read_config(path: Path) -> dict:
    config_path = Path(path) / CONFIG
    if not config_path.is_file():
        raise SplError(f"{path} is not a run directory ({CONFIG} missing)")
    return json.loads(config_path.read_text())


def command_line() -> str:
    """The command that started this process, as `spl ...` (recorded in config.json)."""
    import shlex

    return shlex.join(["spl", *sys.argv[1:]])


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_torch(path: Path, obj) -> None:
    """torch.save through a temporary name: a kill mid-write keeps the previous file."""
    with atomic_path(path, force=True) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path, what: str):
    """torch.load with ``weights_only=True``: tensors and plain containers only, never code.
    A damaged file is reported, never half-used; a file holding code is named as such
    (torch's own message would advise loading it with weights_only=False: never that)."""
    if not Path(path).is_file():
        raise SplError(f"{path} not found ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        names = pickled_globals(Path(path))
        if names:
            raise SplError(
                f"{path} is not a {what}: it holds Python code or objects "
                f"({', '.join(names[:3])}), which spl never loads (it reads tensors only). "
                "Do not load it by other means unless you trust whoever made it"
            ) from None
        reason = str(exc).splitlines()[0] if not isinstance(exc, pickle.UnpicklingError) else ""
        raise SplError(
            f"{path} is corrupt or not a {what}" + (f" ({reason})" if reason else "")
        ) from None


def pickled_globals(path: Path) -> list[str]:
    """The callables or classes a pickle (or torch zip file) names, torch's and the
    standard containers' left out: what loading it without weights_only would import."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = Path(path).read_bytes()
        strings: list[str] = []
        names = []
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - unreadable: not a pickle of anything
        return []
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return list(dict.fromkeys(n for n in names if not n.startswith(safe)))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    write_text_atomic(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else value


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append history rows and fsync them: the history of finished epochs survives a kill."""
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def option_differences(saved: dict, given: dict) -> list[str]:
    """Options a user passed again with ``--resume`` that differ from the run's own."""
    out = []
    for key, value in given.items():
        if key in saved and _normal(saved[key]) != _normal(value):
            out.append(f"--{key.replace('_', '-')}: run has {saved[key]!r}, given {value!r}")
    return out


def _normal(value):
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return round(value, 12)
    return value
