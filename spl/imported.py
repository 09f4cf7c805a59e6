"""Users' own arrays: ``spl import-features`` (embeddings and labels as a prepared dataset
plus a feature file) and ``spl import-scores`` (a scores file for a prepared dataset).

Both read the user's files through :func:`load_user_array`: a ``.npy`` file (``numpy.save``)
holding one array of numbers; anything else (an empty file, a ``.npz`` archive, a CSV, an
object array) is refused, naming the file and what is expected. The arrays are
memory-mapped, never loaded whole: they are checked, converted and written a block of
about :data:`BLOCK_BYTES` at a time (OpenImages' 1.7 M x 2,048 features are 14 GB as
float32), straight into the feature or scores file (:class:`~spl.extract.features.FeatureWriter`,
:class:`~spl.extract.scores.ScoresWriter`).
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spl.data import labels as label_store
from spl.data.common import SplError, sha256_file
from spl.data.labels import CSR, row_blocks
from spl.data.prepared import (
    SOURCES,
    PreparedDataset,
    RawDataset,
    labels_path,
    load_prepared,
    write_prepared,
)
from spl.extract.features import FeatureWriter, check_tag, feature_path, split_row_name
from spl.extract.scores import IMPORTED, ScoresWriter, scores_path

# About how many bytes of a user's array (as float32) an import reads, checks and writes at
# once: the import's memory is a few such blocks, whatever the size of the arrays.
BLOCK_BYTES = 32 * 2**20
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NUMBERS = "fiub"  # numpy kinds: float, signed and unsigned integer, bool


# --- reading users' files ----------------------------------------------------------------


def load_user_array(path: Path | str, what: str, expected: str, ndim: int) -> np.ndarray:
    """The array of numbers a user's ``.npy`` file holds, with ``ndim`` dimensions,
    memory-mapped (read-only; nothing is read until used).

    Every refusal names the file, what is wrong with it and what is expected: ``what`` the
    file is for (e.g. "the test file's scores"), ``expected`` the array it should hold (e.g.
    "a float array of shape [80, 10] (rows, classes)")."""
    path = Path(path)
    want = f"expected {what}: a .npy file (numpy.save) holding {expected}"
    head = _head(path, want)
    if not head:
        raise SplError(f"{path} is empty (0 bytes); {want}")
    if head.startswith(_ZIP_MAGIC):
        raise SplError(f"{path} is a .npz archive ({_members(path)}), not a .npy file; {want}")
    if head != _NPY_MAGIC:
        raise SplError(
            f"{path} is not a .npy file (it starts with {head!r}: text, CSV or another "
            f"format?); {want}. Load it in Python and write it with numpy.save"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            raise SplError(
                f"{path} holds Python objects (an object array), not numbers; {want}"
            ) from exc
        raise SplError(f"{path} is a damaged .npy file ({exc}); {want}") from exc
    except (OSError, EOFError) as exc:
        raise SplError(f"{path} is a damaged or truncated .npy file ({exc}); {want}") from exc
    if array.dtype.kind not in _NUMBERS:
        raise SplError(f"{path} holds {array.dtype} values, not numbers; {want}")
    if array.ndim != ndim:
        raise SplError(f"{path} holds an array of shape {list(array.shape)}; {want}")
    return array


def _head(path: Path, want: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_NPY_MAGIC))
    except FileNotFoundError as exc:
        raise SplError(f"{path} not found; {want}") from exc
    except OSError as exc:
        raise SplError(f"cannot read {path} ({exc.strerror}); {want}") from exc


def _members(path: Path) -> str:
    """The arrays a .npz archive names, for the refusal."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
    except (OSError, zipfile.BadZipFile):
        return "unreadable"
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"arrays {listed}; save the one you mean with numpy.save" if names else "empty"


def _finite_rows(array: np.ndarray) -> np.ndarray:
    return np.isfinite(array.reshape(len(array), -1)).all(axis=1)


def _block_rows(array: np.ndarray) -> int:
    """Rows of ``array`` per block: about :data:`BLOCK_BYTES` as float32, at least one."""
    row_bytes = 4 * int(np.prod(array.shape[1:], dtype=np.int64))
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


@contextlib.contextmanager
def _no_new_empty_folders(*folders: Path) -> Iterator[None]:
    """On an error inside the block, remove those of ``folders`` (innermost first) that
    did not exist before it and are left empty: a refused import leaves nothing behind."""
    created = [folder for folder in folders if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()
        raise


# --- spl import-features -----------------------------------------------------------------


def import_arrays(
    dataset: Path,
    *,
    train_features: Path,
    train_labels: Path,
    test_features: Path,
    test_labels: Path,
    classes_file: Path | None = None,
    tag: str = "imported",
    num_pos: int = 1,
    num_neg: int = 0,
    seed: int = 1200,
    split_seed: int = 1200,
    expected_positives: float | None = None,
    force: bool = False,
):
    """Write ``dataset/labels.h5`` and ``dataset/features/<tag>.h5`` from four arrays.

    The arrays are memory-mapped and read once, a block at a time: each block of features
    is checked finite, converted to float32, hashed (for the stand-in image names) and
    written to the feature file under its temporary name, which gets its final name once
    ``labels.h5`` is written. Refusals leave neither file."""
    check_tag(tag)
    given = {
        "trainval": _UserArrays.open("trainval", Path(train_features), Path(train_labels)),
        "test": _UserArrays.open("test", Path(test_features), Path(test_labels)),
    }
    if given["trainval"].features.shape[1] != given["test"].features.shape[1]:
        raise SplError(f"{train_features} and {test_features} differ in feature dimension")
    if given["trainval"].labels.shape[1] != given["test"].labels.shape[1]:
        raise SplError(f"{train_labels} and {test_labels} differ in the number of classes")
    classes = _class_names(classes_file, given["trainval"].labels.shape[1])
    out = feature_path(dataset, tag)
    for path, what in ((out, "feature file"), (labels_path(dataset), "prepared dataset")):
        if path.exists() and not force:  # refused before reading the arrays
            raise SplError(f"{path} already exists; pass --force to replace this {what}")
    rows = {src: len(given[src].features) for src in SOURCES}
    dim = given["trainval"].features.shape[1]
    attrs = {"tag": tag, "backbone": "imported", "weights": str(train_features),
             "image_size": 0, "transform": {}}  # fmt: skip
    digest = hashlib.sha256()
    with (
        _no_new_empty_folders(out.parent, Path(dataset)),
        FeatureWriter(out, rows, dim, np.float32, attrs, force=force) as writer,
    ):
        labels = {}
        for src in SOURCES:
            given[src].write_features(writer, digest)
            labels[src] = given[src].checked_labels()
        # There are no image files: rows get stand-in names carrying a hash of the
        # features, so the fingerprint tells one import from another.
        stamp = digest.hexdigest()[:12]
        images = {
            src: [f"imported-{stamp}/{src}/{row:08d}" for row in range(rows[src])]
            for src in SOURCES
        }
        raw = RawDataset(
            name=Path(dataset).name,
            classes=classes,
            image_root=Path(dataset),
            images=images,
            labels=labels,
            expected_positives=expected_positives,
            source=f"imported from {train_features}, {test_features}",
        )
        sets = [(num_pos, num_neg, seed)]
        if (num_pos, num_neg) != (1, 1):
            sets.append((1, 1, seed))
        prepared = write_prepared(
            raw, labels_path(dataset), observed_sets=sets, split_seed=split_seed, force=force
        )
        writer.finish(
            weights_sha256=stamp,
            dataset_name=prepared.name,
            dataset_fingerprint=prepared.fingerprint,
        )
    return prepared, out


@dataclass
class _UserArrays:
    """One source file's features ``[N, D]`` and labels ``[N, L]``, memory-mapped."""

    source: str
    feature_path: Path
    label_path: Path
    features: np.ndarray
    labels: np.ndarray

    @classmethod
    def open(cls, source: str, feature_path: Path, label_path: Path) -> _UserArrays:
        which = "training" if source == "trainval" else "test"
        features = load_user_array(
            feature_path,
            f"the {which} features",
            "a float array of shape [N, D] (one row per image, D features)",
            ndim=2,
        )
        labels = load_user_array(
            label_path,
            f"the {which} labels",
            "a 0/1 array of shape [N, L] (one row per image, one column per class)",
            ndim=2,
        )
        if features.shape[0] != labels.shape[0]:
            raise SplError(
                f"{feature_path} has {features.shape[0]} rows but {label_path} has "
                f"{labels.shape[0]}"
            )
        return cls(source, feature_path, label_path, features, labels)

    def write_features(self, writer: FeatureWriter, digest) -> None:
        """Check, hash and write the features as float32, a block at a time; NaN or
        infinite rows are refused (the first five named)."""
        bad: list[int] = []
        for block in row_blocks(len(self.features), _block_rows(self.features)):
            values = np.ascontiguousarray(self.features[block], dtype=np.float32)
            finite = _finite_rows(values)
            if not finite.all():
                bad.extend((np.flatnonzero(~finite) + block.start).tolist())
                if len(bad) > 5:
                    break
            digest.update(values)
            writer.append(self.source, values)
        if bad:
            raise SplError(
                f"{self.feature_path}: NaN or infinite features in rows "
                f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}"
            )

    def checked_labels(self) -> np.ndarray | CSR:
        """The labels, refused unless 0/1: uint8 in memory, or as the CSR of their
        positives when a dense matrix would be stored sparse anyway (large)."""
        rows, columns = self.labels.shape
        sparse = rows * columns > label_store.SPARSE_THRESHOLD_BYTES
        counts, positions = [], []
        for block in row_blocks(rows, max(1, BLOCK_BYTES // max(columns, 1))):
            values = np.asarray(self.labels[block])
            valid = np.isin(values, (0, 1))
            if not valid.all():
                row = block.start + int(np.nonzero(~valid.all(axis=1))[0][0])
                raise SplError(f"{self.label_path}: labels must be 0/1 (row {row} is not)")
            if sparse:
                positive = values == 1
                counts.append(positive.sum(axis=1))
                positions.append(np.nonzero(positive)[1].astype(np.int32))
        if not sparse:
            return self.labels.astype(np.uint8)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        indices = np.concatenate(positions)
        return CSR(indptr, indices, np.ones(len(indices), np.int8), columns)


def _class_names(classes_file: Path | None, num_classes: int) -> list[str]:
    """The names in ``classes_file`` (one a line, one per label column), or class_0, ..."""
    if classes_file is None:
        return [f"class_{i}" for i in range(num_classes)]
    try:
        text = Path(classes_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SplError(
            f"cannot read class names from {classes_file} ({exc}); give a UTF-8 text file "
            "with one class name a line"
        ) from exc
    classes = [c.strip() for c in text.splitlines() if c.strip()]
    if len(classes) != num_classes:
        raise SplError(f"{classes_file} names {len(classes)} classes; labels have {num_classes}")
    return classes


# --- spl import-scores -------------------------------------------------------------------


def import_scores(
    dataset_dir: Path | str,
    *,
    train: Path,
    test: Path,
    train_tiles: Path | None = None,
    test_tiles: Path | None = None,
    tag: str = IMPORTED,
    force: bool = False,
) -> Path:
    """Write ``scores/<tag>.h5`` from scores computed elsewhere: ``train`` ``[N1, L]`` for
    the prepared dataset's ``trainval`` rows (train and val splits), ``test`` ``[N2, L]``,
    in its row order; optionally their tiles ``[N, g*g, L]``. Shapes are checked against
    the dataset; NaN or infinite values are refused, naming the file and row. The arrays are
    memory-mapped and written a block at a time (float32)."""
    check_tag(tag)
    prepared = load_prepared(dataset_dir)
    if (train_tiles is None) != (test_tiles is None):
        raise SplError("give tiles for both files (--train-tiles and --test-tiles) or neither")
    final = scores_path(prepared.path.parent, tag)
    if final.exists() and not force:
        raise SplError(f"{final} already exists; pass --force to replace this scores file")
    files = {"trainval": Path(train), "test": Path(test)}
    tile_files = {"trainval": Path(train_tiles), "test": Path(test_tiles)} if train_tiles else {}
    scores, tiles = {}, {}
    for src in SOURCES:
        scores[src] = _scores_array(files[src], prepared, src)
        if tile_files:
            tiles[src] = _tiles_array(tile_files[src], prepared, src)
    grids = {int(round(np.sqrt(array.shape[1]))) for array in tiles.values()}
    if len(grids) > 1:
        raise SplError(f"{tile_files['trainval']} and {tile_files['test']} differ in tiles")
    sources = {
        src: {"file": str(path), "sha256": sha256_file(path)}
        for src, path in [*files.items(), *((f"tiles/{s}", p) for s, p in tile_files.items())]
    }
    attrs = {
        "tag": tag,
        "scorer": IMPORTED,
        "weights": "",
        "weights_sha256": "",
        "weights_source": "",
        "prompt": "",
        "classes": list(prepared.classes),
        "class_names": list(prepared.classes),
        "grid": grids.pop() if grids else 0,
        "image_size": 0,
        "normalize": "",
        "imported_from": sources,
        "dataset_name": prepared.name,
        "dataset_fingerprint": prepared.fingerprint,
    }
    rows = {src: len(scores[src]) for src in SOURCES}
    with (
        _no_new_empty_folders(final.parent),
        ScoresWriter(
            final, rows, prepared.num_classes, attrs, tiles=bool(tiles), force=force
        ) as writer,
    ):
        for src in SOURCES:
            given = [(files[src], scores[src])]
            if tiles:
                given.append((tile_files[src], tiles[src]))
            _write_checked(writer, prepared, src, given)
        return writer.finish()


def _write_checked(
    writer: ScoresWriter,
    prepared: PreparedDataset,
    source: str,
    given: list[tuple[Path, np.ndarray]],
) -> None:
    """Write ``source``'s scores (and tiles), row-aligned arrays from the files ``given``,
    as float32 a block at a time; NaN or infinite rows are refused, the scores' before the
    tiles', naming the first three rows and counting the rest."""
    bad: dict[Path, list[int]] = {path: [] for path, _ in given}
    count = dict.fromkeys(bad, 0)
    step = min(_block_rows(array) for _, array in given)
    for block in row_blocks(len(given[0][1]), step):
        values = [np.ascontiguousarray(array[block], dtype=np.float32) for _, array in given]
        for (path, _), value in zip(given, values, strict=True):
            rows = np.flatnonzero(~_finite_rows(value)) + block.start
            bad[path].extend(rows[: 3 - len(bad[path])].tolist())
            count[path] += len(rows)
        writer.append(source, *values)
    for path, rows in bad.items():
        if rows:
            listed = ", ".join(_file_row(prepared, source, r) for r in rows)
            more = f" and {count[path] - 3} more" if count[path] > 3 else ""
            raise SplError(f"{path}: NaN or infinite scores in {listed}{more}")


_SOURCE_NAMES = {"trainval": "the trainval file (train and val splits)", "test": "the test file"}
_SHAPE = {"trainval": "the rows of the trainval file", "test": "the rows of the test file"}


def _scores_array(path: Path, prepared: PreparedDataset, source: str) -> np.ndarray:
    """A ``[rows, classes]`` .npy of scores for ``source`` (memory-mapped, shape checked)."""
    rows, classes = len(prepared.images[source]), prepared.num_classes
    expected = f"a float array of shape [{rows}, {classes}] ({_SHAPE[source]}, classes)"
    array = load_user_array(path, f"the {source} scores", expected, ndim=2)
    return _checked_scores(path, array, prepared, source)


def _tiles_array(path: Path, prepared: PreparedDataset, source: str) -> np.ndarray:
    """A ``[rows, g*g, classes]`` .npy of tile scores for ``source`` (memory-mapped, shape
    checked)."""
    rows, classes = len(prepared.images[source]), prepared.num_classes
    expected = (
        f"a float array of shape [{rows}, g*g, {classes}] ({_SHAPE[source]}, tiles row by "
        "row, classes)"
    )
    array = _checked_scores(
        path, load_user_array(path, f"the {source} tile scores", expected, ndim=3), prepared, source
    )
    grid = int(round(np.sqrt(array.shape[1])))
    if grid < 1 or grid * grid != array.shape[1]:
        raise SplError(
            f"{path}: {array.shape[1]} tiles per image is not a square grid (g*g tiles, row by row)"
        )
    return array


def _checked_scores(
    path: Path, array: np.ndarray, prepared: PreparedDataset, source: str
) -> np.ndarray:
    """``array`` if it has the dataset's rows and classes and holds numbers (not bool)."""
    rows, classes = len(prepared.images[source]), prepared.num_classes
    if array.shape[0] != rows:
        raise SplError(
            f"{path} holds {array.shape[0]} rows; {prepared.path} has {rows} in "
            f"{_SOURCE_NAMES[source]}, in whose row order the scores go"
        )
    if array.shape[-1] != classes:
        raise SplError(
            f"{path} holds scores for {array.shape[-1]} classes; {prepared.path} has "
            f"{classes} ({', '.join(prepared.classes[:5])}{', ...' if classes > 5 else ''})"
        )
    if array.dtype.kind == "b":
        raise SplError(f"{path}: scores must be numbers, got {array.dtype}")
    return array


def _file_row(prepared: PreparedDataset, source: str, row: int) -> str:
    """'row 17 (val split row 3)': the row of the user's file, and the split it falls in."""
    if source == "test":
        return f"row {row}"
    return f"row {row} ({split_row_name(prepared, source, row).split(' (')[0]})"
