"""`spl data prepare openimages` and partially labelled datasets: the verified labels cell by
cell, the dropped images, the observed sets, bad rows refused by file and line, sparse
storage read as dense, old files, `spl data info`, custom CSVs with negatives."""

import json
import shutil

import h5py
import numpy as np
import pytest
from openimages_fixture import (
    NOT_TRAINABLE,
    SPECIAL,
    TRAINABLE,
    expected_rows,
    make_openimages,
)

from spl.data import labels as label_store
from spl.data.common import SplError
from spl.data.openimages import read_openimages
from spl.data.prepared import load_prepared, write_prepared
from spl.data.sampling import observe_uniform, split_train_val
from spl.data.sources import read_voc12

from conftest import invoke
from rawfixtures import make_voc, write_image

UNIFORM_SETS = ("uniform-p1-n0-s1200", "uniform-p1-n1-s1200")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    raw = tmp_path_factory.mktemp("openimages") / "raw"
    return raw, make_openimages(raw)


@pytest.fixture
def copy(tree, tmp_path):
    """A copy of the tree that a test may change."""
    shutil.copytree(tree[0], tmp_path / "raw")
    return tmp_path / "raw", tree[1]


def _prepare(runner, source, root, *extra, ok=True):
    args = ["data", "prepare", "openimages", "--source", source, "--root", root, *extra]
    return invoke(runner, args, ok=ok)


def _all(prepared, src):
    return np.arange(len(prepared.images[src]))


def _check_cells(prepared, src, phase, verified, classes, *, need_positive):
    ids, states = expected_rows(verified, classes, need_positive=need_positive)
    assert list(prepared.images[src]) == [f"{phase}/{i}.jpg" for i in ids]
    rows = _all(prepared, src)
    np.testing.assert_array_equal(prepared.label_states(src, rows), states)
    np.testing.assert_array_equal(prepared.labels[src][rows], (states == 1).astype(np.uint8))
    np.testing.assert_array_equal(prepared.known(src, rows), states != 0)
    return ids, states


def test_prepare_keeps_the_verified_labels_cell_by_cell(tree, tmp_path, runner):
    source, spec = tree
    result = _prepare(runner, source, tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "openimages")
    assert prepared.class_ids == TRAINABLE
    assert prepared.classes == [spec["display"][c] for c in TRAINABLE]  # 'Woman, adult' too
    assert prepared.partial and prepared.attrs["format_version"] == 2
    train_ids, train = _check_cells(prepared, "trainval", "train", spec["verified"]["train"],
                                    TRAINABLE, need_positive=True)  # fmt: skip
    test_ids, test = _check_cells(prepared, "test", "validation", spec["verified"]["validation"],
                                  TRAINABLE, need_positive=False)  # fmt: skip
    # the cases: dropped, kept, a repeat that agrees kept once
    assert SPECIAL["train"]["no_label"] not in train_ids
    assert SPECIAL["train"]["negatives_only"] not in train_ids
    assert SPECIAL["validation"]["no_label"] not in test_ids
    row = test_ids.index(SPECIAL["validation"]["negatives_only"])
    assert list(test[row]) == [-1, 0, 0, -1, 0, 0, 0, 0]
    row = train_ids.index(SPECIAL["train"]["repeat"])
    assert list(train[row][:3]) == [0, 1, -1]
    # what was dropped, and why, recorded and printed
    _, with_label = expected_rows(spec["verified"]["train"], TRAINABLE, need_positive=False)
    no_positive = int(((with_label == 1).sum(1) == 0).sum())
    assert no_positive >= 1  # the negatives-only image at least
    dropped = json.loads(prepared.attrs["dropped"])
    assert dropped == {
        "trainval": {"no verified label": 1, "no verified positive": no_positive},
        "test": {"no verified label": 1},
    }
    assert prepared.attrs["dropped_unlabeled"] == 2 + no_positive
    assert f"trainval: no verified label: 1, no verified positive: {no_positive}" in result.output
    train_rows, val_rows = split_train_val(len(train_ids))
    np.testing.assert_array_equal(prepared.split["train"], train_rows)
    np.testing.assert_array_equal(prepared.split["val"], val_rows)
    # no published k: the training file's mean count of verified positives
    assert prepared.expected_positives == pytest.approx((train == 1).sum(1).mean())


def test_observed_sets_draw_from_the_verified_labels(tree, tmp_path, runner):
    source, _ = tree
    _prepare(runner, source, tmp_path / "root")
    dataset = tmp_path / "root" / "openimages"
    invoke(runner, ["data", "observe", dataset, "--num-pos", 2, "--num-neg", 1, "--seed", 5])
    prepared = load_prepared(dataset)
    assert set(prepared.observed) == {*UNIFORM_SETS, "verified", "uniform-p2-n1-s5"}
    assert prepared.observed_params["verified"] == {"bias": "verified", "num_pos": -1,
                                                    "num_neg": -1}  # fmt: skip
    for src in ("trainval", "test"):
        rows = _all(prepared, src)
        states = prepared.label_states(src, rows)
        np.testing.assert_array_equal(prepared.observed_set("verified")[src][rows], states)
        for name in (*UNIFORM_SETS, "uniform-p2-n1-s5"):
            params = prepared.observed_params[name]
            observed = prepared.observed_set(name)[src][rows]
            replay = observe_uniform(states, params["num_pos"], params["num_neg"],
                                     params["seed"], known=states != 0)  # fmt: skip
            np.testing.assert_array_equal(observed, replay)
            assert (states[observed == -1] == -1).all() and (states[observed == 1] == 1).all()
    # every training image has exactly one observed positive, a verified one
    single = prepared.observed_set("uniform-p1-n0-s1200")["trainval"][_all(prepared, "trainval")]
    assert ((single == 1).sum(1) == 1).all() and (single != -1).all()


def test_a_subset_of_classes(tree, tmp_path, runner):
    source, spec = tree
    chosen = [TRAINABLE[3], TRAINABLE[0], NOT_TRAINABLE[0]]  # any described class may be asked
    (tmp_path / "classes.txt").write_text("\n".join(chosen) + "\n\n")
    _prepare(runner, source, tmp_path / "root", "--classes", tmp_path / "classes.txt")
    prepared = load_prepared(tmp_path / "root" / "openimages")
    assert prepared.class_ids == chosen
    assert prepared.classes == ["Cat", "Person", "Building"]
    _check_cells(prepared, "trainval", "train", spec["verified"]["train"], chosen,
                 need_positive=True)  # fmt: skip
    _check_cells(prepared, "test", "validation", spec["verified"]["validation"], chosen,
                 need_positive=False)  # fmt: skip
    unverified = sum(1 for marks in spec["verified"]["train"].values()
                     if not set(marks) & set(chosen))  # fmt: skip
    assert json.loads(prepared.attrs["dropped"])["trainval"]["no verified label"] == unverified


def test_the_official_test_file_as_test_split(tree, tmp_path, runner):
    source, spec = tree
    _prepare(runner, source, tmp_path / "root", "--test-split", "test")
    prepared = load_prepared(tmp_path / "root" / "openimages")
    _check_cells(prepared, "test", "test", spec["verified"]["test"], TRAINABLE,
                 need_positive=False)  # fmt: skip
    make_voc(tmp_path / "voc")
    args = ["data", "prepare", "voc12", "--source", tmp_path / "voc", "--root", tmp_path / "r"]
    result = invoke(runner, [*args, "--test-split", "test"], ok=False)
    assert "--test-split is read by openimages only" in result.output
    result = _prepare(runner, source, tmp_path / "r2", "--test-split", "val", ok=False)
    assert "'val' is not one of 'validation', 'test'" in result.output


def _append(path, *rows):
    with open(path, "a") as handle:
        handle.write("".join(row + "\n" for row in rows))
    return sum(1 for _ in open(path))  # the line number of the last row


VALIDATION = "validation-annotations-human-imagelabels.csv"


def _first_row(path):
    return open(path).read().splitlines()[1].split(",")


@pytest.mark.parametrize(
    "case",
    ["unknown class", "confidence", "disagreeing repeat", "malformed line", "bad image id",
     "missing column", "classes file", "descriptions", "not utf-8"],
)  # fmt: skip
def test_bad_rows_are_refused_naming_file_and_line(copy, tmp_path, runner, case):
    source, _ = copy
    path = source / VALIDATION
    image, origin, label, confidence = _first_row(path)
    extra = []
    if case == "unknown class":
        line = _append(path, f"{image},verification,/m/zzzz9,1")
        expected = [f"{VALIDATION}, line {line}", "unknown class '/m/zzzz9'"]
    elif case == "confidence":
        line = _append(path, f"{image},verification,{TRAINABLE[5]},0.5")
        expected = [f"{VALIDATION}, line {line}", "Confidence must be 1", "'0.5'"]
    elif case == "disagreeing repeat":
        line = _append(path, f"{image},crowdsource-verification,{label},{1 - int(confidence)}")
        expected = [f"{VALIDATION}, line {line}", f"{label} has Confidence",
                    "on line 2"]  # fmt: skip
    elif case == "malformed line":
        line = _append(path, f"{image},verification,{TRAINABLE[5]}")
        expected = [f"{VALIDATION}, line {line}", "3 fields where the header has 4"]
    elif case == "bad image id":
        line = _append(path, f"../escape,verification,{TRAINABLE[5]},1")
        expected = [f"{VALIDATION}, line {line}", "ImageID '../escape' is not an id"]
    elif case == "missing column":
        text = open(path).read().replace("Confidence", "Score", 1)
        path.write_text(text)
        expected = [f"{VALIDATION}, line 1", "missing column 'Confidence'"]
    elif case == "classes file":
        (tmp_path / "classes.txt").write_text(f"{TRAINABLE[0]}\n/m/nothing\n")
        extra = ["--classes", tmp_path / "classes.txt"]
        expected = ["classes.txt, line 2", "'/m/nothing' is not in oidv6-class-descriptions.csv"]
    elif case == "not utf-8":
        with open(path, "ab") as handle:
            handle.write(b"\xff\xfe,verification,/m/0k4j,1\n")
        expected = [f"{VALIDATION}, near line", "is not UTF-8"]
    else:
        _append(source / "oidv6-class-descriptions.csv", "/m/0onlyone")
        expected = ["oidv6-class-descriptions.csv, line 12", "expected 'LabelName,DisplayName'"]
    result = _prepare(runner, source, tmp_path / "root", *extra, ok=False)
    for text in expected:
        assert text in result.output
    assert not (tmp_path / "root" / "openimages" / "labels.h5").exists()


def test_missing_files_and_images(copy, tmp_path, runner):
    source, _ = copy
    prepared_once = _prepare(runner, source, tmp_path / "root")
    assert "wrote" in prepared_once.output
    kept = load_prepared(tmp_path / "root" / "openimages").images["trainval"][3]
    (source / kept).unlink()
    (source / "train" / f"{SPECIAL['train']['no_label']}.jpg").unlink()  # dropped: not needed
    result = _prepare(runner, source, tmp_path / "r2", ok=False)
    assert "1 listed images are missing" in result.output and kept in result.output
    assert "--allow-missing" in result.output
    _prepare(runner, source, tmp_path / "r2", "--allow-missing")
    (source / "oidv6-classes-trainable.txt").unlink()
    result = _prepare(runner, source, tmp_path / "r3", ok=False)
    assert "oidv6-classes-trainable.txt not found" in result.output
    assert "Expected layout" in result.output


def _write_both(source, tmp_path):
    raw = read_openimages(source)
    dense = write_prepared(raw, tmp_path / "dense" / "labels.h5", storage="dense")
    sparse = write_prepared(raw, tmp_path / "sparse" / "labels.h5", storage="sparse")
    return dense, sparse


def test_sparse_storage_reads_as_dense_storage(tree, tmp_path, runner):
    dense, sparse = _write_both(tree[0], tmp_path)
    with h5py.File(sparse.path) as h5:
        assert isinstance(h5["trainval/labels"], h5py.Group)
        assert isinstance(h5["observed/uniform-p1-n0-s1200/test"], h5py.Group)
        assert h5.attrs["label_layout"] == "sparse"
    with h5py.File(dense.path) as h5:
        assert h5["trainval/labels"].dtype == np.int8  # partial: +1 / -1 / 0
    assert isinstance(dense.labels["trainval"], np.ndarray)
    assert dense.fingerprint == sparse.fingerprint
    rng = np.random.RandomState(0)
    for src in ("trainval", "test"):
        n = len(dense.images[src])
        for rows in (np.arange(n), rng.randint(0, n, 17), rng.rand(n) < 0.5, slice(2, 9)):
            block = sparse.labels[src][rows]
            assert block.dtype == np.uint8
            np.testing.assert_array_equal(block, dense.labels[src][rows])
            np.testing.assert_array_equal(sparse.known(src, rows), dense.known(src, rows))
            np.testing.assert_array_equal(sparse.label_states(src, rows),
                                          dense.label_states(src, rows))  # fmt: skip
            for name in dense.observed:
                block = sparse.observed_set(name)[src][rows]
                assert block.dtype == np.int8
                np.testing.assert_array_equal(block, dense.observed_set(name)[src][rows])
    expected, got = dense.summary(), sparse.summary()
    assert got.pop("label_layout") == "sparse" and expected.pop("label_layout") == "dense"
    assert got == expected
    # another draw on each file: the same set
    for prepared in (dense, sparse):
        invoke(runner, ["data", "observe", prepared.path.parent, "--num-neg", 2, "--seed", 3])
    a, b = load_prepared(dense.path), load_prepared(sparse.path)
    rows = np.arange(len(a.images["trainval"]))
    np.testing.assert_array_equal(a.observed_set("uniform-p1-n2-s3")["trainval"][rows],
                                  b.observed_set("uniform-p1-n2-s3")["trainval"][rows])  # fmt: skip


def test_large_files_go_sparse_without_being_asked(tree, tmp_path, runner, monkeypatch):
    monkeypatch.setattr(label_store, "SPARSE_THRESHOLD_BYTES", 200)  # 30 x 8 = 240 entries
    result = _prepare(runner, tree[0], tmp_path / "root")
    assert "stored sparse" in result.output
    assert load_prepared(tmp_path / "root" / "openimages").sparse


def _old_writer(path, labels, observed):
    """labels.h5 as spl wrote it before sparse storage (format version 1, no new attrs)."""
    string = h5py.string_dtype()
    with h5py.File(path, "w") as h5:
        h5.attrs.update({"format": "spl.prepared", "format_version": 1, "name": "old",
                         "image_root": ".", "source": "", "expected_positives": 1.5,
                         "split_seed": 1200, "val_fraction": 0.2, "fingerprint": "0" * 16,
                         "dropped_unlabeled": 0, "spl_version": "0.1.0",
                         "created": "2026-01-01T00:00:00+00:00"})  # fmt: skip
        h5.create_dataset("classes", data=np.array(["a", "b", "c"], dtype=object), dtype=string)
        for src, matrix in labels.items():
            names = np.array([f"{src}/{i}.jpg" for i in range(len(matrix))], dtype=object)
            h5.create_dataset(f"{src}/images", data=names, dtype=string)
            h5.create_dataset(f"{src}/labels", data=matrix, compression="gzip")
        h5.create_dataset("split/train", data=np.arange(8))
        h5.create_dataset("split/val", data=np.arange(8, 10))
        for src, matrix in observed.items():
            h5.create_dataset(f"observed/uniform-p1-n0-s1200/{src}", data=matrix)
        h5["observed/uniform-p1-n0-s1200"].attrs.update({"num_pos": 1, "num_neg": 0, "seed": 1200})


def test_files_written_before_stay_readable(tmp_path, runner):
    rng = np.random.RandomState(0)
    labels = {"trainval": (rng.rand(10, 3) < 0.5).astype(np.uint8),
              "test": (rng.rand(4, 3) < 0.5).astype(np.uint8)}  # fmt: skip
    observed = {src: observe_uniform(m, 1, 0, 1200) for src, m in labels.items()}
    (tmp_path / "old").mkdir()
    _old_writer(tmp_path / "old" / "labels.h5", labels, observed)
    prepared = load_prepared(tmp_path / "old")
    for src in labels:
        assert isinstance(prepared.labels[src], np.ndarray)
        np.testing.assert_array_equal(prepared.labels[src], labels[src])
        np.testing.assert_array_equal(prepared.observed["uniform-p1-n0-s1200"][src], observed[src])
        rows = np.arange(len(labels[src]))
        assert prepared.known(src, rows) is None
        np.testing.assert_array_equal(prepared.label_states(src, rows), 2 * labels[src] - 1.0)
    assert not prepared.partial and not prepared.sparse
    summary = prepared.summary()
    assert summary["splits"]["test"]["unknown"] == 0
    assert summary["splits"]["test"]["negatives"] == int((labels["test"] == 0).sum())
    invoke(runner, ["data", "info", tmp_path / "old"])
    # a fully labelled dense file is still written as version 1, which earlier spl reads
    make_voc(tmp_path / "voc")
    voc = write_prepared(read_voc12(tmp_path / "voc"), tmp_path / "voc12" / "labels.h5")
    assert voc.attrs["format_version"] == 1 and voc.labels["trainval"].dtype == np.uint8
    with h5py.File(voc.path, "a") as h5:
        h5.attrs["format_version"] = 3
    result = invoke(runner, ["data", "info", voc.path.parent], ok=False)
    assert "format version 3; this spl reads versions up to 2: upgrade spl" in result.output


def test_info_counts_positives_negatives_and_unknowns(tree, tmp_path, runner):
    source, spec = tree
    _, sparse = _write_both(source, tmp_path)
    result = invoke(runner, ["data", "info", sparse.path.parent, "--json"])
    summary = json.loads(result.output)
    _, train = expected_rows(spec["verified"]["train"], TRAINABLE, need_positive=True)
    _, test = expected_rows(spec["verified"]["validation"], TRAINABLE, need_positive=False)
    states = {"train": train[sparse.split["train"]], "val": train[sparse.split["val"]],
              "test": test}  # fmt: skip
    for split, matrix in states.items():
        row = summary["splits"][split]
        assert row["images"] == len(matrix)
        assert row["positives"] == int((matrix == 1).sum())
        assert row["negatives"] == int((matrix == -1).sum())
        assert row["unknown"] == int((matrix == 0).sum())
        assert row["no_positive"] == int(((matrix == 1).sum(1) == 0).sum())
        verified = summary["observed"]["verified"][split]
        assert [verified[k] for k in ("positives", "negatives", "unobserved")] == [
            row["positives"], row["negatives"], row["unknown"]]  # fmt: skip
        single = summary["observed"]["uniform-p1-n0-s1200"][split]
        assert single["positives"] == int(((matrix == 1).sum(1) > 0).sum())
        assert single["negatives"] == 0
    text = invoke(runner, ["data", "info", sparse.path.parent]).output
    assert "partially labelled" in text and "verified neg" in text and "stored sparse" in text
    test_row = summary["splits"]["test"]
    assert (
        f"{test_row['positives']:>11} {test_row['negatives']:>13} {test_row['unknown']:>13}" in text
    )


def test_custom_csv_with_a_negatives_column(tmp_path, runner):
    images = tmp_path / "imgs"
    rows = ["image,labels,negatives,split"]
    marks = [("cat", "dog"), ("dog;bird", ""), ("", "cat;bird"), ("bird", "cat")]
    for i in range(12):
        write_image(images / f"{i}.png", seed=i, fmt="PNG")
        positives, negatives = marks[i % 4]
        rows.append(f"{i}.png,{positives},{negatives},{'test' if i % 3 == 0 else 'train'}")
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    args = ["data", "prepare", "custom", "--source", images, "--csv", tmp_path / "a.csv"]
    invoke(runner, [*args, "--root", tmp_path / "root"])
    prepared = load_prepared(tmp_path / "root" / "custom")
    assert prepared.partial and prepared.classes == ["bird", "cat", "dog"]
    expected = {0: [0, 1, -1], 1: [1, 0, 1], 2: [-1, -1, 0], 3: [1, -1, 0]}  # by i % 4
    train = [i for i in range(12) if i % 3]
    np.testing.assert_array_equal(prepared.label_states("trainval", np.arange(len(train))),
                                  [expected[i % 4] for i in train])  # fmt: skip
    assert "verified" in prepared.observed
    rows_all = np.arange(len(train))
    states = prepared.label_states("trainval", rows_all)
    iu = prepared.observed_set("uniform-p1-n1-s1200")["trainval"][rows_all]
    assert (states[iu == -1] == -1).all() and (iu[states == 0] == 0).all()
    (tmp_path / "b.csv").write_text("image,labels,negatives\n0.png,cat,cat;dog\n1.png,dog,\n")
    result = invoke(runner, ["data", "prepare", "custom", "--source", images, "--csv",
                             tmp_path / "b.csv", "--root", tmp_path / "r2"], ok=False)  # fmt: skip
    assert "b.csv, line 2: class 'cat' is both in 'labels'" in result.output
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "c.csv").write_text("image,labels,negatives\n0.png,cat,dog\n1.png,dog,bird\n")
    result = invoke(runner, ["data", "prepare", "custom", "--source", images, "--csv",
                             tmp_path / "c.csv", "--root", tmp_path / "r3", "--classes",
                             tmp_path / "classes.txt"], ok=False)  # fmt: skip
    assert "c.csv, line 3: class 'bird' is not in" in result.output


def test_a_fully_labelled_dataset_stored_sparse_reads_as_dense(tmp_path):
    make_voc(tmp_path / "voc")
    raw = read_voc12(tmp_path / "voc")
    dense = write_prepared(raw, tmp_path / "dense" / "labels.h5", storage="dense")
    sparse = write_prepared(raw, tmp_path / "sparse" / "labels.h5", storage="sparse")
    assert sparse.sparse and not sparse.partial and sparse.attrs["format_version"] == 2
    for src in ("trainval", "test"):
        rows = np.arange(len(dense.images[src]))[::-1]
        block = sparse.labels[src][rows]
        assert block.dtype == np.uint8
        np.testing.assert_array_equal(block, dense.labels[src][rows])
        assert sparse.known(src, rows) is None
        np.testing.assert_array_equal(sparse.label_states(src, rows),
                                      dense.label_states(src, rows))  # fmt: skip
        for name in dense.observed:
            np.testing.assert_array_equal(sparse.observed_set(name)[src][rows],
                                          dense.observed_set(name)[src][rows])  # fmt: skip
    expected, got = dense.summary(), sparse.summary()
    assert got.pop("label_layout") == "sparse" and expected.pop("label_layout") == "dense"
    assert got == expected


def test_sparse_matrices_held_in_memory_read_no_file(tree, tmp_path):
    dense, sparse = _write_both(tree[0], tmp_path)
    held = sparse.in_memory(observed=["uniform-p1-n0-s1200"])
    assert dense.in_memory() is dense
    with pytest.raises(SplError, match="no observed-label set 'nope'"):
        sparse.in_memory(observed=["nope"])
    sparse.path.rename(tmp_path / "moved.h5")  # the file is gone: only memory can answer
    rows = np.random.RandomState(1).randint(0, len(dense.images["trainval"]), 40)
    np.testing.assert_array_equal(held.labels["trainval"][rows], dense.labels["trainval"][rows])
    np.testing.assert_array_equal(held.known("trainval", rows), dense.known("trainval", rows))
    np.testing.assert_array_equal(
        held.observed_set("uniform-p1-n0-s1200")["trainval"][rows],
        dense.observed_set("uniform-p1-n0-s1200")["trainval"][rows],
    )
    np.testing.assert_array_equal(held.observed_set("verified")["test"][:5],
                                  dense.observed_set("verified")["test"][:5])  # fmt: skip
    with pytest.raises((OSError, FileNotFoundError)):
        held.observed_set("uniform-p1-n1-s1200")["trainval"][rows]  # not asked: still a file


def test_confidence_written_as_a_decimal_is_read_as_its_value(copy, tmp_path, runner):
    """'1.0' and '0.0' are the same verdicts as '1' and '0'; anything else is refused
    (test_bad_rows_are_refused_naming_file_and_line)."""
    source, spec = copy
    path = source / VALIDATION
    lines = open(path).read().splitlines()
    rewritten = [lines[0]] + [
        row[:-1] + ("1.0" if row.endswith("1") else "0.0") for row in lines[1:]
    ]
    path.write_text("\n".join(rewritten) + "\n")
    _prepare(runner, source, tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "openimages")
    _check_cells(prepared, "test", "validation", spec["verified"]["validation"], TRAINABLE,
                 need_positive=False)  # fmt: skip
