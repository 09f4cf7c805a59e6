"""benchmarks/openimages_synthetic.py: the synthetic OpenImages-shaped dataset on disk reads
back as a real OpenImages preparation would (partial labels, sparse, the sparsity rule),
its features are written without holding the whole array, and the script refuses bad
shapes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from spl.data.common import SplError
from spl.data.openimages import ANNOTATIONS, DESCRIPTIONS, TRAINABLE, read_openimages
from spl.data.prepared import VERIFIED, load_prepared, write_prepared
from spl.extract.features import library_versions, load_features

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "openimages_synthetic.py"


def _module():
    spec = importlib.util.spec_from_file_location("openimages_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


synthetic = _module()


def test_script_writes_a_partially_labelled_sparse_dataset(tmp_path):
    """The script at a tiny size: the prepared file and the features read back with the
    expected shapes, the sparsity rule's per-image means, partial labels and the observed
    sets of a real preparation; the report states time and peak memory."""
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, tmp_path / "root", "--rows", "2000", "--test-rows", "300",
         "--classes", "50", "--dim", "32", "--json", report_path],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak resident memory:" in done.stdout and "time: labels" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["peak_rss_bytes"] > 0 and report["seconds"]["total"] > 0

    prepared = load_prepared(tmp_path / "root" / "openimages-synthetic")
    assert prepared.sparse and prepared.partial
    assert prepared.num_classes == 50 and len(prepared.class_ids) == 50
    assert len(prepared.images["trainval"]) == 2000 and len(prepared.images["test"]) == 300
    assert prepared.images["trainval"][0].startswith("train/")
    assert prepared.images["test"][0].startswith("validation/")
    assert len(prepared.split["train"]) == 1600 and len(prepared.split["val"]) == 400
    assert set(prepared.observed) == {VERIFIED, "uniform-p1-n0-s1200", "uniform-p1-n1-s1200"}

    states = prepared.states["trainval"][np.arange(2000)]
    positives, negatives = (states == 1).sum(axis=1), (states == -1).sum(axis=1)
    assert positives.min() >= 1  # every training image has a verified positive
    # the sparsity rule: 1 + Poisson(1.5) positives, Poisson(4) negatives (sd/sqrt(2000) ~ 0.05)
    assert abs(positives.mean() - 2.5) < 0.15 and abs(negatives.mean() - 4.0) < 0.2
    assert (states == 0).mean() > 0.8  # most entries unknown
    test_states = prepared.states["test"][np.arange(300)]
    assert (test_states != 0).sum(axis=1).min() >= 1  # every test image has a verified label
    assert (test_states == 1).sum(axis=1).min() == 0  # test keeps images with no positive
    # a long tail: the most frequent class has several times the positives of the median
    per_class = (states == 1).sum(axis=0)
    assert per_class[0] > 4 * np.median(per_class)

    single = prepared.observed_set("uniform-p1-n0-s1200")["trainval"][np.arange(2000)]
    assert ((single == 1).sum(axis=1) == 1).all() and (single == -1).sum() == 0
    assert (states[single == 1] == 1).all()  # drawn among the verified positives
    with_negative = prepared.observed_set("uniform-p1-n1-s1200")["trainval"][np.arange(2000)]
    assert (states[with_negative == -1] == -1).all()  # a verified negative, never an unknown
    verified = prepared.observed_set(VERIFIED)["trainval"][np.arange(2000)]
    np.testing.assert_array_equal(verified, states)

    features = load_features(prepared, "synthetic")
    assert features.features["trainval"].shape == (2000, 32)
    assert features.features["test"].shape == (300, 32)
    assert features.features["trainval"].dtype == np.float16
    assert features.features["trainval"].min() >= 0  # relu
    with h5py.File(features.path, "r") as h5:
        dataset = h5["trainval"]
        assert dataset.chunks is None and dataset.compression is None
        mapped = np.memmap(features.path, np.float16, "r", dataset.id.get_offset(), (2000, 32))
        np.testing.assert_array_equal(mapped, features.features["trainval"])
    # the features carry the labels: a class's positives are nearer its prototype
    prototypes = np.random.default_rng([0, 2]).standard_normal((50, 32), dtype=np.float32)
    score = features.features["trainval"].astype(np.float32) @ prototypes[0]
    assert score[states[:, 0] == 1].mean() > score[states[:, 0] != 1].mean() + 1


def _official_csvs(raw, folder: Path) -> None:
    """The OpenImages V6 files for ``raw``'s labels, annotation rows in shuffled order."""
    folder.mkdir()
    with open(folder / DESCRIPTIONS, "w", newline="") as handle:
        csv.writer(handle).writerows(zip(raw.class_ids, raw.classes, strict=True))
    (folder / TRAINABLE).write_text("\n".join(raw.class_ids) + "\n")
    rng = np.random.default_rng(5)
    for source, phase in (("trainval", "train"), ("test", "validation")):
        matrix = raw.labels[source]
        rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        lines = [
            [raw.images[source][r].split("/")[1][:-4], "verification", raw.class_ids[c],
             "1" if v == 1 else "0"]
            for r, c, v in zip(rows, matrix.indices, matrix.values, strict=True)
        ]  # fmt: skip
        with open(folder / ANNOTATIONS[phase], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            writer.writerows(lines[k] for k in rng.permutation(len(lines)))
    (folder / ANNOTATIONS["test"]).write_text("ImageID,Source,LabelName,Confidence\n")


def test_same_dataset_as_the_openimages_reader_gives(tmp_path):
    """Written out as the official CSVs, the synthetic labels read back through
    read_openimages to the same RawDataset, and both prepare to the same file (images,
    fingerprint, labels, observed sets)."""
    shape = synthetic.Shape(rows=600, test_rows=80, classes=30, dim=8, seed=3)
    raw = synthetic.synthetic_raw(shape, tmp_path / "images")
    _official_csvs(raw, tmp_path / "raw")
    read = read_openimages(tmp_path / "raw")
    assert read.classes == raw.classes and read.class_ids == raw.class_ids
    assert read.dropped == raw.dropped
    for source in ("trainval", "test"):
        assert read.images[source] == raw.images[source]
        for part in ("indptr", "indices", "values"):
            np.testing.assert_array_equal(
                getattr(read.labels[source], part), getattr(raw.labels[source], part)
            )
    ours = write_prepared(raw, tmp_path / "a" / "labels.h5", storage="sparse")
    theirs = write_prepared(read, tmp_path / "b" / "labels.h5", storage="sparse")
    assert ours.fingerprint == theirs.fingerprint
    assert ours.expected_positives == theirs.expected_positives
    for name in theirs.observed:
        for source in ("trainval", "test"):
            rows = np.arange(len(ours.images[source]))
            np.testing.assert_array_equal(
                ours.observed_set(name)[source][rows], theirs.observed_set(name)[source][rows]
            )
    # the same arguments draw the same labels
    again = synthetic.synthetic_labels(shape, "trainval")
    np.testing.assert_array_equal(again.indices, raw.labels["trainval"].indices)


def test_features_written_without_the_whole_array(tmp_path):
    """Peak traced memory of writing the features is bounded by a block, well under the
    array (a writer that concatenated the blocks would hold it all)."""
    shape = synthetic.Shape(rows=20_000, test_rows=100, classes=20, dim=64)
    raw = synthetic.synthetic_raw(shape, tmp_path / "images")
    prepared = write_prepared(raw, tmp_path / "d" / "labels.h5", storage="sparse")
    library_versions()  # imports torch & co. before tracing: their allocations are not ours
    whole = shape.rows * shape.dim * 2  # the float16 trainval array: 2.5 MiB
    tracemalloc.start()
    try:
        synthetic.write_synthetic_features(
            prepared, raw.labels, shape, "t", force=False, block_rows=500
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole / 4, (peak, whole)
    assert load_features(prepared, "t").features["trainval"].shape == (20_000, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--positives", "0.5"], "--positives must be in [1, classes / 2]"),
        (["--classes", "2"], "--classes must be >= 4"),
        (["--rows", "5"], "--rows must be >= 10"),
    ],
)
def test_refuses_bad_shapes(tmp_path, capsys, args, message):
    assert synthetic.main([str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "openimages-synthetic").exists()


def test_refuses_existing_files_without_force(tmp_path):
    shape = synthetic.Shape(rows=50, test_rows=10, classes=8, dim=4)
    synthetic.build(tmp_path, shape)
    with pytest.raises(SplError, match="already exists; pass --force"):
        synthetic.build(tmp_path, shape)
    report = synthetic.build(tmp_path, shape, force=True)
    assert report.stats["trainval"]["rows"] == 50


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_dataset(tmp_path):
    """bench_openimages.py end to end on a tiny synthetic set: the plan from the command's
    --dry-run, the full-size part and the steps cold and warm, the results file."""
    synthetic.build(tmp_path, synthetic.Shape(rows=400, test_rows=50, classes=12, dim=16))
    results, record = tmp_path / "openimages.md", tmp_path / "openimages.json"
    done = subprocess.run(
        [sys.executable, REPO / "benchmarks" / "bench_openimages.py",
         tmp_path / "openimages-synthetic", "--steps", "10", "--losses", "an,role",
         "--results", results, "--json", record, "--threads", "1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# OpenImages-scale training within a memory budget")
    for heading in ("### Memory plan at the dataset's size", "### Peak resident memory",
                    "### Steps (features streamed, read ahead)", "### Projection"):  # fmt: skip
        assert heading in text
    measured = json.loads(record.read_text())
    assert measured["plans"]["The paper's nine losses"]["rc"] == 0
    assert "memory plan on cpu" in measured["full"]["plan"]
    assert measured["full"]["train_rows"] == 320 and measured["full"]["layout"] == "direct"
    for run in measured["steps"]["runs"].values():
        assert run["steps"] == 10 and 0 <= run["wait_share"] < 1
        assert run["timings"]["steps"] > 0
    assert measured["steps"]["memory"]["VmHWM"] > 0
    assert measured["projection"]["steps_per_epoch"] == 1_700_000 * 8 // 10 // 8


def test_benchmark_projection_by_hand():
    """The projection's arithmetic on round numbers, computed by hand: steps x (compute x
    classes ratio / ranks + wait), validation and hooks scaled and split over the ranks, the
    histograms' pass scaled but not split, set-up scaled with the rows."""
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "bench_openimages", REPO / "benchmarks" / "bench_openimages.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    args = SimpleNamespace(full_rows=1000, full_classes=40, batch_size=10, epochs=2)
    full = {"classes": 20, "train_rows": 100, "val_rows": 50, "test_rows": 10,
            "seconds": {"validation": 5.0, "histograms": 2.0, "read_labels": 1.0,
                        "check_features": 1.0, "prepare": 1.0}}  # fmt: skip
    steps = {"runs": {"warm": {"compute_per_step": 0.1, "wait_per_step": 0.01,
                               "loss_hooks_per_row": 0.001},
                      "cold": {"wait_per_step": 0.02}}}  # fmt: skip
    out = bench.projection(args, full, steps)
    assert (out["train_rows"], out["val_rows"], out["steps_per_epoch"]) == (800, 200, 80)
    assert out["setup"] == pytest.approx(3.0 * 1010 / 160)
    one, eight = out["ranks"][1], out["ranks"][8]
    # steps 80 x (0.2 + 0.02); validation 5 x 200/50 x 2; histograms 2 x 800/100 x 2;
    # hooks 0.001 x 800 x 2
    assert one["parts"] == pytest.approx(
        {"steps": 17.6, "validation": 40.0, "histograms": 32.0, "loss_hooks": 1.6}
    )
    assert one["run"] == pytest.approx(3.0 * 1010 / 160 + 2 * 91.2)
    assert eight["parts"] == pytest.approx(
        {"steps": 80 * (0.2 / 8 + 0.02), "validation": 5.0, "histograms": 32.0,
         "loss_hooks": 0.2}
    )  # fmt: skip
