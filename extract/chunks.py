"""The partial folder of a chunked pass: the plan of chunks, the settings manifest, one file
per finished chunk, and the assembly of the chunks in row order (one chunk in memory at a
time: the writer streams them into the final file).

Rows are cut into chunks of ``chunk_size`` rows per source file. A finished chunk is one
``.npz`` in ``<folder>/.<tag>.partial/`` (temporary name, then rename: a killed run leaves
only whole chunks), beside ``manifest.json``, the settings of the run; a rerun with the same
settings computes only the missing chunks, one with other settings is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spl.data.common import SplError, atomic_path, remove_stale_temporaries, write_json_atomic
from spl.data.prepared import SOURCES, PreparedDataset

DEFAULT_CHUNK_SIZE = 512  # a multiple of the default batch sizes; VOC gives 8 GPUs 3 chunks each
PARTIAL_FORMAT = "spl.features.partial"
MANIFEST = "manifest.json"
_CHUNK_KEYS = ("bad", "errors")  # what a chunk file holds besides the arrays

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Chunk:
    source: str
    number: int
    start: int
    stop: int
    offset: int  # index of row `start` in the flat list of all images

    @property
    def name(self) -> str:
        return f"{self.source}-{self.number:06d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_chunks(counts: dict[str, int], chunk_size: int) -> list[Chunk]:
    """The chunks of every source file, in row order (trainval, then test)."""
    chunks, offset = [], 0
    for source in SOURCES:
        for number, start in enumerate(range(0, counts[source], chunk_size)):
            stop = min(start + chunk_size, counts[source])
            chunks.append(Chunk(source, number, start, stop, offset + start))
        offset += counts[source]
    return chunks


class RowNames:
    """Names an image by its index in :func:`spl.extract.images.image_paths`: 'val split
    row 3 (trainval row 17)'."""

    def __init__(self, prepared: PreparedDataset) -> None:
        self.prepared = prepared
        self.trainval = len(prepared.images["trainval"])

    def __call__(self, index: int) -> str:
        from spl.extract.features import split_row_name

        if index < self.trainval:
            return split_row_name(self.prepared, "trainval", index)
        return split_row_name(self.prepared, "test", index - self.trainval)


def open_partial(partial: Path, settings: dict, chunk_size: int | None, force: bool) -> None:
    """Create or check the partial folder's manifest (rank 0, before the others look)."""
    manifest_path = partial / MANIFEST
    settings = json.loads(json.dumps(settings))  # as the manifest gives them back: tuples as lists
    if force and partial.exists():
        shutil.rmtree(partial)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differ = [k for k in settings if manifest["settings"].get(k) != settings[k]]
        if chunk_size is not None and chunk_size != manifest["chunk_size"]:
            differ.append("chunk_size")
        if differ:
            was = {k: manifest["settings"].get(k, manifest.get(k)) for k in differ}
            raise SplError(
                f"{partial} holds an unfinished extraction with other settings ({was}); "
                "rerun with those settings to resume it, or pass --force to start over"
            )
        remove_stale_temporaries(partial)  # chunks a killed run was writing
        return
    partial.mkdir(parents=True, exist_ok=True)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    manifest = {"format": PARTIAL_FORMAT, "chunk_size": chunk_size, "settings": settings}
    write_json_atomic(manifest_path, manifest)


def read_chunk_size(partial: Path) -> int:
    return int(json.loads((partial / MANIFEST).read_text())["chunk_size"])


def finished_chunks(partial: Path) -> set[str]:
    """The names of the chunks already in the partial folder."""
    return {p.name.removesuffix(".npz") for p in partial.glob("*.npz")}


def save_chunk(path: Path, arrays: Arrays, bad: np.ndarray, errors: list[str]) -> None:
    """Write one finished chunk under a temporary name, then rename: whole or absent."""
    with atomic_path(path, force=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays, bad=bad, errors=np.array(errors, dtype=str))
        handle.flush()
        os.fsync(handle.fileno())


def check_finite(
    computed: np.ndarray,
    stored: np.ndarray,
    bad: list[int],
    name: Callable[[int], str],
    what: str,
) -> None:
    """Refuse NaN or infinite rows (rows recorded as bad are NaN on purpose); ``what`` says
    who gave them, e.g. 'the backbone gave NaN or infinite features'."""
    finite = np.isfinite(stored.reshape(len(stored), -1)).all(axis=1)
    finite[bad] = True
    if finite.all():
        return
    rows = np.nonzero(~finite)[0]
    listed = ", ".join(name(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    if np.isfinite(computed[rows]).all():
        hint = f"their values overflow {stored.dtype}; use --dtype float32"
    else:
        hint = "the weights or these images are broken"
    raise SplError(f"{what} for {len(rows)} images ({listed}): {hint}")


def _read_chunk(
    path: Path, chunk: Chunk, *, arrays: bool = True
) -> tuple[Arrays, np.ndarray, np.ndarray]:
    """A chunk file's arrays (none unless ``arrays``: the bad rows alone are read), bad
    rows and their errors; a damaged file is removed (the rerun redoes it) and refused."""
    try:
        with np.load(path) as npz:
            names = [k for k in npz.files if k not in _CHUNK_KEYS]
            blocks = {k: npz[k] for k in names} if arrays else {}
            rows, errors = npz["bad"], npz["errors"]
        if not names:
            raise ValueError("no arrays")
        for block in blocks.values():
            if block.shape[0] != chunk.rows:
                raise ValueError(f"{block.shape[0]} rows, not {chunk.rows}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        path.unlink()
        raise SplError(f"{path} is damaged ({exc}); removed it: rerun to redo it") from exc
    return blocks, rows, errors


@dataclass
class Assembly:
    """What a pass's writer gets from a complete partial folder: the shape (rows first) and
    dtype of every stored array by name, per source file; the bad rows of each source file;
    and the chunks' arrays in row order (:meth:`blocks`), read one chunk at a time, so that
    the file is written in memory bounded by a chunk, not by the number of rows."""

    shapes: dict[str, dict[str, tuple[int, ...]]]
    dtypes: dict[str, np.dtype]
    bad_rows: dict[str, np.ndarray]
    partial: Path
    chunks: list[Chunk]

    def blocks(self) -> Iterator[tuple[str, Arrays]]:
        """(source file, arrays by name) of each chunk, in row order; a chunk whose arrays
        differ from the first chunk's is damaged (removed and refused, as a broken file)."""
        for chunk in self.chunks:
            path = self.partial / f"{chunk.name}.npz"
            blocks, _, _ = _read_chunk(path, chunk)
            for key, block in blocks.items():
                if key not in self.shapes or block.shape[1:] != self.shapes[key][chunk.source][1:]:
                    path.unlink()
                    raise SplError(
                        f"{path} is damaged (its {key} do not match the other chunks'); "
                        "removed it: rerun to redo it"
                    )
            yield chunk.source, blocks
            del blocks  # before reading the next chunk


def assemble(
    partial: Path,
    chunks: list[Chunk],
    counts: dict[str, int],
    name: Callable[[int], str],
    write: Callable[[Assembly], None],
) -> dict[str, list[tuple[int, str]]]:
    """Have ``write`` write the file from the chunks in row order (an :class:`Assembly`:
    every array's shape, the bad rows of each source file, the chunks one at a time), then
    drop the partial folder. Returns the bad rows of each source file with their errors."""
    missing = [c.name for c in chunks if not (partial / f"{c.name}.npz").is_file()]
    if missing:
        raise SplError(f"{partial} lacks chunks {missing[:5]}; rerun to compute them")
    bad_rows: dict[str, list[int]] = {src: [] for src in SOURCES}
    bad: dict[str, list[tuple[int, str]]] = {}
    for chunk in chunks:
        _, rows, errors = _read_chunk(partial / f"{chunk.name}.npz", chunk, arrays=False)
        for row, error in zip(rows.tolist(), errors.tolist(), strict=True):
            bad_rows[chunk.source].append(chunk.start + row)
            bad.setdefault(chunk.source, []).append(
                (chunk.start + row, f"{name(chunk.offset + row)}: {error}")
            )
    shapes, dtypes = _shapes(partial, chunks, counts)
    rows = {src: np.asarray(rows, np.int64) for src, rows in bad_rows.items()}
    write(Assembly(shapes, dtypes, rows, partial, chunks))
    shutil.rmtree(partial)
    return bad


def _shapes(
    partial: Path, chunks: list[Chunk], counts: dict[str, int]
) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, np.dtype]]:
    """Every array's shape per source file and its dtype, from each file's first chunk."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    dtypes: dict[str, np.dtype] = {}
    for source in SOURCES:
        first = next((c for c in chunks if c.source == source), None)
        if first is None:
            continue
        blocks, _, _ = _read_chunk(partial / f"{first.name}.npz", first)
        for key, block in blocks.items():
            shapes.setdefault(key, {})[source] = (counts[source], *block.shape[1:])
            dtypes.setdefault(key, block.dtype)
    return shapes, dtypes
