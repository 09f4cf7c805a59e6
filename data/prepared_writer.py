"""Writing the prepared dataset file ``ROOT/<name>/labels.h5`` (its layout:
:mod:`spl.data.prepared`, which reads it): a raw dataset split, its observed labels drawn
and the file written atomically (:func:`write_prepared`); an observed-label set added to
an existing file (:func:`add_observed_set`). Both are importable from
:mod:`spl.data.prepared` too.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spl.data import bias as biased
from spl.data import labels as label_store
from spl.data.common import SplError, atomic_path, fingerprint_strings
from spl.data.labels import CSR, SparseRows, write_csr
from spl.data.prepared import (
    FORMAT,
    SOURCES,
    STORAGES,
    VERIFIED,
    PreparedDataset,
    RawDataset,
    labels_path,
    load_prepared,
)
from spl.data.protocol import BIASES, NUM_NEGATIVES, NUM_POSITIVES
from spl.data.sampling import (
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    check_fraction,
    check_observed_counts,
    observe_uniform,
    observe_uniform_csr,
    observed_set_name,
    split_train_val,
)


def image_fingerprint(classes: list[str], images: dict[str, list[str] | np.ndarray]) -> str:
    """Identifies the image list: a feature file made from another list is refused."""
    return fingerprint_strings(classes, list(images["trainval"]), list(images["test"]))


def choose_layout(storage: str, shapes: list[tuple[int, int]]) -> str:
    """``dense`` or ``sparse`` for a file whose label matrices have ``shapes``: ``auto``
    goes sparse once one dense matrix would pass the threshold (a byte an entry)."""
    if storage not in STORAGES:
        raise SplError(f"label storage must be one of {', '.join(STORAGES)}; got {storage!r}")
    if storage != "auto":
        return storage
    largest = max(rows * columns for rows, columns in shapes)
    return "sparse" if largest > label_store.SPARSE_THRESHOLD_BYTES else "dense"


def write_prepared(
    raw: RawDataset,
    out_path: Path,
    *,
    observed_sets: list[tuple[int, int, int]] | None = None,
    split_seed: int = DEFAULT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    drop_unlabeled: bool = False,
    force: bool = False,
    storage: str = "auto",
) -> PreparedDataset:
    """Split, sample the observed labels and write ``labels.h5`` atomically.

    ``storage`` is ``auto`` (sparse above the size threshold), ``dense`` or ``sparse``.
    Options are checked before anything is written, so a bad one leaves no file behind.
    """
    if observed_sets is None:
        observed_sets = [(1, 0, DEFAULT_SEED), (1, 1, DEFAULT_SEED)]
    for num_pos, num_neg, _ in observed_sets:
        check_observed_counts(num_pos, num_neg)
    check_fraction(val_fraction, "--val-fraction")
    layout = choose_layout(storage, [raw.labels[src].shape for src in SOURCES])
    kept = _kept_rows(raw, layout, drop_unlabeled)
    train_rows, val_rows = _train_val_rows(
        raw.name, len(kept.images["trainval"]), val_fraction, split_seed
    )
    expected = raw.expected_positives
    if expected is None:
        # No published k: use the training file's mean positive count (a peek at the full
        # labels that the paper's k values also took; for a partially labelled dataset the
        # verified positives, a lower bound); override with --expected-positives.
        expected = float(_positives_per_row(kept.labels["trainval"]).mean())
    out_path = Path(out_path)
    attrs = {
        "format": FORMAT,
        "format_version": 1 if layout == "dense" and not raw.partial else 2,
        "name": raw.name,
        "image_root": _stored_root(Path(raw.image_root), out_path.parent),
        "source": raw.source,
        "expected_positives": float(expected),
        "split_seed": int(split_seed),
        "val_fraction": float(val_fraction),
        "fingerprint": image_fingerprint(raw.classes, kept.images),
        "dropped_unlabeled": kept.dropped_unlabeled,
        "dropped": json.dumps(kept.dropped),
        "label_layout": layout,
        "partial_labels": bool(raw.partial),
        "spl_version": _spl_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(out_path, force=force, what="prepared dataset") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(attrs)
            _write_rows(h5, raw, kept, layout, (train_rows, val_rows))
            _write_uniform_sets(h5, kept.labels, raw.partial, observed_sets, layout)
    return load_prepared(out_path.parent)


@dataclass
class _KeptRows:
    """The rows a prepared file holds, per source file: image paths and labels (in the
    form the draws work on), and the images left out, per reason."""

    images: dict[str, list[str]]
    labels: dict[str, np.ndarray | CSR]
    dropped: dict[str, dict[str, int]]
    dropped_unlabeled: int  # every image left out, the reader's and ours


def _kept_rows(raw: RawDataset, layout: str, drop_unlabeled: bool) -> _KeptRows:
    """The raw rows, less those without a positive when ``drop_unlabeled``; a source file
    left with no image is refused."""
    images = {src: list(raw.images[src]) for src in SOURCES}
    labels = {src: _label_matrix(raw.labels[src], raw.partial, layout) for src in SOURCES}
    dropped = {src: dict(raw.dropped.get(src, {})) for src in SOURCES}
    dropped_unlabeled = sum(sum(reasons.values()) for reasons in raw.dropped.values())
    if drop_unlabeled:
        for src in SOURCES:
            keep = _positives_per_row(labels[src]) > 0
            count = int((~keep).sum())
            dropped_unlabeled += count
            dropped[src]["no positive"] = dropped[src].get("no positive", 0) + count
            images[src] = [p for p, k in zip(images[src], keep, strict=True) if k]
            labels[src] = _take_rows(labels[src], np.flatnonzero(keep))
    for src in SOURCES:
        if len(images[src]) == 0:
            raise SplError(f"{raw.name}: the {src} file has no images after reading {raw.source}")
    return _KeptRows(images, labels, dropped, dropped_unlabeled)


def _train_val_rows(
    name: str, count: int, val_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The train/val split of ``count`` training-file rows; refused when either is empty."""
    train_rows, val_rows = split_train_val(count, val_fraction, split_seed)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise SplError(
            f"{name}: {count} training images are too few for a "
            f"train/val split with val fraction {val_fraction}"
        )
    return train_rows, val_rows


def _write_rows(
    h5: h5py.File,
    raw: RawDataset,
    kept: _KeptRows,
    layout: str,
    split: tuple[np.ndarray, np.ndarray],
) -> None:
    """The classes, each source file's images and full labels, and the train/val split."""
    string = h5py.string_dtype()
    h5.create_dataset("classes", data=np.array(raw.classes, dtype=object), dtype=string)
    if raw.class_ids is not None:
        h5.create_dataset("class_ids", data=np.array(raw.class_ids, dtype=object), dtype=string)
    for src in SOURCES:
        group = h5.create_group(src)
        group.create_dataset("images", data=np.array(kept.images[src], dtype=object), dtype=string)
        _write_matrix(group, "labels", kept.labels[src], layout, raw.partial)
    h5.create_dataset("split/train", data=split[0])
    h5.create_dataset("split/val", data=split[1])


def _write_uniform_sets(
    h5: h5py.File,
    labels: dict[str, np.ndarray | CSR],
    partial: bool,
    observed_sets: list[tuple[int, int, int]],
    layout: str,
) -> None:
    """The uniform observed sets (a repeated one once) and, for a partially labelled
    dataset, ``verified``: a link to its full labels."""
    seen = set()
    for num_pos, num_neg, seed in observed_sets:
        name = observed_set_name(num_pos, num_neg, seed)
        if name in seen:
            continue
        seen.add(name)
        arrays, params = _uniform_set(labels, partial, num_pos, num_neg, seed)
        _write_set(h5, name, arrays, params, layout)
    if partial:
        group = h5.create_group(f"observed/{VERIFIED}")
        group.attrs.update({"bias": VERIFIED, "num_pos": -1, "num_neg": -1})
        for src in SOURCES:
            group[src] = h5[f"{src}/labels"]  # a hard link: the same data, no copy


def _label_matrix(labels: np.ndarray | CSR, partial: bool, layout: str) -> np.ndarray | CSR:
    """A raw label matrix in the form the draws work on: dense for a dense file (int8
    states if partial, else uint8), as given for a sparse one (written as CSR)."""
    if layout == "dense":
        dense = labels.to_dense() if isinstance(labels, CSR) else np.asarray(labels)
        return dense.astype(np.int8 if partial else np.uint8)
    return labels


def _take_rows(labels: np.ndarray | CSR, rows: np.ndarray) -> np.ndarray | CSR:
    return labels.take(rows) if isinstance(labels, CSR) else np.asarray(labels)[rows]


def _positives_per_row(labels: np.ndarray | CSR) -> np.ndarray:
    if isinstance(labels, CSR):
        return labels.count_per_row(1)
    return (np.asarray(labels) == 1).sum(axis=1)


def _write_matrix(
    group: h5py.Group, name: str, matrix: np.ndarray | CSR, layout: str, partial: bool
) -> None:
    """One ``[N, L]`` matrix of the file: a gzip dataset (dense) or a CSR group (sparse)."""
    if layout == "sparse":
        write_csr(group, name, matrix if isinstance(matrix, CSR) else CSR.from_dense(matrix))
        return
    dense = matrix.to_dense() if isinstance(matrix, CSR) else np.asarray(matrix)
    dtype = np.int8 if partial else np.uint8
    group.create_dataset(name, data=dense.astype(dtype), compression="gzip")


def _uniform_set(
    labels: dict[str, np.ndarray | CSR], partial: bool, num_pos: int, num_neg: int, seed: int
) -> tuple[dict, dict]:
    """The uniform draw on each source file: negatives come from the verified negatives
    when ``partial`` (:func:`~spl.data.sampling.observe_uniform`)."""
    arrays = {}
    for src in SOURCES:
        matrix = labels[src]
        if isinstance(matrix, CSR):
            arrays[src] = observe_uniform_csr(matrix, num_pos, num_neg, seed, partial=partial)
        else:
            known = (matrix != 0) if partial else None
            arrays[src] = observe_uniform(matrix, num_pos, num_neg, seed, known=known)
    params = {"bias": "uniform", "num_pos": num_pos, "num_neg": num_neg, "seed": seed}
    return arrays, params


def _write_set(
    h5: h5py.File, name: str, arrays: dict[str, np.ndarray | CSR], params: dict, layout: str
) -> None:
    """Write ``observed/<name>``: one int8 matrix per source file, the parameters as attrs."""
    group = h5.create_group(f"observed/{name}")
    group.attrs.update(params)
    for src in SOURCES:
        _write_matrix(group, src, arrays[src], layout, partial=True)


def add_observed_set(
    dataset_dir: Path,
    num_pos: int = NUM_POSITIVES,
    num_neg: int = NUM_NEGATIVES,
    seed: int = DEFAULT_SEED,
    *,
    bias: str = "uniform",
    source: Path | None = None,
    clicks: Path | None = None,
    force: bool = False,
) -> str:
    """Add an observed-label set to an existing labels.h5 (copy, add, rename: atomic) and
    return its name.

    ``bias="uniform"`` draws as the paper does (:func:`observe_uniform`, ``num_pos``
    positives and ``num_neg`` negatives per image; a partially labelled dataset's
    negatives among its verified negatives). ``"size"``, ``"location"`` and
    ``"semantic"`` draw one positive per image from COCO's instance annotations
    (:func:`spl.data.bias.observe_biased`), read under ``source`` (default: the folder the
    dataset was prepared from), the semantic weights from the click files under
    ``clicks``. Options are checked, and an existing set is refused without ``force``,
    before any annotation file is read.
    """
    if bias not in BIASES:
        raise SplError(f"--bias must be one of {', '.join(BIASES)}; got {bias!r}")
    if bias == "uniform":
        check_observed_counts(num_pos, num_neg)
        for option, value in (("--source", source), ("--clicks", clicks)):
            if value is not None:
                raise SplError(
                    f"{option} is read only by --bias size, location or semantic; a uniform "
                    "draw needs the prepared labels alone"
                )
    else:
        biased.check_options(bias, num_pos, num_neg, clicks)
    path = labels_path(dataset_dir)
    prepared = load_prepared(dataset_dir)
    name = observed_set_name(num_pos, num_neg, seed, bias=bias)
    if name in prepared.observed and not force:
        raise SplError(f"{path} already has observed set {name}; pass --force to redo it")
    if bias == "uniform":
        full = prepared.states if prepared.states is not None else prepared.labels
        labels = {
            src: full[src].csr() if isinstance(full[src], SparseRows) else full[src]
            for src in SOURCES
        }
        arrays, params = _uniform_set(labels, prepared.partial, num_pos, num_neg, seed)
    else:
        arrays, params = biased.observe_biased(prepared, bias, seed, source=source, clicks=clicks)
    layout = "sparse" if prepared.sparse else "dense"
    with atomic_path(path, force=True) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as h5:
            if f"observed/{name}" in h5:
                del h5[f"observed/{name}"]
            _write_set(h5, name, arrays, params, layout)
            if h5.attrs.get("format_version", 1) < 2 and layout == "sparse":
                h5.attrs["format_version"] = 2
    return name


def _stored_root(image_root: Path, dataset_dir: Path) -> str:
    """Images inside the dataset folder (the demo) are stored relative, so it can move."""
    image_root, dataset_dir = image_root.resolve(), dataset_dir.resolve()
    try:
        return image_root.relative_to(dataset_dir).as_posix() or "."
    except ValueError:
        return str(image_root)


def _spl_version() -> str:
    from spl import __version__

    return __version__
