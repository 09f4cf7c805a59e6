"""Run directories (design.md contracts 3 and 4): created once, never overwritten, marked
incomplete until their results are written, resumable from their checkpoint."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import sys
from pathlib import Path

import torch

from spl.data.common import SplError, atomic_path, write_json_atomic, write_text_atomic

INCOMPLETE = "INCOMPLETE"
CONFIG = "config.json"


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
    command = "fit-linear" if kind == "linear" else kind
    write_text_atomic(
        path / INCOMPLETE,
        "This run has not finished (interrupted, or still running).\n"
        f"Resume it:  spl {command} --resume {path}\n"
        f"Or remove it:  rm -r {path}\n",
    )


def mark_complete(path: Path) -> None:
    (path / INCOMPLETE).unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    return (path / CONFIG).is_file() and not (path / INCOMPLETE).exists()


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
    """torch.load with ``weights_only=True``; a damaged file is reported, never half-used."""
    if not Path(path).is_file():
        raise SplError(f"{path} not found ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise SplError(f"{path} is corrupt or not a {what} ({type(exc).__name__}: {exc})") from exc


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
