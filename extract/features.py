"""The feature file ``ROOT/<name>/features/<tag>.h5`` (docs/architecture.md, contract 2).

One ``[N, D]`` array per source file of the prepared dataset, in its row order, so every
split and observed-label variant reuses it::

    attrs: format, format_version, tag, backbone, weights, weights_sha256, image_size,
           transform, dtype, feature_dim, dataset_name, dataset_fingerprint, versions, created
    trainval [N1, D]    features of the official training file
    test     [N2, D]
    bad/trainval, bad/test   int64 rows whose image could not be read (``--skip-bad``);
                             their feature rows are NaN and every later stage leaves them out

The ``[N, D]`` datasets are written contiguous and uncompressed, block by block into a
preallocated dataset (:class:`FeatureWriter`: memory bounded by a block, not by N), so
that a reader can memory-map them: ``np.memmap(path, dtype, "r", dataset.id.get_offset(),
shape)``. Files written before that (HDF5-chunked) read the same through h5py.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spl.data.common import SplError, atomic_path, plain
from spl.data.labels import row_blocks
from spl.data.prepared import SOURCES, PreparedDataset

FORMAT = "spl.features"
FORMAT_VERSION = 1
_TAG_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_tag(tag: str) -> str:
    if not _TAG_OK.match(tag):
        raise SplError(f"feature tag {tag!r} may hold only letters, digits, '.', '_', '+' and '-'")
    return tag


def feature_path(dataset_dir: Path | str, tag: str) -> Path:
    return Path(dataset_dir) / "features" / f"{check_tag(tag)}.h5"


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import torchvision

    from spl import __version__

    return {
        "spl": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "sklearn": sklearn.__version__,
    }


@dataclass
class FeatureSet:
    """Features of one prepared dataset, held in memory (float32 or float16 as stored)."""

    path: Path
    tag: str
    features: dict[str, np.ndarray]
    bad_rows: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features["trainval"].shape[1])


# Rows per write when a whole in-memory array is written (write_features, write_scores).
WRITE_BLOCK_ROWS = 1 << 14


class StageFileWriter:
    """An HDF5 file between stages, written without ever holding its large arrays.

    Each array of ``arrays`` (name -> (shape, dtype)) is preallocated **contiguous and
    uncompressed** (no HDF5 chunking, so a reader can memory-map it) and filled in row
    order, a block at a time (:meth:`append`); small datasets are written whole
    (:meth:`put`). The file is written under a temporary name
    (:func:`~spl.data.common.atomic_path`) and appears under ``path`` only when
    :meth:`finish` finds every row written; an error inside the ``with`` block (or leaving
    it without :meth:`finish`) removes the temporary, leaving any earlier file untouched.
    An existing ``path`` is refused unless ``force``.
    """

    def __init__(
        self,
        path: Path | str,
        arrays: dict[str, tuple[tuple[int, ...], np.dtype | str]],
        *,
        force: bool = False,
        what: str = "file",
    ) -> None:
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path, force=force, what=what))
        try:
            self._h5 = self._stack.enter_context(h5py.File(tmp, "w"))
            self._datasets = {}
            for name, (shape, dtype) in arrays.items():
                # no chunks, compression or maxshape: HDF5's contiguous layout
                self._datasets[name] = self._h5.create_dataset(name, shape=shape, dtype=dtype)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._filled = dict.fromkeys(arrays, 0)
        self._open = True

    def __enter__(self) -> StageFileWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.abort()
            raise RuntimeError(f"{self.path}: the writer was left without finish(); not written")
        self._open = False
        self._stack.__exit__(exc_type, exc, traceback)

    def append(self, name: str, block: np.ndarray) -> None:
        """Write ``block`` as the next rows of the array ``name`` (converted to its dtype
        as NumPy converts, so values are those of ``block.astype(dtype)``)."""
        dataset = self._datasets[name]
        block = np.ascontiguousarray(block, dtype=dataset.dtype)
        start = self._filled[name]
        stop = start + len(block)
        if block.shape[1:] != dataset.shape[1:] or stop > dataset.shape[0]:
            raise ValueError(
                f"{self.path}: a block of shape {block.shape} at row {start} does not fit "
                f"{name} {dataset.shape}"
            )
        if len(block):
            dataset.write_direct(block, dest_sel=np.s_[start:stop])
        self._filled[name] = stop

    def put(self, name: str, data: np.ndarray) -> None:
        """A small dataset, written whole."""
        self._h5.create_dataset(name, data=data)

    def finish(self, attrs: dict) -> Path:
        """Set the file's attributes, check every row of every array was written, close the
        file and give it its final name."""
        short = {
            name: f"{filled} of {self._datasets[name].shape[0]} rows"
            for name, filled in self._filled.items()
            if filled != self._datasets[name].shape[0]
        }
        if short:
            self.abort()
            raise ValueError(f"{self.path}: arrays not fully written ({short}); not written")
        self._h5.attrs.update(attrs)
        self._open = False
        self._stack.close()  # closes the HDF5 file, then renames it onto its final name
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        if self._open:
            self._open = False
            error = RuntimeError("aborted")
            self._stack.__exit__(RuntimeError, error, None)


class FeatureWriter:
    """A feature file written block by block (the layout: module docstring): ``rows`` per
    source file, ``dim`` features in ``dtype``. ``append(source, block)`` in row order,
    then ``finish(bad_rows, **attrs)``; used as a context manager, an error drops the file.
    The attributes given here and to ``finish`` (known only at the end, e.g. the dataset's
    fingerprint of an import) must hold tag, backbone, dataset_fingerprint and
    dataset_name."""

    def __init__(
        self,
        path: Path | str,
        rows: dict[str, int],
        dim: int,
        dtype: np.dtype | str,
        attrs: dict,
        *,
        force: bool = False,
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.dim = int(dim)
        self.attrs = dict(attrs)
        shapes = {src: ((int(rows[src]), self.dim), self.dtype) for src in SOURCES}
        self._file = StageFileWriter(path, shapes, force=force, what="feature file")
        self.path = self._file.path

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._file.__exit__(exc_type, exc, traceback)

    def append(self, source: str, block: np.ndarray) -> None:
        """The next rows of ``source``'s features."""
        self._file.append(source, block)

    def finish(self, bad_rows: dict[str, np.ndarray] | None = None, **attrs) -> Path:
        """Write the bad rows and the attributes (``attrs`` adds to those given first) and
        give the file its final name."""
        for src in SOURCES:
            self._file.put(f"bad/{src}", np.asarray((bad_rows or {}).get(src, []), np.int64))
        given = {**self.attrs, **attrs}
        try:
            _check_attrs(given)
        except ValueError:
            self._file.abort()
            raise
        return self._file.finish(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "feature_dim": self.dim,
                "dtype": str(self.dtype),
                "versions": json.dumps(library_versions()),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **{k: _attr(v) for k, v in given.items()},
            }
        )


def write_features(
    path: Path,
    features: dict[str, np.ndarray],
    attrs: dict,
    *,
    bad_rows: dict[str, np.ndarray] | None = None,
    force: bool = False,
) -> Path:
    """Write a complete feature file from arrays in memory, atomically (temporary name,
    then rename); :class:`FeatureWriter` writes one without holding the arrays."""
    _check_attrs(attrs)
    dims = {features[src].shape[1] for src in SOURCES}
    if len(dims) != 1:
        raise SplError(f"{path}: trainval and test features differ in dimension ({dims})")
    rows = {src: len(features[src]) for src in SOURCES}
    dtype = features["trainval"].dtype
    with FeatureWriter(path, rows, dims.pop(), dtype, attrs, force=force) as out:
        for src in SOURCES:
            for block in row_blocks(rows[src], WRITE_BLOCK_ROWS):
                out.append(src, features[src][block])
        out.finish(bad_rows)
    return path


def _check_attrs(attrs: dict) -> None:
    missing = {"tag", "backbone", "dataset_fingerprint", "dataset_name"} - set(attrs)
    if missing:
        raise ValueError(f"feature attrs lack {sorted(missing)}")


def _attr(value):
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    if value is None:
        return ""
    return value


def read_attrs(path: Path) -> dict:
    """A stage file's attributes as plain Python values."""
    with h5py.File(path, "r") as h5:
        return {k: plain(v) for k, v in h5.attrs.items()}


def open_stage_file(
    path: Path, prepared: PreparedDataset, *, fmt: str, kind: str, rebuild: str
) -> tuple[h5py.File, dict]:
    """Open a file between stages (features, scores) once it is known to exist, to be HDF5
    of format ``fmt`` and to have been made from ``prepared``; each refusal names the file
    and the command that rebuilds it. The caller closes the file."""
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.h5"))
        raise SplError(
            f"{path} not found; {kind} tags of {prepared.name}: "
            f"{', '.join(available) or 'none'}. Make it with `{rebuild}`"
        )
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise SplError(
            f"{path} is not a readable HDF5 file ({exc}); rebuild it: {rebuild}"
        ) from exc
    attrs = {k: plain(v) for k, v in h5.attrs.items()}
    problem = None
    if attrs.get("format") != fmt:
        problem = f"{path} is not an spl {kind} file"
    elif attrs.get("dataset_fingerprint") != prepared.fingerprint:
        problem = (
            f"{path} was made from another prepared dataset (fingerprint "
            f"{attrs.get('dataset_fingerprint')} of {attrs.get('dataset_name')!r}; "
            f"{prepared.path} has {prepared.fingerprint}). Rebuild it: `{rebuild} --force`"
        )
    if problem:
        h5.close()
        raise SplError(problem)
    return h5, attrs


def load_features(prepared: PreparedDataset, tag: str, *, check_finite: bool = True) -> FeatureSet:
    """Read a feature file and check it belongs to ``prepared`` (fingerprint, row counts)."""
    dataset_dir = prepared.path.parent
    path = feature_path(dataset_dir, tag)
    rebuild = f"spl extract {dataset_dir} --backbone ... (or spl import-features)"
    h5, attrs = open_stage_file(path, prepared, fmt=FORMAT, kind="feature", rebuild=rebuild)
    with h5:
        features = {src: h5[src][()] for src in SOURCES}
        bad = {src: h5[f"bad/{src}"][()] if f"bad/{src}" in h5 else np.zeros(0, np.int64)
               for src in SOURCES}  # fmt: skip
    for src in SOURCES:
        expected = len(prepared.images[src])
        if features[src].shape[0] != expected:
            raise SplError(
                f"{path}: {src} holds {features[src].shape[0]} rows, {prepared.path} has "
                f"{expected}; rebuild it: `{rebuild} --force`"
            )
        if check_finite:
            fix = f"re-extract them: `{rebuild} --force`"
            refuse_non_finite(path, prepared, src, [features[src]], bad[src], "features", fix)
    return FeatureSet(path=path, tag=tag, features=features, bad_rows=bad, attrs=attrs)


def refuse_non_finite(
    path: Path,
    prepared: PreparedDataset,
    source: str,
    arrays: list[np.ndarray],
    bad: np.ndarray,
    what: str,
    fix: str,
) -> None:
    """Refuse the rows of a stage file's ``source`` arrays (rows first) that hold a NaN or an
    infinite value, naming the first five by split; the rows recorded as bad are NaN on
    purpose."""
    finite = np.ones(len(arrays[0]), dtype=bool)
    for array in arrays:
        finite &= np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    finite[bad] = True
    if not finite.all():
        rows = np.nonzero(~finite)[0]
        named = ", ".join(split_row_name(prepared, source, r) for r in rows[:5])
        raise SplError(
            f"{path}: NaN or infinite {what} in {len(rows)} {source} rows ({named}); {fix}"
        )


def split_row_name(prepared: PreparedDataset, source: str, row: int) -> str:
    """Name a source-file row by its split too: 'val split row 3 (trainval row 17)'."""
    if source == "test":
        return f"test split row {row}"
    for split in ("train", "val"):
        position = np.searchsorted(prepared.split[split], row)
        if position < len(prepared.split[split]) and prepared.split[split][position] == row:
            return f"{split} split row {position} (trainval row {row})"
    return f"trainval row {row}"


def unreadable_rows(prepared: PreparedDataset, tag: str | None = None) -> dict[str, np.ndarray]:
    """The rows every training command leaves out: those whose image extraction could not
    read (``--skip-bad``), as the feature file ``tag`` records them. Without that file (a
    fine-tune whose backbone was never extracted), the rows any feature file of the
    dataset records. Sorted int64 per source file."""
    folder = prepared.path.parent / "features"
    files = [feature_path(prepared.path.parent, tag)] if tag is not None else []
    if not files or not files[0].is_file():
        files = sorted(folder.glob("*.h5"))
    out: dict[str, set[int]] = {source: set() for source in SOURCES}
    for path in files:
        try:
            with h5py.File(path, "r") as h5:
                if h5.attrs.get("dataset_fingerprint") != prepared.fingerprint:
                    continue  # made from another image list: its rows mean other images
                for source in SOURCES:
                    if f"bad/{source}" in h5:
                        out[source].update(int(r) for r in h5[f"bad/{source}"][()])
        except OSError:
            continue
    return {source: np.array(sorted(rows), dtype=np.int64) for source, rows in out.items()}
