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

The score arrays are written contiguous and uncompressed, block by block into
preallocated datasets (:class:`ScoresWriter`: memory bounded by a block), as the feature
file's are (:mod:`spl.extract.features`). Written by ``spl pseudo-labels`` (:mod:`spl.extract.scorer`) or ``spl import-scores``
(:func:`spl.imported.import_scores`); read by :func:`load_scores`. Turning scores into pseudo-labels
(softmax with a temperature, thresholds, tile rules) is the losses' business, at training.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spl.data.common import SplError
from spl.data.labels import row_blocks
from spl.data.prepared import SOURCES, PreparedDataset
from spl.extract.features import (
    WRITE_BLOCK_ROWS,
    StageFileWriter,
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


class ScoresWriter:
    """A scores file written block by block (the layout: module docstring): ``rows`` per
    source file, ``num_classes`` scores, and with ``tiles`` the ``grid * grid`` tiles' too
    (``attrs["grid"]``), all float32. ``append(source, scores, tiles)`` in row order, then
    ``finish(bad_rows, text_features)``; used as a context manager, an error drops the
    file."""

    def __init__(
        self,
        path: Path | str,
        rows: dict[str, int],
        num_classes: int,
        attrs: dict,
        *,
        tiles: bool = False,
        force: bool = False,
    ) -> None:
        required = {"tag", "scorer", "dataset_fingerprint", "dataset_name", "classes", "grid"}
        missing = required - set(attrs)
        if missing:
            raise ValueError(f"scores attrs lack {sorted(missing)}")
        self.attrs = dict(attrs)
        self.num_classes = int(num_classes)
        self.tiles = tiles
        grid = int(attrs["grid"])
        arrays = {}
        for src in SOURCES:
            arrays[src] = ((int(rows[src]), self.num_classes), np.float32)
            if tiles:
                arrays[f"tiles/{src}"] = (
                    (int(rows[src]), grid * grid, self.num_classes),
                    np.float32,
                )
        self._file = StageFileWriter(path, arrays, force=force, what="scores file")
        self.path = self._file.path

    def __enter__(self) -> ScoresWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._file.__exit__(exc_type, exc, traceback)

    def append(self, source: str, scores: np.ndarray, tiles: np.ndarray | None = None) -> None:
        """The next rows of ``source``'s scores (and tiles, when the file has them)."""
        if (tiles is not None) != self.tiles:
            raise ValueError(f"{self.path}: tiles {'expected' if self.tiles else 'not expected'}")
        self._file.append(source, scores)
        if tiles is not None:
            self._file.append(f"tiles/{source}", tiles)

    def finish(
        self,
        bad_rows: dict[str, np.ndarray] | None = None,
        text_features: np.ndarray | None = None,
    ) -> Path:
        """Write the bad rows, the text features and the attributes and give the file its
        final name."""
        for src in SOURCES:
            self._file.put(f"bad/{src}", np.asarray((bad_rows or {}).get(src, []), np.int64))
        if text_features is not None:
            self._file.put("text_features", text_features.astype(np.float32))
        versions = library_versions()
        if str(self.attrs.get("scorer", "")).startswith("openclip:"):
            from spl.extract.libraries import OPENCLIP, module_version

            versions["open_clip"] = module_version(OPENCLIP)
        return self._file.finish(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "num_classes": self.num_classes,
                "dtype": "float32",
                "similarity": SIMILARITY,
                "bad_images": int(sum(len(v) for v in (bad_rows or {}).values())),
                "versions": json.dumps(versions),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **{k: _attr(v) for k, v in self.attrs.items()},
            }
        )


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
    """Write a complete scores file from arrays in memory, atomically (temporary name,
    then rename); :class:`ScoresWriter` writes one without holding the arrays."""
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
    rows = {src: len(scores[src]) for src in SOURCES}
    with ScoresWriter(
        path, rows, classes.pop(), attrs, tiles=tiles is not None, force=force
    ) as out:
        for src in SOURCES:
            for block in row_blocks(rows[src], WRITE_BLOCK_ROWS):
                out.append(src, scores[src][block], None if tiles is None else tiles[src][block])
        out.finish(bad_rows, text_features)
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
