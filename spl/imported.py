"""Users' own arrays: ``spl import-features`` (embeddings and labels as a prepared dataset
plus a feature file) and ``spl import-scores`` (a scores file for a prepared dataset).

Both read the user's files through :func:`load_user_array`: a ``.npy`` file (``numpy.save``)
holding one array of numbers; anything else (an empty file, a ``.npz`` archive, a CSV, an
object array) is refused, naming the file and what is expected.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from spl.data.common import SplError, sha256_file
from spl.data.prepared import SOURCES, PreparedDataset, RawDataset, load_prepared, write_prepared
from spl.extract.features import check_tag, feature_path, split_row_name, write_features
from spl.extract.scores import IMPORTED, scores_path, write_scores

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NUMBERS = "fiub"  # numpy kinds: float, signed and unsigned integer, bool


# --- reading users' files ----------------------------------------------------------------


def load_user_array(path: Path | str, what: str, expected: str, ndim: int) -> np.ndarray:
    """The array of numbers a user's ``.npy`` file holds, with ``ndim`` dimensions.

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
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
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
    """Write ``dataset/labels.h5`` and ``dataset/features/<tag>.h5`` from four arrays."""
    check_tag(tag)
    features, labels = {}, {}
    for src, feat_path, label_path in (
        ("trainval", train_features, train_labels),
        ("test", test_features, test_labels),
    ):
        features[src], labels[src] = _features_and_labels(src, Path(feat_path), Path(label_path))
    if features["trainval"].shape[1] != features["test"].shape[1]:
        raise SplError(f"{train_features} and {test_features} differ in feature dimension")
    if labels["trainval"].shape[1] != labels["test"].shape[1]:
        raise SplError(f"{train_labels} and {test_labels} differ in the number of classes")
    classes = _class_names(classes_file, labels["trainval"].shape[1])
    stamp, images = _stand_in_images(features, labels)
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
    out = feature_path(dataset, tag)
    if out.exists() and not force:
        raise SplError(f"{out} already exists; pass --force to replace it")
    prepared = write_prepared(
        raw, Path(dataset) / "labels.h5", observed_sets=sets, split_seed=split_seed, force=force
    )
    attrs = {
        "tag": tag,
        "backbone": "imported",
        "weights": str(train_features),
        "weights_sha256": stamp,
        "image_size": 0,
        "transform": {},
        "dataset_name": prepared.name,
        "dataset_fingerprint": prepared.fingerprint,
    }
    write_features(out, features, attrs, force=force)
    return prepared, out


def _features_and_labels(source: str, feat_path: Path, label_path: Path):
    """One source file's features (float32, finite) and labels (0/1, uint8), row for row."""
    which = "training" if source == "trainval" else "test"
    feats = load_user_array(
        feat_path,
        f"the {which} features",
        "a float array of shape [N, D] (one row per image, D features)",
        ndim=2,
    )
    labs = load_user_array(
        label_path,
        f"the {which} labels",
        "a 0/1 array of shape [N, L] (one row per image, one column per class)",
        ndim=2,
    )
    if feats.shape[0] != labs.shape[0]:
        raise SplError(
            f"{feat_path} has {feats.shape[0]} rows but {label_path} has {labs.shape[0]}"
        )
    finite = _finite_rows(feats)
    if not finite.all():
        rows = np.nonzero(~finite)[0]
        raise SplError(
            f"{feat_path}: NaN or infinite features in rows {', '.join(map(str, rows[:5]))}"
            f"{' ...' if len(rows) > 5 else ''}"
        )
    if not np.isin(labs, (0, 1)).all():
        row = int(np.nonzero(~np.isin(labs, (0, 1)).all(axis=1))[0][0])
        raise SplError(f"{label_path}: labels must be 0/1 (row {row} is not)")
    return np.ascontiguousarray(feats, dtype=np.float32), labs.astype(np.uint8)


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


def _stand_in_images(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]):
    """There are no image files: rows get stand-in names carrying a hash of the features, so
    the fingerprint tells one import from another. Returns the hash and the names."""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(features[src].tobytes())
    stamp = digest.hexdigest()[:12]
    images = {
        src: [f"imported-{stamp}/{src}/{row:08d}" for row in range(len(labels[src]))]
        for src in SOURCES
    }
    return stamp, images


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
    the dataset; NaN or infinite values are refused, naming the file and row."""
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
    return write_scores(final, scores, attrs, tiles=tiles or None, force=force)


_SOURCE_NAMES = {"trainval": "the trainval file (train and val splits)", "test": "the test file"}
_SHAPE = {"trainval": "the rows of the trainval file", "test": "the rows of the test file"}


def _scores_array(path: Path, prepared: PreparedDataset, source: str) -> np.ndarray:
    """A ``[rows, classes]`` .npy of scores for ``source``, finite, as float32."""
    rows, classes = len(prepared.images[source]), prepared.num_classes
    expected = f"a float array of shape [{rows}, {classes}] ({_SHAPE[source]}, classes)"
    array = load_user_array(path, f"the {source} scores", expected, ndim=2)
    return _checked_scores(path, array, prepared, source)


def _tiles_array(path: Path, prepared: PreparedDataset, source: str) -> np.ndarray:
    """A ``[rows, g*g, classes]`` .npy of tile scores for ``source``, finite, as float32."""
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
    """Scores with the dataset's rows and classes, numbers (not bool), finite; as float32."""
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
    finite = _finite_rows(array)
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        listed = ", ".join(_file_row(prepared, source, r) for r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SplError(f"{path}: NaN or infinite scores in {listed}{more}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _file_row(prepared: PreparedDataset, source: str, row: int) -> str:
    """'row 17 (val split row 3)': the row of the user's file, and the split it falls in."""
    if source == "test":
        return f"row {row}"
    return f"row {row} ({split_row_name(prepared, source, row).split(' (')[0]})"
