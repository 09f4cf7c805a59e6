"""Pieces every stage shares: the user-facing error, atomic writes, fingerprints, safe paths."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath


class SplError(Exception):
    """Bad input or a refused operation; the message names the file or row and the fix.

    The command line prints it without a traceback. Raised inside a DataLoader worker, it
    comes back to the main process as ``type(exc)(text)`` with torch's "Caught ... in
    DataLoader worker process N. Original Traceback ..." around the original line: the
    constructor keeps only that line, so the user still reads one message.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(_unwrap_worker_text(type(self), str(message)))


def _unwrap_worker_text(cls: type, text: str) -> str:
    """The original message inside torch's worker re-raise text (``text`` itself if none)."""
    if not text.startswith(f"Caught {cls.__name__} ") or "\nOriginal Traceback" not in text:
        return text
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].rstrip("\n") if at >= 0 else text


# A write in progress is ``.<name>.tmp-<host>-<pid>`` beside its final file: the writer's
# host and process id tell a live writer's file from a killed one's leftover.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>.*)-)?(?P<pid>[0-9]+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temporary_path(final: Path | str) -> Path:
    """This process's temporary name for ``final``: ``.<name>.tmp-<host>-<pid>`` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{_host()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temporaries(folder: Path | str, name: str | None = None) -> list[Path]:
    """Remove the temporaries of writes that were killed: files ``.<name>.tmp-<host>-<pid>``
    in ``folder`` (of the final file ``name`` only, or of any) written on this machine by a
    process that no longer runs. A live writer's file, or one from another machine (whose
    processes this one cannot see), is kept. Returns the removed paths."""
    folder = Path(folder)
    pattern = f".{glob.escape(name)}.tmp-*" if name is not None else ".*.tmp-*"
    removed = []
    host, me = _host(), os.getpid()
    for path in folder.glob(pattern):
        match = _TEMPORARY.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        # no host: an older spl's name (``.<name>.tmp-<pid>``), written on this machine
        if match["host"] not in (None, host) or pid == me or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(final: Path | str, *, force: bool = False, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    An exception leaves ``final`` untouched (and removes the temporary), so a reader never
    sees a half-written file. A killed process cannot remove its temporary: every write
    first removes the leftovers of killed writes of the same file
    (:func:`remove_stale_temporaries`). An existing ``final`` is refused unless ``force``.
    """
    final = Path(final)
    if final.exists() and not force:
        raise SplError(f"{final} already exists; pass --force to replace this {what}")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = temporary_path(final)
    if tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write a small text file through a temporary name (replacing any earlier one)."""
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path | str, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_strings(*groups: Iterable[str]) -> str:
    """A short stable hash of ordered string lists (image lists, class names)."""
    digest = hashlib.sha256()
    for group in groups:
        for item in group:
            digest.update(item.encode("utf-8"))
            digest.update(b"\0")
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def plain(value):
    """An HDF5 attribute as a plain Python value (JSON-serialisable)."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def safe_relative(path: str, where: str) -> str:
    """Normalise an image path relative to its image root; refuse one that escapes it.

    ``where`` names the file and row the path came from, for the error message.
    """
    text = path.replace("\\", "/").strip()
    posix = PurePosixPath(text)
    if not text or posix.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise SplError(
            f"{where}: image path {path!r} must be relative to the image root "
            "(absolute paths are refused)"
        )
    parts = [p for p in posix.parts if p not in ("", ".")]
    if ".." in parts:
        raise SplError(
            f"{where}: image path {path!r} escapes the image root ('..' is refused); "
            "give paths inside the image folder"
        )
    return "/".join(parts)
