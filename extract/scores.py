"""The scores file ``ROOT/<name>/scores/<tag>.h5`` (docs/architecture.md, contract 2b).

A vision-language model's cosine similarity of each image (and of each tile of a g x g
grid) with each class prompt, per source file of the prepared dataset, in its row order::

    attrs: format, format_version, tag, scorer, weights, weights_sha256, weights_source,
           prompt, classes, class_names, grid, tiles, image_size, normalize, transform,
           similarity, compute, num_classes, dtype, dataset_name, dataset_fingerprint,
           bad_images, versions, created
    trainval [N1, L]              float32, the whole image
    test     [N2, L]
    tiles/trainval [N1, g*g, L]   float32, tile k = row k // g, column k % g (grid > 0 only)
    tiles/test     [N2, g*g, L]
    text_features  [L, E]         the prompts' L2-normalised text embeddings (scorer runs)
    bad/trainval, bad/test        int64 rows whose image could not be read (``--skip-bad``);
                                  their scores are NaN

Written by ``spl pseudo-labels`` (:mod:`spl.extract.scorer`) or ``spl import-scores``
(:func:`spl.imported.import_scores`); read by :func:`load_scores`. Turning scores into pseudo-labels
(softmax with a temperature, thresholds, tile rules) is the losses' business, at training.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spl.data.common import SplError, atomic_path
from spl.data.prepared import SOURCES, PreparedDataset
from spl.extract.features import (
    _attr,
    check_tag,
    library_versions,
    open_stage_file,
    refuse_non_finite,
)

FORMAT = "spl.scores"
FORMAT_VERSION = 1
SIMILARITY = "cosine of the L2-normalised image and prompt embeddings (no logit scale)"
IMPORTED = "imported"


def scores_path(dataset_dir: Path | str, tag: str) -> Path:
    return Path(dataset_dir) / "scores" / f"{check_tag(tag)}.h5"


@dataclass
class ScoreSet:
    """The scores of one prepared dataset, in memory. ``tiles`` is None without a grid."""

    path: Path
    tag: str
    scores: dict[str, np.ndarray]
    tiles: dict[str, np.ndarray] | None
    bad_rows: dict[str, np.ndarray]
    text_features: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return int(self.attrs.get("grid", 0))

    @property
    def num_classes(self) -> int:
        return int(self.scores["trainval"].shape[1])


def write_scores(
    path: Path,
    scores: dict[str, np.ndarray],
    attrs: dict,
    *,
    tiles: dict[str, np.ndarray] | None = None,
    bad_rows: dict[str, np.ndarray] | None = None,
    text_features: np.ndarray | None = None,
    force: bool = False,
) -> Path:
    """Write a complete scores file atomically (temporary name, then rename)."""
    required = {"tag", "scorer", "dataset_fingerprint", "dataset_name", "classes", "grid"}
    missing = required - set(attrs)
    if missing:
        raise ValueError(f"scores attrs lack {sorted(missing)}")
    classes = {scores[src].shape[1] for src in SOURCES}
    if len(classes) != 1:
        raise SplError(f"{path}: trainval and test scores differ in classes ({classes})")
    grid = int(attrs["grid"])
    for src in SOURCES:
        if tiles is None:
            break
        expected = (scores[src].shape[0], grid * grid, scores[src].shape[1])
        if tiles[src].shape != expected:
            raise SplError(f"{path}: {src} tiles are {tiles[src].shape}, not {expected}")
    versions = library_versions()
    if str(attrs.get("scorer", "")).startswith("openclip:"):
        from spl.extract.libraries import OPENCLIP, module_version

        versions["open_clip"] = module_version(OPENCLIP)
    with atomic_path(path, force=force, what="scores file") as tmp:
        with h5py.File(tmp, "w") as h5:
            for src in SOURCES:
                h5.create_dataset(src, data=scores[src].astype(np.float32), chunks=True)
                if tiles is not None:
                    h5.create_dataset(
                        f"tiles/{src}", data=tiles[src].astype(np.float32), chunks=True
                    )
                rows = np.asarray((bad_rows or {}).get(src, []), dtype=np.int64)
                h5.create_dataset(f"bad/{src}", data=rows)
            if text_features is not None:
                h5.create_dataset("text_features", data=text_features.astype(np.float32))
            h5.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "num_classes": int(classes.pop()),
                    "dtype": "float32",
                    "similarity": SIMILARITY,
                    "bad_images": int(sum(len(v) for v in (bad_rows or {}).values())),
                    "versions": json.dumps(versions),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **{k: _attr(v) for k, v in attrs.items()},
                }
            )
    return path


def load_scores(prepared: PreparedDataset, tag: str, *, check_finite: bool = True) -> ScoreSet:
    """Read a scores file and check it belongs to ``prepared`` (fingerprint, rows, classes);
    scores are finite except on the rows recorded as bad."""
    dataset_dir = prepared.path.parent
    path = scores_path(dataset_dir, tag)
    rebuild = f"spl pseudo-labels {dataset_dir} --scorer ... (or spl import-scores)"
    h5, attrs = open_stage_file(path, prepared, fmt=FORMAT, kind="scores", rebuild=rebuild)
    with h5:
        scores = {src: h5[src][()] for src in SOURCES}
        tiles = {src: h5[f"tiles/{src}"][()] for src in SOURCES} if "tiles" in h5 else None
        bad = {src: h5[f"bad/{src}"][()] for src in SOURCES}
        text = h5["text_features"][()] if "text_features" in h5 else None
    for src in SOURCES:
        expected = (len(prepared.images[src]), prepared.num_classes)
        if scores[src].shape != expected:
            raise SplError(
                f"{path}: {src} scores are {scores[src].shape}; {prepared.path} has {expected} "
                f"(rows, classes); rebuild it: `{rebuild} --force`"
            )
        if check_finite:
            arrays = [scores[src]] + ([tiles[src]] if tiles is not None else [])
            fix = f"rebuild it: `{rebuild} --force`"
            refuse_non_finite(path, prepared, src, arrays, bad[src], "scores", fix)
    stored_classes = attrs.get("classes")
    if stored_classes and json.loads(stored_classes) != list(prepared.classes):
        raise SplError(f"{path}: its classes differ from {prepared.path}'s; rebuild it")
    return ScoreSet(path, tag, scores, tiles, bad, text, attrs)
