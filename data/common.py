"""Pieces every stage shares: the user-facing error, atomic writes, fingerprints, safe paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


@contextlib.contextmanager
def atomic_path(final: Path | str, *, force: bool = False, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A crash or exception leaves ``final`` untouched (and removes the temporary), so a reader
    never sees a half-written file. An existing ``final`` is refused unless ``force``.
    """
    final = Path(final)
    if final.exists() and not force:
        raise SplError(f"{final} already exists; pass --force to replace this {what}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
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
