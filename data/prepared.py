"""The prepared dataset file ``ROOT/<name>/labels.h5`` (design.md, contract 1).

Layout (``trainval`` is the official training file, split into train/val by row indices;
``test`` is the official val/test file, always fully labelled)::

    attrs: format, format_version, name, image_root, expected_positives, split_seed,
           val_fraction, fingerprint, dropped_unlabeled, source, spl_version, created
    classes                 [L] str
    trainval/images         [N1] str   paths relative to image_root
    trainval/labels         [N1, L] uint8  full labels
    test/images, test/labels
    split/train, split/val  int64 rows of trainval, sorted
    observed/<set>/trainval [N1, L] int8 in {-1, 0, +1}   attrs bias, num_pos, num_neg, seed
    observed/<set>/test     [N2, L] int8                 (semantic: also clicks_sha256)

Observed sets are ``uniform-p<P>-n<N>-s<seed>`` (the paper's draw) or, drawn from COCO's
instance annotations by :mod:`spl.data.bias`, ``<bias>-p1-s<seed>`` (size, location,
semantic). Files written before the ``bias`` attribute existed read as ``uniform``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spl.data.common import SplError, atomic_path, fingerprint_strings, plain
from spl.data.protocol import BIASES, NUM_NEGATIVES, NUM_POSITIVES
from spl.data.sampling import (
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    check_fraction,
    check_observed_counts,
    observe_uniform,
    observed_set_name,
    split_train_val,
)

FORMAT = "spl.prepared"
FORMAT_VERSION = 1
SOURCES = ("trainval", "test")
SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.h5"


@dataclass
class RawDataset:
    """What a raw-format reader produces: rows in the reference order, full 0/1 labels."""

    name: str
    classes: list[str]
    image_root: Path
    images: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    expected_positives: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for src in SOURCES:
            labels = self.labels[src]
            if labels.shape != (len(self.images[src]), len(self.classes)):
                raise SplError(
                    f"{self.name}: {src} labels have shape {labels.shape}, expected "
                    f"({len(self.images[src])} images, {len(self.classes)} classes)"
                )


@dataclass
class PreparedDataset:
    """A prepared dataset held in memory (labels are small; images stay on disk)."""

    path: Path
    name: str
    classes: list[str]
    image_root: Path
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    split: dict[str, np.ndarray]
    observed: dict[str, dict[str, np.ndarray]]
    observed_params: dict[str, dict[str, int | str]]  # per set: bias, num_pos, num_neg, seed
    expected_positives: float
    fingerprint: str
    attrs: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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

    def observed_set(self, observed: str) -> dict[str, np.ndarray]:
        if observed not in self.observed:
            raise SplError(
                f"{self.path}: no observed-label set {observed!r}; it has "
                f"{', '.join(sorted(self.observed)) or 'none'}. Add one with "
                f"`spl data observe {self.path.parent} --num-pos P --num-neg N --seed S` "
                "(or, for COCO, --bias size|location|semantic --seed S)"
            )
        return self.observed[observed]

    def summary(self) -> dict:
        """Counts a user checks after preparing: images per split, positives, unlabeled rows."""
        out: dict = {
            "name": self.name,
            "classes": self.num_classes,
            "image_root": str(self.image_root),
            "expected_positives": round(float(self.expected_positives), 3),
            "dropped_unlabeled": int(self.attrs.get("dropped_unlabeled", 0)),
            "fingerprint": self.fingerprint,
            "splits": {},
            "observed_sets": sorted(self.observed),
        }
        for split in SPLITS:
            labels = self.split_labels(split)
            positives = labels.sum(axis=1)
            out["splits"][split] = {
                "images": int(labels.shape[0]),
                "mean_positives": round(float(positives.mean()), 3) if len(labels) else 0.0,
                "no_positive": int((positives == 0).sum()),
                "classes_without_positive": int((labels.sum(axis=0) == 0).sum()),
            }
        return out


def format_summary(summary: dict) -> str:
    lines = [
        f"dataset {summary['name']}: {summary['classes']} classes, "
        f"expected positives k = {summary['expected_positives']}",
        f"  images under {summary['image_root']}",
        f"  {'split':<6} {'images':>8} {'mean pos':>9} {'no pos':>7} {'empty classes':>14}",
    ]
    for split, row in summary["splits"].items():
        lines.append(
            f"  {split:<6} {row['images']:>8} {row['mean_positives']:>9.3f} "
            f"{row['no_positive']:>7} {row['classes_without_positive']:>14}"
        )
    lines.append(f"  images with no positive dropped: {summary['dropped_unlabeled']}")
    lines.append(f"  observed-label sets: {', '.join(summary['observed_sets'])}")
    lines.append(f"  fingerprint: {summary['fingerprint']}")
    return "\n".join(lines)


def image_fingerprint(classes: list[str], images: dict[str, list[str] | np.ndarray]) -> str:
    """Identifies the image list: a feature file made from another list is refused."""
    return fingerprint_strings(classes, list(images["trainval"]), list(images["test"]))


def write_prepared(
    raw: RawDataset,
    out_path: Path,
    *,
    observed_sets: list[tuple[int, int, int]] | None = None,
    split_seed: int = DEFAULT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    drop_unlabeled: bool = False,
    force: bool = False,
) -> PreparedDataset:
    """Split, sample the observed labels and write ``labels.h5`` atomically.

    Options are checked before anything is written, so a bad one leaves no file behind.
    """
    if observed_sets is None:
        observed_sets = [(1, 0, DEFAULT_SEED), (1, 1, DEFAULT_SEED)]
    for num_pos, num_neg, _ in observed_sets:
        check_observed_counts(num_pos, num_neg)
    check_fraction(val_fraction, "--val-fraction")
    images = {src: list(raw.images[src]) for src in SOURCES}
    labels = {src: np.asarray(raw.labels[src], dtype=np.uint8) for src in SOURCES}
    dropped = 0
    if drop_unlabeled:
        for src in SOURCES:
            keep = labels[src].sum(axis=1) > 0
            dropped += int((~keep).sum())
            images[src] = [p for p, k in zip(images[src], keep, strict=True) if k]
            labels[src] = labels[src][keep]
    for src in SOURCES:
        if len(images[src]) == 0:
            raise SplError(f"{raw.name}: the {src} file has no images after reading {raw.source}")
    train_rows, val_rows = split_train_val(len(images["trainval"]), val_fraction, split_seed)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise SplError(
            f"{raw.name}: {len(images['trainval'])} training images are too few for a "
            f"train/val split with val fraction {val_fraction}"
        )
    expected = raw.expected_positives
    if expected is None:
        # No published k: use the training file's mean positive count (a peek at the full
        # labels that the paper's k values also took); override with --expected-positives.
        expected = float(labels["trainval"].sum(axis=1).mean())
    fingerprint = image_fingerprint(raw.classes, images)
    out_path = Path(out_path)
    string = h5py.string_dtype()
    with atomic_path(out_path, force=force, what="prepared dataset") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "name": raw.name,
                    "image_root": _stored_root(Path(raw.image_root), out_path.parent),
                    "source": raw.source,
                    "expected_positives": float(expected),
                    "split_seed": int(split_seed),
                    "val_fraction": float(val_fraction),
                    "fingerprint": fingerprint,
                    "dropped_unlabeled": dropped,
                    "spl_version": _spl_version(),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
            )
            h5.create_dataset("classes", data=np.array(raw.classes, dtype=object), dtype=string)
            for src in SOURCES:
                group = h5.create_group(src)
                group.create_dataset(
                    "images", data=np.array(images[src], dtype=object), dtype=string
                )
                group.create_dataset("labels", data=labels[src], compression="gzip")
            h5.create_dataset("split/train", data=train_rows)
            h5.create_dataset("split/val", data=val_rows)
            seen = set()
            for num_pos, num_neg, seed in observed_sets:
                name = observed_set_name(num_pos, num_neg, seed)
                if name in seen:
                    continue
                seen.add(name)
                arrays, params = _uniform_set(labels, num_pos, num_neg, seed)
                _write_set(h5, name, arrays, params)
    return load_prepared(out_path.parent)


def _uniform_set(labels: dict, num_pos: int, num_neg: int, seed: int) -> tuple[dict, dict]:
    arrays = {src: observe_uniform(labels[src], num_pos, num_neg, seed) for src in SOURCES}
    params = {"bias": "uniform", "num_pos": num_pos, "num_neg": num_neg, "seed": seed}
    return arrays, params


def _write_set(h5: h5py.File, name: str, arrays: dict[str, np.ndarray], params: dict) -> None:
    """Write ``observed/<name>``: one int8 array per source file, the parameters as attrs."""
    group = h5.create_group(f"observed/{name}")
    group.attrs.update(params)
    for src in SOURCES:
        group.create_dataset(src, data=np.asarray(arrays[src], dtype=np.int8), compression="gzip")


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
    positives and ``num_neg`` negatives per image). ``"size"``, ``"location"`` and
    ``"semantic"`` draw one positive per image from COCO's instance annotations
    (:func:`spl.data.bias.observe_biased`), read under ``source`` (default: the folder the
    dataset was prepared from), the semantic weights from the click files under
    ``clicks``. Options are checked, and an existing set is refused without ``force``,
    before any annotation file is read.
    """
    import shutil

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
        # Imported here: spl.data.bias reads raw files through spl.data.sources, which
        # imports this module.
        from spl.data import bias as biased

        biased.check_options(bias, num_pos, num_neg, clicks)
    path = labels_path(dataset_dir)
    prepared = load_prepared(dataset_dir)
    name = observed_set_name(num_pos, num_neg, seed, bias=bias)
    if name in prepared.observed and not force:
        raise SplError(f"{path} already has observed set {name}; pass --force to redo it")
    if bias == "uniform":
        arrays, params = _uniform_set(prepared.labels, num_pos, num_neg, seed)
    else:
        arrays, params = biased.observe_biased(prepared, bias, seed, source=source, clicks=clicks)
    with atomic_path(path, force=True) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as h5:
            if f"observed/{name}" in h5:
                del h5[f"observed/{name}"]
            _write_set(h5, name, arrays, params)
    return name


def labels_path(dataset_dir: Path | str) -> Path:
    dataset_dir = Path(dataset_dir)
    if dataset_dir.name == LABELS_FILE:
        return dataset_dir
    return dataset_dir / LABELS_FILE


def load_prepared(dataset_dir: Path | str) -> PreparedDataset:
    """Read ``ROOT/<name>/labels.h5`` (the directory or the file itself) and check it."""
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
            raise SplError(f"{path} has format version {version}; this spl reads {FORMAT_VERSION}")
        attrs = {k: plain(v) for k, v in h5.attrs.items()}
        classes = [_text(c) for c in h5["classes"][()]]
        images = {src: np.array([_text(p) for p in h5[f"{src}/images"][()]]) for src in SOURCES}
        labels = {src: h5[f"{src}/labels"][()] for src in SOURCES}
        split = {"train": h5["split/train"][()], "val": h5["split/val"][()]}
        observed, params = {}, {}
        for name, group in h5.get("observed", {}).items():
            observed[name] = {src: group[src][()] for src in SOURCES}
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
    )


def _stored_root(image_root: Path, dataset_dir: Path) -> str:
    """Images inside the dataset folder (the demo) are stored relative, so it can move."""
    image_root, dataset_dir = image_root.resolve(), dataset_dir.resolve()
    try:
        return image_root.relative_to(dataset_dir).as_posix() or "."
    except ValueError:
        return str(image_root)


def _param(value) -> int | float | str:
    """An observed set's attribute: counts and seeds as int, names and digests as str."""
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _spl_version() -> str:
    from spl import __version__

    return __version__
