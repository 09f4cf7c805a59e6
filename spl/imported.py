"""``spl import-features``: users' own embeddings as a prepared dataset plus a feature file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from spl.data.common import SplError
from spl.data.prepared import RawDataset, write_prepared
from spl.extract.features import check_tag, feature_path, write_features


def _load_matrix(path: Path, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SplError(f"{path}: cannot read {what} as a .npy array ({exc})") from exc
    if array.ndim != 2:
        raise SplError(f"{path}: {what} must be a 2-d [rows, columns] array, got {array.shape}")
    return array


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
        feats = _load_matrix(feat_path, "features")
        labs = _load_matrix(label_path, "labels")
        if feats.shape[0] != labs.shape[0]:
            raise SplError(
                f"{feat_path} has {feats.shape[0]} rows but {label_path} has {labs.shape[0]}"
            )
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            rows = np.nonzero(bad)[0]
            raise SplError(
                f"{feat_path}: NaN or infinite features in rows {', '.join(map(str, rows[:5]))}"
                f"{' ...' if len(rows) > 5 else ''}"
            )
        if not np.isin(labs, (0, 1)).all():
            row = int(np.nonzero(~np.isin(labs, (0, 1)).all(axis=1))[0][0])
            raise SplError(f"{label_path}: labels must be 0/1 (row {row} is not)")
        features[src] = np.ascontiguousarray(feats, dtype=np.float32)
        labels[src] = labs.astype(np.uint8)
    if features["trainval"].shape[1] != features["test"].shape[1]:
        raise SplError(f"{train_features} and {test_features} differ in feature dimension")
    if labels["trainval"].shape[1] != labels["test"].shape[1]:
        raise SplError(f"{train_labels} and {test_labels} differ in the number of classes")
    num_classes = labels["trainval"].shape[1]
    if classes_file is not None:
        classes = [c.strip() for c in Path(classes_file).read_text().splitlines() if c.strip()]
        if len(classes) != num_classes:
            raise SplError(
                f"{classes_file} names {len(classes)} classes; labels have {num_classes}"
            )
    else:
        classes = [f"class_{i}" for i in range(num_classes)]
    # There are no image files: rows get stand-in names carrying a hash of the features, so
    # the fingerprint tells one import from another.
    digest = hashlib.sha256()
    for src in ("trainval", "test"):
        digest.update(features[src].tobytes())
    stamp = digest.hexdigest()[:12]
    images = {
        src: [f"imported-{stamp}/{src}/{row:08d}" for row in range(len(labels[src]))]
        for src in ("trainval", "test")
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
