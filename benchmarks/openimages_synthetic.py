"""A synthetic OpenImages-shaped dataset on disk, for measuring training at OpenImages'
scale without its 500 GB of images (issue 17, section 5)::

    python benchmarks/openimages_synthetic.py ROOT            # 1 M x 2,000 classes x 2,048
    python benchmarks/openimages_synthetic.py ROOT --rows 20000 --classes 200 --dim 256

writes ``ROOT/openimages-synthetic/labels.h5`` (the prepared dataset) and
``ROOT/openimages-synthetic/features/synthetic.h5`` (float16 features), then prints its
time and peak memory. At the default size the feature file is 4.3 GB (1.04 M rows x 2,048
x 2 bytes) and labels.h5 120 MB; peak memory stays well under 2 GiB (the labels and their
draws 0.45 GiB at 1 M rows, one block of features ~100 MB, the libraries torch & co.
~0.7 GiB).

What a real preparation gives, without images. The prepared file is written by the
project's own ``write_prepared`` from a ``RawDataset`` built as
:func:`spl.data.openimages.read_openimages` builds one (name aside): ``trainval`` rows are
``train/<ImageID>.jpg``, ``test`` rows ``validation/<ImageID>.jpg``, sorted by ImageID,
labels int8 +1 verified positive / -1 verified negative / 0 unknown, every training image
with at least one verified positive (the reader drops the others), every test image with at
least one verified label, classes with a LabelName (``class_ids``) and a DisplayName. Labels
are stored sparse (CSR); the observed sets are ``verified`` (the labels themselves) and the
uniform single-positive draws ``spl data prepare`` makes by default (``uniform-p1-n0-s1200``,
and ``uniform-p1-n1-s1200`` whose negative is a verified one). The test suite checks that
``read_openimages`` on the official CSV layout written from these labels gives the same
prepared file.

Sparsity rule. OpenImages V6's human-verified image-level labels average about 2.5 verified
positives and 4 verified negatives per image over its 9,605 trainable classes (issue 17's
figures; ``--positives``, ``--negatives`` change them). A person verified a handful of
candidate labels per image whatever the size of the vocabulary, and a subset of the classes
made of the frequent ones keeps most of those labels, so the per-image means are kept at any
class count (``--classes``): per training image 1 + Poisson(positives - 1) verified
positives (at least one, as the reader keeps), Poisson(negatives) verified negatives; per
test image Poisson(positives) and Poisson(negatives), an image with neither given one
verified negative (the reader drops images with no verified label). The density per entry is
then (positives + negatives) / classes: 0.33 % at 2,000 classes, 0.068 % at 9,605. A row
holds at most classes // 2 labels (only tiny class counts reach it). Classes are long-tailed
as OpenImages' are: each label's class is drawn with probability proportional to
1 / (rank + 1) (Zipf), distinct within an image.

Features: per image, relu(sum of the prototypes of its positive classes + N(0, 1) noise),
prototypes N(0, 1) per class, so a linear head has something to learn; written in float16
through :class:`spl.extract.features.FeatureWriter` a block of rows at a time (contiguous,
memory-mappable, never the whole array in memory). Everything is drawn from ``--seed``: the
same arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from spl.data.common import SplError  # noqa: E402
from spl.data.labels import CSR  # noqa: E402
from spl.data.openimages import NO_LABEL, NO_POSITIVE  # noqa: E402
from spl.data.prepared import PreparedDataset, RawDataset, labels_path  # noqa: E402

NAME = "openimages-synthetic"
TAG = "synthetic"
ROWS = 1_000_000  # trainval: split 80 / 20 into train / val as every dataset is
TEST_ROWS = 40_000  # OpenImages V6's validation file has 41,620 images
CLASSES = 2_000
DIM = 2_048  # ResNet-50's pooled features
POSITIVES = 2.5  # verified positives per image, OpenImages V6 (module docstring)
NEGATIVES = 4.0  # verified negatives per image
OPENIMAGES_CLASSES = 9_605
BLOCK_ROWS = 8_192  # rows of features generated and written at once (64 MiB of float32 at 2,048)
SEED = 0


@dataclass(frozen=True)
class Shape:
    """What to generate: row counts per source file, classes, feature width, the per-image
    means of verified labels and the seed."""

    rows: int = ROWS
    test_rows: int = TEST_ROWS
    classes: int = CLASSES
    dim: int = DIM
    positives: float = POSITIVES
    negatives: float = NEGATIVES
    seed: int = SEED

    def check(self) -> None:
        """Refuse a shape nothing can be generated for, naming the option and its range."""
        checks = (
            ("--rows", self.rows, self.rows >= 10, ">= 10 (a train/val split needs rows)"),
            ("--test-rows", self.test_rows, self.test_rows >= 1, ">= 1"),
            ("--classes", self.classes, self.classes >= 4, ">= 4"),
            ("--dim", self.dim, self.dim >= 1, ">= 1"),
            ("--positives", self.positives, 1 <= self.positives <= self.classes / 2,
             "in [1, classes / 2] (every training image has a verified positive)"),
            ("--negatives", self.negatives, 0 <= self.negatives <= self.classes / 2,
             "in [0, classes / 2]"),
        )  # fmt: skip
        for option, value, ok, valid in checks:
            if not ok:
                raise SplError(f"{option} must be {valid}; got {value}")

    def feature_bytes(self) -> int:
        return (self.rows + self.test_rows) * self.dim * 2


def class_probabilities(num_classes: int) -> np.ndarray:
    """Zipf over the classes: class k is drawn with probability proportional to 1 / (k + 1)."""
    weights = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64)
    return weights / weights.sum()


def label_counts(
    rng: np.random.Generator, count: int, shape: Shape, *, train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Verified positives and negatives per image (the sparsity rule of the module docstring)."""
    if train:
        positives = 1 + rng.poisson(shape.positives - 1, count)
    else:
        positives = rng.poisson(shape.positives, count)
    negatives = rng.poisson(shape.negatives, count)
    if not train:
        negatives[(positives + negatives) == 0] = 1
    cap = shape.classes // 2
    positives = np.minimum(positives, cap)
    negatives = np.minimum(negatives, cap - positives)
    return positives.astype(np.int64), negatives.astype(np.int64)


def draw_labels(
    rng: np.random.Generator,
    positives: np.ndarray,
    negatives: np.ndarray,
    probabilities: np.ndarray,
) -> CSR:
    """A CSR of ``positives[r]`` +1 and ``negatives[r]`` -1 entries in row ``r``, their classes
    drawn from ``probabilities`` and distinct within a row (a repeated class is drawn again)."""
    num_rows, num_classes = len(positives), len(probabilities)
    counts = positives + negatives
    rows = np.repeat(np.arange(num_rows), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(rows)) - np.repeat(starts, counts)
    values = np.where(slot < np.repeat(positives, counts), 1, -1).astype(np.int8)
    cumulative = np.cumsum(probabilities)
    cumulative[-1] = 1.0

    def draw(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cumulative, rng.random(n), side="right"), num_classes - 1)

    columns = draw(len(rows))
    for _ in range(10_000):
        key = rows * num_classes + columns
        order = np.argsort(key, kind="stable")
        repeat = order[1:][key[order][1:] == key[order][:-1]]
        if len(repeat) == 0:
            break
        columns[repeat] = draw(len(repeat))
    else:  # cannot happen below classes // 2 labels a row; a guard, not a path
        raise RuntimeError(f"{len(repeat)} labels still repeat a class of their image")
    return CSR.from_entries(rows, columns, values, (num_rows, num_classes))


def synthetic_labels(shape: Shape, source: str) -> CSR:
    """One source file's labels (``trainval`` or ``test``), drawn a block of rows at a time."""
    train = source == "trainval"
    num_rows = shape.rows if train else shape.test_rows
    probabilities = class_probabilities(shape.classes)
    parts = []
    for index, start in enumerate(range(0, num_rows, 1 << 16)):
        rng = np.random.default_rng([shape.seed, 0 if train else 1, index])
        count = min(1 << 16, num_rows - start)
        positives, negatives = label_counts(rng, count, shape, train=train)
        parts.append(draw_labels(rng, positives, negatives, probabilities))
    offsets = np.cumsum([0] + [part.nnz for part in parts])
    indptr = np.concatenate(
        [[0]] + [part.indptr[1:] + offset for part, offset in zip(parts, offsets, strict=False)]
    )
    return CSR(
        indptr.astype(np.int64),
        np.concatenate([part.indices for part in parts]),
        np.concatenate([part.values for part in parts]),
        shape.classes,
    )


def image_ids(count: int, source: str) -> list[str]:
    """OpenImages-like ImageIDs (16 hex digits), ascending as the reader sorts them."""
    base = 0 if source == "trainval" else 1 << 60
    return [f"{base + k:016x}" for k in range(count)]


def class_names(num_classes: int) -> tuple[list[str], list[str]]:
    """(LabelNames, DisplayNames) of the synthetic classes."""
    return [f"/m/syn{k:05d}" for k in range(num_classes)], [
        f"Synthetic class {k}" for k in range(num_classes)
    ]


def synthetic_raw(shape: Shape, image_root: Path, name: str = NAME) -> RawDataset:
    """The RawDataset :func:`~spl.data.openimages.read_openimages` would give for these labels."""
    shape.check()
    class_ids, classes = class_names(shape.classes)
    labels = {source: synthetic_labels(shape, source) for source in ("trainval", "test")}
    images = {
        "trainval": [f"train/{i}.jpg" for i in image_ids(shape.rows, "trainval")],
        "test": [f"validation/{i}.jpg" for i in image_ids(shape.test_rows, "test")],
    }
    return RawDataset(
        name,
        classes,
        image_root,
        images,
        labels,
        None,
        f"synthetic OpenImages shape ({json.dumps(asdict(shape))}), "
        "benchmarks/openimages_synthetic.py",
        partial=True,
        class_ids=class_ids,
        dropped={"trainval": {NO_LABEL: 0, NO_POSITIVE: 0}, "test": {NO_LABEL: 0}},
    )


def feature_blocks(labels: CSR, shape: Shape, source: str, block_rows: int = BLOCK_ROWS):
    """float16 features of ``labels``' rows, ``block_rows`` at a time (module docstring)."""
    prototypes = np.random.default_rng([shape.seed, 2]).standard_normal(
        (shape.classes, shape.dim), dtype=np.float32
    )
    num_rows = labels.shape[0]
    out = np.empty((block_rows, shape.dim), dtype=np.float32)
    for index, start in enumerate(range(0, num_rows, block_rows)):
        stop = min(start + block_rows, num_rows)
        block = out[: stop - start]
        rng = np.random.default_rng([shape.seed, 3 if source == "trainval" else 4, index])
        rng.standard_normal(dtype=np.float32, out=block)
        a, b = labels.indptr[start], labels.indptr[stop]
        local = np.repeat(np.arange(stop - start), np.diff(labels.indptr[start : stop + 1]))
        positive = labels.values[a:b] == 1
        local, columns = local[positive], labels.indices[a:b][positive]
        # the k-th positive of each row in one pass: no row twice in a fancy-index add
        first = np.concatenate([[True], local[1:] != local[:-1]])
        rank = np.arange(len(local)) - np.maximum.accumulate(
            np.where(first, np.arange(len(local)), 0)
        )
        for k in range(int(rank.max(initial=-1)) + 1):
            take = rank == k
            block[local[take]] += prototypes[columns[take]]
        np.maximum(block, 0, out=block)
        yield block.astype(np.float16)


def write_synthetic_features(
    prepared: PreparedDataset,
    labels: dict[str, CSR],
    shape: Shape,
    tag: str,
    *,
    force: bool,
    block_rows: int = BLOCK_ROWS,
) -> Path:
    """The feature file of ``prepared``, written ``block_rows`` at a time (never the whole
    array)."""
    from spl.extract.features import FeatureWriter, feature_path

    rows = {source: labels[source].shape[0] for source in ("trainval", "test")}
    attrs = {
        "tag": tag,
        "backbone": "synthetic",
        "weights": "",
        "image_size": 0,
        "transform": {},
        "synthetic": asdict(shape),
        "dataset_fingerprint": prepared.fingerprint,
        "dataset_name": prepared.name,
    }
    out = feature_path(prepared.path.parent, tag)
    with FeatureWriter(out, rows, shape.dim, np.float16, attrs, force=force) as writer:
        for source in ("trainval", "test"):
            for block in feature_blocks(labels[source], shape, source, block_rows):
                writer.append(source, block)
        writer.finish()
    return out


@dataclass
class Report:
    """What a build did: its files, sizes, label statistics, time and peak memory."""

    shape: dict
    dataset: str
    features: str
    labels_bytes: int
    features_bytes: int
    seconds: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    stats: dict = field(default_factory=dict)


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def label_stats(labels: dict[str, CSR]) -> dict:
    """Per source file: verified positives and negatives per image, density, classes used."""
    stats = {}
    for source, matrix in labels.items():
        num_rows, num_classes = matrix.shape
        positives = matrix.count_per_row(1)
        stats[source] = {
            "rows": num_rows,
            "positives_per_image": round(float(positives.mean()), 4),
            "negatives_per_image": round(float(matrix.count_per_row(-1).mean()), 4),
            "images_without_positive": int((positives == 0).sum()),
            "density": round(matrix.nnz / (num_rows * num_classes), 6),
            "classes_with_a_positive": int(len(np.unique(matrix.indices[matrix.values == 1]))),
        }
    return stats


def build(
    root: Path | str,
    shape: Shape = Shape(),
    *,
    name: str = NAME,
    tag: str = TAG,
    force: bool = False,
) -> Report:
    """Write ``root/name/labels.h5`` and its feature file ``tag``; refuse to start when the
    files exist (without ``force``) or the disk lacks the room."""
    from spl.data.prepared import write_prepared
    from spl.extract.features import feature_path

    shape.check()
    folder = Path(root) / name
    outputs = (labels_path(folder), feature_path(folder, tag))
    for path in outputs:
        if path.exists() and not force:
            raise SplError(f"{path} already exists; pass --force to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    needed = int(shape.feature_bytes() * 1.05) + 64 * 2**20
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SplError(
            f"{folder}: {free / 2**30:.1f} GiB free, the dataset needs {needed / 2**30:.1f} "
            "GiB; free some space or choose smaller --rows / --dim"
        )
    seconds = {}
    start = time.perf_counter()
    raw = synthetic_raw(shape, folder / "images", name)
    seconds["labels"] = time.perf_counter() - start
    mark = time.perf_counter()
    prepared = write_prepared(raw, outputs[0], force=force, storage="sparse")
    seconds["write_prepared"] = time.perf_counter() - mark
    labels = dict(raw.labels)
    del raw
    mark = time.perf_counter()
    write_synthetic_features(prepared, labels, shape, tag, force=force)
    seconds["features"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    stats = label_stats(labels)
    return Report(
        shape=asdict(shape),
        dataset=str(folder),
        features=str(outputs[1]),
        labels_bytes=outputs[0].stat().st_size,
        features_bytes=outputs[1].stat().st_size,
        seconds={key: round(value, 2) for key, value in seconds.items()},
        peak_rss_bytes=peak_rss_bytes(),
        stats=stats,
    )


def format_report(report: Report) -> str:
    shape = report.shape
    lines = [
        f"{report.dataset}: {shape['rows']:,} trainval + {shape['test_rows']:,} test rows, "
        f"{shape['classes']:,} classes, {shape['dim']:,} float16 features",
        f"  labels.h5 {report.labels_bytes / 2**20:.1f} MiB, features "
        f"{report.features_bytes / 2**30:.2f} GiB ({report.features})",
    ]
    for source, row in report.stats.items():
        lines.append(
            f"  {source}: {row['positives_per_image']:.2f} verified positives and "
            f"{row['negatives_per_image']:.2f} verified negatives per image, density "
            f"{100 * row['density']:.3f} %, {row['classes_with_a_positive']} classes with a "
            "positive"
        )
    times = ", ".join(f"{key} {value:.1f} s" for key, value in report.seconds.items())
    lines.append(f"  time: {times}")
    lines.append(f"  peak resident memory: {report.peak_rss_bytes / 2**20:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that receives NAME/ (the dataset root)")
    parser.add_argument("--rows", type=int, default=ROWS, help="trainval rows (default 1 M)")
    parser.add_argument("--test-rows", type=int, default=TEST_ROWS)
    parser.add_argument("--classes", type=int, default=CLASSES)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--positives", type=float, default=POSITIVES,
                        help="mean verified positives per image (>= 1)")  # fmt: skip
    parser.add_argument("--negatives", type=float, default=NEGATIVES,
                        help="mean verified negatives per image")  # fmt: skip
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--name", default=NAME, help="dataset folder under ROOT")
    parser.add_argument("--tag", default=TAG, help="feature tag")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    shape = Shape(args.rows, args.test_rows, args.classes, args.dim, args.positives,
                  args.negatives, args.seed)  # fmt: skip
    try:
        report = build(args.root, shape, name=args.name, tag=args.tag, force=args.force)
    except SplError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
