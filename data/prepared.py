"""The prepared dataset file ``ROOT/<name>/labels.h5`` (docs/architecture.md, contract 1):
its layout, and reading it (:func:`load_prepared`, :class:`PreparedDataset`). It is
written by :mod:`spl.data.prepared_writer` (``write_prepared``, ``add_observed_set``,
importable from here too).

Layout (``trainval`` is the official training file, split into train/val by row indices;
``test`` is the official val/test file)::

    attrs: format, format_version, name, image_root, expected_positives, split_seed,
           val_fraction, fingerprint, dropped_unlabeled, dropped (JSON: per source file,
           images left out and why), label_layout (dense|sparse), partial_labels,
           source, spl_version, created
    classes                 [L] str
    class_ids               [L] str   (OpenImages: the LabelName of each class)
    trainval/images         [N1] str   paths relative to image_root
    trainval/labels         [N1, L] full labels: uint8 0/1, or for a partially labelled
                            dataset int8 +1 positive / -1 verified negative / 0 unknown
    test/images, test/labels
    split/train, split/val  int64 rows of trainval, sorted
    observed/<set>/trainval [N1, L] int8 in {-1, 0, +1}   attrs bias, num_pos, num_neg, seed
    observed/<set>/test     [N2, L] int8                 (semantic: also clicks_sha256)

With ``label_layout = sparse`` (chosen when a dense matrix would pass
:data:`spl.data.labels.SPARSE_THRESHOLD_BYTES`, or asked for), every ``[N, L]`` matrix is a
group of its nonzero entries instead (:mod:`spl.data.labels`: ``indptr``, ``indices``,
``values``); readers see the same dense blocks of rows either way
(``prepared.labels[source][rows]``, ``prepared.observed_set(name)[source][rows]``).

Observed sets are ``uniform-p<P>-n<N>-s<seed>`` (the paper's draw) or, drawn from COCO's
instance annotations by :mod:`spl.data.bias`, ``<bias>-p1-s<seed>`` (size, location,
semantic). A partially labelled dataset also has ``verified``: its full labels themselves
(an HDF5 link to them, no copy). Files written before the ``bias`` attribute existed read
as ``uniform``. Dense fully labelled files are written as format version 1, which every
earlier reader reads; sparse or partially labelled ones as version 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spl.data.common import SplError, plain
from spl.data.labels import CSR, LabelMatrix, SparseRows, count_values

FORMAT = "spl.prepared"
FORMAT_VERSION = 2
SOURCES = ("trainval", "test")
SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.h5"
VERIFIED = "verified"  # the observed set of a partially labelled dataset's verified labels
STORAGES = ("auto", "dense", "sparse")


@dataclass
class RawDataset:
    """What a raw-format reader produces: rows in the reference order, full labels.

    ``labels[source]`` is a dense ``[N, L]`` matrix or a :class:`~spl.data.labels.CSR`.
    Fully labelled: 0/1 (uint8). Partially labelled (``partial``): int8 +1 verified
    positive, -1 verified negative, 0 unknown. ``dropped`` counts the images a reader left
    out, per source file and reason.
    """

    name: str
    classes: list[str]
    image_root: Path
    images: dict[str, list[str]]
    labels: dict[str, np.ndarray | CSR]
    expected_positives: float | None = None
    source: str = ""
    partial: bool = False
    class_ids: list[str] | None = None
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = (-1, 0, 1) if self.partial else (0, 1)
        for src in SOURCES:
            labels = self.labels[src]
            if labels.shape != (len(self.images[src]), len(self.classes)):
                raise SplError(
                    f"{self.name}: {src} labels have shape {labels.shape}, expected "
                    f"({len(self.images[src])} images, {len(self.classes)} classes)"
                )
            values = labels.values if isinstance(labels, CSR) else np.asarray(labels)
            if not np.isin(values, allowed).all():
                raise SplError(f"{self.name}: {src} labels hold values outside {allowed}")


@dataclass
class PreparedDataset:
    """A prepared dataset: names, images and split in memory, label matrices as NumPy
    arrays (dense files) or :class:`~spl.data.labels.SparseRows` read by blocks of rows
    (sparse files). Either way ``labels[source][rows]`` is a dense uint8 0/1 block (unknown
    as 0) and ``observed_set(name)[source][rows]`` a dense int8 {-1, 0, +1} block."""

    path: Path
    name: str
    classes: list[str]
    image_root: Path
    images: dict[str, np.ndarray]
    labels: dict[str, LabelMatrix]
    split: dict[str, np.ndarray]
    observed: dict[str, dict[str, LabelMatrix]]
    observed_params: dict[str, dict[str, int | str]]  # per set: bias, num_pos, num_neg, seed
    expected_positives: float
    fingerprint: str
    attrs: dict = field(default_factory=dict)
    # Partially labelled datasets: per source file, +1 / -1 verified, 0 unknown.
    states: dict[str, LabelMatrix] | None = None
    class_ids: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def partial(self) -> bool:
        """Whether some labels are unknown (neither verified positive nor negative)."""
        return self.states is not None

    @property
    def sparse(self) -> bool:
        return self.attrs.get("label_layout", "dense") == "sparse"

    def rows(self, split: str) -> tuple[str, np.ndarray]:
        """(source file, row indices) of a split: train/val index trainval, test is all rows."""
        if split in ("train", "val"):
            return "trainval", self.split[split]
        if split == "test":
            return "test", np.arange(len(self.images["test"]), dtype=np.int64)
        raise SplError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    def split_labels(self, split: str) -> np.ndarray:
        source, rows = self.rows(split)
        return self.labels[source][rows]

    def known(self, source: str, rows) -> np.ndarray | None:
        """Which entries of ``rows`` carry a label (bool block): the verified positives and
        negatives of a partially labelled dataset; None when every entry is known."""
        if self.states is None:
            return None
        matrix = self.states[source]
        if isinstance(matrix, SparseRows):
            return matrix.with_view("known")[rows]
        return matrix[rows] != 0

    def label_states(self, source: str, rows) -> np.ndarray:
        """The labels of ``rows`` as an int8 block: +1 positive, -1 negative (verified, for
        a partially labelled dataset), 0 unknown (none in a fully labelled one)."""
        if self.states is not None:
            return np.asarray(self.states[source][rows], dtype=np.int8)
        return self.labels[source][rows].astype(np.int8) * 2 - 1

    def in_memory(self, observed: list[str] | None = None) -> PreparedDataset:
        """This dataset with its sparse matrices' entries read into memory (the labels and
        the ``observed`` sets, default all): random batches then read no file. Memory
        grows with the stored entries (5 bytes each), not with N x L; a dense file is
        returned as it is."""
        if not self.sparse:
            return self
        loaded: dict[str, SparseRows] = {}

        def held(matrix: LabelMatrix, load: bool = True) -> LabelMatrix:
            if not isinstance(matrix, SparseRows):
                return matrix
            if matrix.name not in loaded:
                if not load:
                    return matrix
                loaded[matrix.name] = matrix.in_memory()
            return loaded[matrix.name].with_view(matrix.view)

        names = sorted(self.observed) if observed is None else observed
        for name in names:
            self.observed_set(name)  # refuses an unknown name with the usual message
        labels = {src: held(m) for src, m in self.labels.items()}
        states = None if self.states is None else {s: held(m) for s, m in self.states.items()}
        return dataclasses.replace(
            self,
            labels=labels,
            states=states,
            # a set not asked for stays in the file, unless it is the labels (`verified`)
            observed={
                name: {src: held(m, load=name in names) for src, m in sets.items()}
                for name, sets in self.observed.items()
            },
        )

    def observed_set(self, observed: str) -> dict[str, LabelMatrix]:
        if observed not in self.observed:
            raise SplError(
                f"{self.path}: no observed-label set {observed!r}; it has "
                f"{', '.join(sorted(self.observed)) or 'none'}. Add one with "
                f"`spl data observe {self.path.parent} --num-pos P --num-neg N --seed S` "
                "(or, for COCO, --bias size|location|semantic --seed S)"
            )
        return self.observed[observed]

    def summary(self) -> dict:
        """Counts a user checks after preparing: images per split; positives, (verified)
        negatives and unknowns; the same for every observed set; unlabeled rows."""
        out: dict = {
            "name": self.name,
            "classes": self.num_classes,
            "image_root": str(self.image_root),
            "expected_positives": round(float(self.expected_positives), 3),
            "partial_labels": self.partial,
            "label_layout": "sparse" if self.sparse else "dense",
            "dropped_unlabeled": int(self.attrs.get("dropped_unlabeled", 0)),
            "dropped": json.loads(self.attrs.get("dropped", "{}") or "{}"),
            "fingerprint": self.fingerprint,
            "splits": {},
            "observed_sets": sorted(self.observed),
            "observed": {},
        }
        full = self.states if self.states is not None else self.labels
        for split in SPLITS:
            source, rows = self.rows(split)
            counts = count_values(full[source], rows)
            per_row, per_class = counts["positives_per_row"], counts["positives_per_class"]
            entries = len(rows) * self.num_classes
            positives = int(per_row.sum())
            negatives = (
                int(counts["negatives_per_row"].sum()) if self.partial else entries - positives
            )
            out["splits"][split] = {
                "images": len(rows),
                "mean_positives": round(float(per_row.mean()), 3) if len(rows) else 0.0,
                "no_positive": int((per_row == 0).sum()),
                "classes_without_positive": int((per_class == 0).sum()),
                "positives": positives,
                "negatives": negatives,
                "unknown": entries - positives - negatives,
            }
        for name in sorted(self.observed):
            out["observed"][name] = {}
            for split in SPLITS:
                source, rows = self.rows(split)
                counts = count_values(self.observed[name][source], rows)
                positives = int(counts["positives_per_row"].sum())
                negatives = int(counts["negatives_per_row"].sum())
                out["observed"][name][split] = {
                    "positives": positives,
                    "negatives": negatives,
                    "unobserved": len(rows) * self.num_classes - positives - negatives,
                }
        return out


def format_summary(summary: dict) -> str:
    negatives = "verified neg" if summary.get("partial_labels") else "negatives"
    kind = (
        "partially labelled: verified positives and negatives, the rest unknown"
        if summary.get("partial_labels")
        else "fully labelled"
    )
    lines = [
        f"dataset {summary['name']}: {summary['classes']} classes, "
        f"expected positives k = {summary['expected_positives']}",
        f"  images under {summary['image_root']}",
        f"  labels: {kind}; stored {summary.get('label_layout', 'dense')}",
        f"  {'split':<6} {'images':>8} {'mean pos':>9} {'no pos':>7} {'empty classes':>14} "
        f"{'positives':>11} {negatives:>13} {'unknown':>13}",
    ]
    for split, row in summary["splits"].items():
        lines.append(
            f"  {split:<6} {row['images']:>8} {row['mean_positives']:>9.3f} "
            f"{row['no_positive']:>7} {row['classes_without_positive']:>14} "
            f"{row['positives']:>11} {row['negatives']:>13} {row['unknown']:>13}"
        )
    lines.append(f"  images with no positive dropped: {summary['dropped_unlabeled']}")
    for source, reasons in summary.get("dropped", {}).items():
        if any(reasons.values()):
            text = ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
            lines.append(f"    {source}: {text}")
    lines.append(f"  observed-label sets: {', '.join(summary['observed_sets'])}")
    width = max([len(name) for name in summary.get("observed", {})] + [12])
    if summary.get("observed"):
        lines.append(
            f"  {'observed set':<{width}} {'split':<6} {'positives':>11} {'negatives':>11} "
            f"{'unobserved':>13}"
        )
    for name, splits in summary.get("observed", {}).items():
        for split, row in splits.items():
            lines.append(
                f"  {name:<{width}} {split:<6} {row['positives']:>11} {row['negatives']:>11} "
                f"{row['unobserved']:>13}"
            )
    lines.append(f"  fingerprint: {summary['fingerprint']}")
    return "\n".join(lines)


def labels_path(dataset_dir: Path | str) -> Path:
    dataset_dir = Path(dataset_dir)
    if dataset_dir.name == LABELS_FILE:
        return dataset_dir
    return dataset_dir / LABELS_FILE


def load_prepared(dataset_dir: Path | str) -> PreparedDataset:
    """Read ``ROOT/<name>/labels.h5`` (the directory or the file itself) and check it.

    Dense matrices are read whole; sparse ones stay in the file, read by blocks of rows.
    """
    path = labels_path(dataset_dir)
    if not path.is_file():
        raise SplError(
            f"{path} not found: prepare the dataset first with "
            f"`spl data prepare NAME --source RAW_DIR --root ROOT`"
        )
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise SplError(f"{path} is not a readable HDF5 file ({exc}); prepare it again") from exc
    with h5:
        if h5.attrs.get("format") != FORMAT:
            raise SplError(f"{path} is not an spl prepared dataset (format attribute missing)")
        version = int(h5.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise SplError(
                f"{path} has format version {version}; this spl reads versions up to "
                f"{FORMAT_VERSION}: upgrade spl, or prepare the dataset again with this one"
            )
        attrs = {k: plain(v) for k, v in h5.attrs.items()}
        partial = bool(attrs.get("partial_labels", False))
        classes = [_text(c) for c in h5["classes"][()]]
        class_ids = [_text(c) for c in h5["class_ids"][()]] if "class_ids" in h5 else None
        images = {src: np.array([_text(p) for p in h5[f"{src}/images"][()]]) for src in SOURCES}
        labels, states = {}, {}
        for src in SOURCES:
            matrix = _read_matrix(h5, path, f"{src}/labels")
            if partial:
                states[src] = matrix
            if isinstance(matrix, SparseRows):
                labels[src] = matrix.with_view("positive")
            else:
                labels[src] = (matrix == 1).astype(np.uint8) if partial else matrix
        split = {"train": h5["split/train"][()], "val": h5["split/val"][()]}
        observed, params = {}, {}
        for name, group in h5.get("observed", {}).items():
            observed[name] = {}
            for src in SOURCES:
                if partial and group[src] == h5[f"{src}/labels"]:
                    observed[name][src] = states[src]  # `verified`: a link, read once
                else:
                    observed[name][src] = _read_matrix(h5, path, f"observed/{name}/{src}")
            params[name] = {"bias": "uniform", **{k: _param(v) for k, v in group.attrs.items()}}
    return PreparedDataset(
        path=path,
        name=str(attrs["name"]),
        classes=classes,
        image_root=(path.parent / str(attrs["image_root"])).resolve(),
        images=images,
        labels=labels,
        split=split,
        observed=observed,
        observed_params=params,
        expected_positives=float(attrs["expected_positives"]),
        fingerprint=str(attrs["fingerprint"]),
        attrs=attrs,
        states=states if partial else None,
        class_ids=class_ids,
    )


def _read_matrix(h5: h5py.File, path: Path, name: str) -> LabelMatrix:
    """A dense matrix read whole, or a CSR group as a lazily read :class:`SparseRows`."""
    node = h5[name]
    if isinstance(node, h5py.Group):
        if node.attrs.get("layout") != "csr":
            raise SplError(
                f"{path}: {name} is a group without layout 'csr' (written by a newer spl?); "
                "prepare the dataset again"
            )
        return SparseRows(path, name)
    return node[()]


def _param(value) -> int | float | str:
    """An observed set's attribute: counts and seeds as int, names and digests as str."""
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# The writing side (spl.data.prepared_writer) reads files back through this module; its
# public names are importable from here too, imported on first use (PEP 562), so that
# neither module needs the other loaded first.
_WRITER_NAMES = frozenset(
    {"add_observed_set", "choose_layout", "image_fingerprint", "write_prepared"}
)


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        from spl.data import prepared_writer

        return getattr(prepared_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
