"""Bad raw input and bad options refused with one line naming the file, line or option.

Each case here once gave a traceback, was accepted silently, or failed obscurely.
"""

import json
import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from spl.data.common import SplError
from spl.data.images import ImageDataset, build_transform
from spl.data.prepared import load_prepared
from spl.data.sampling import observe_uniform, split_train_val

from conftest import invoke
from rawfixtures import make_coco, make_cub, make_custom, make_voc


def _fail(runner, *args) -> str:
    """Run `spl ARGS`, expect a refusal printed as a message (not a traceback); return it."""
    output = invoke(runner, list(args), ok=False).output
    assert output.startswith("Error: ") and "Traceback" not in output, output
    return output


def _prepare_fail(runner, name, source, root, *extra) -> str:
    return _fail(runner, "data", "prepare", name, "--source", source, "--root", root, *extra)


# ----------------------------------------------------------------------------- A: VOC


def test_voc_non_utf8_class_list_names_file_and_line(tmp_path, runner):
    make_voc(tmp_path / "raw")
    path = tmp_path / "raw" / "VOC2012" / "ImageSets" / "Main" / "cat_train.txt"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"2007_000033 \xe91\n"  # a Latin-1 byte on line 3
    path.write_bytes(b"".join(lines))
    output = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    assert "cat_train.txt, line 3" in output and "UTF-8" in output
    assert not (tmp_path / "root" / "voc12" / "labels.h5").exists()


def test_cub_non_utf8_and_non_integer_ids_name_file_and_line(tmp_path, runner):
    make_cub(tmp_path / "raw")
    images_txt = tmp_path / "raw" / "CUB_200_2011" / "images.txt"
    original = images_txt.read_bytes()
    images_txt.write_bytes(original.replace(b"a_2.jpg", b"a_\xff.jpg"))
    output = _prepare_fail(runner, "cub", tmp_path / "raw", tmp_path / "root")
    assert "images.txt, line 2" in output and "UTF-8" in output
    images_txt.write_bytes(original.replace(b"3 002", b"x3 002"))
    output = _prepare_fail(runner, "cub", tmp_path / "raw", tmp_path / "root")
    assert "images.txt, line 3" in output and "'x3'" in output


# ----------------------------------------------------------------------------- B: COCO


def _coco_file(root, phase="train2014"):
    return root / "annotations" / f"instances_{phase}.json"


def test_coco_non_utf8_names_file_and_line(tmp_path, runner):
    make_coco(tmp_path / "raw")
    path = _coco_file(tmp_path / "raw")
    data = json.loads(path.read_text())
    text = json.dumps(data, indent=1).replace("COCO_train2014_000000000025", "caf\udce9", 1)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "caf" in t)
    output = _prepare_fail(runner, "coco14", tmp_path / "raw", tmp_path / "root")
    assert f"instances_train2014.json, line {line}" in output and "UTF-8" in output


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda data: None, ["top level is null", "JSON object"]),
        (lambda data: [data], ["top level is a list", "JSON object"]),
        (lambda data: {**data, "images": [1, 2]}, ["images[0] is a number", "object"]),
        (lambda data: {**data, "annotations": {"a": 1}}, ["'annotations' must be a list"]),
        (lambda data: {**data, "categories": "person"}, ["'categories' must be a list"]),
        (
            lambda data: {**data, "annotations": [*data["annotations"][:2], {"image_id": 9}]},
            ["annotations[2] lacks the key 'category_id'"],
        ),
        (
            lambda data: {**data, "annotations": [{"image_id": [9], "category_id": 1}]},
            ["annotations[0]", "'image_id'", "integer"],
        ),
        (
            lambda data: {**data, "images": [{"id": 9, "file_name": None}]},
            ["images[0]", "'file_name'", "string"],
        ),
    ],
    ids=["null", "list", "images-not-objects", "annotations-dict", "categories-string",
         "missing-key", "unhashable-id", "file-name-null"],
)  # fmt: skip
def test_coco_malformed_structure_names_file_and_entry(tmp_path, runner, change, expected):
    make_coco(tmp_path / "raw")
    path = _coco_file(tmp_path / "raw")
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    output = _prepare_fail(runner, "coco14", tmp_path / "raw", tmp_path / "root")
    assert "instances_train2014.json" in output
    for text in expected:
        assert text in output


# ----------------------------------------------------------------------------- C: custom CSV

IMAGES = tuple(f"img{i}.png" for i in range(8))


def _custom_csv(header: str, line3: str = "", *, split: bool = False) -> str:
    """A CSV valid on its own (8 images, some without a positive), with ``line3`` put on
    line 3 when given."""
    rows = []
    for i in range(8):
        row = f"img{i}.png,{['cat', 'dog', 'cat;dog', ''][i % 4]}"
        rows.append(f"{row},{'test' if i % 3 else 'train'}" if split else row)
    if line3:
        rows.insert(1, line3)
    return "\n".join([header, *rows]) + "\n"


def _custom_fail(runner, tmp_path, csv: str | bytes, *extra) -> str:
    folder, path = make_custom(tmp_path / "raw", csv, IMAGES)
    return _prepare_fail(runner, "custom", folder, tmp_path / "root", "--csv", path, *extra)


def test_custom_non_utf8_names_file_and_line(tmp_path, runner):
    csv = _custom_csv("image,labels", "img7.png,dog").encode().replace(b"dog", b"d\xf6g", 1)
    output = _custom_fail(runner, tmp_path, csv)
    assert "labels.csv, line 3" in output and "UTF-8" in output


def test_custom_row_with_more_fields_than_header_is_refused(tmp_path, runner):
    output = _custom_fail(runner, tmp_path, _custom_csv("image,labels", "img7.png,cat,dog"))
    assert "labels.csv, line 3" in output and "3 fields" in output and "';'" in output


def test_custom_row_with_fewer_fields_than_header_is_refused(tmp_path, runner):
    output = _custom_fail(runner, tmp_path, _custom_csv("image,labels", "img7.png"))
    assert "labels.csv, line 3" in output and "1 field" in output and "'img7.png,'" in output


def test_custom_empty_labels_field_means_no_positive(tmp_path, runner):
    folder, path = make_custom(
        tmp_path / "raw", _custom_csv("image,labels,split", split=True), IMAGES
    )
    invoke(runner, ["data", "prepare", "custom", "--source", folder, "--root", tmp_path / "root",
                    "--csv", path])  # fmt: skip
    prepared = load_prepared(tmp_path / "root" / "custom")
    assert list(prepared.images["trainval"]) == ["img0.png", "img3.png", "img6.png"]
    np.testing.assert_array_equal(prepared.labels["trainval"], [[1, 0], [0, 0], [1, 1]])


@pytest.mark.parametrize("header", ["image,labels,Split", "image,labels,notes", "image,labels,"])
def test_custom_unknown_column_is_refused(tmp_path, runner, header):
    column = header.split(",")[2]
    output = _custom_fail(runner, tmp_path, _custom_csv(header, split=True))
    assert f"unknown column {column!r}" in output and "image, labels, split" in output


def test_custom_repeated_column_is_refused(tmp_path, runner):
    output = _custom_fail(runner, tmp_path, _custom_csv("image,labels,labels", split=True))
    assert "'labels' appears twice" in output


@pytest.mark.parametrize(
    "header,line3,split",
    [
        ("image,labels", "./img5.png,dog", False),
        ("image,labels,split", "img5.png,cat,train", True),
        ("image,labels,split", ".\\img5.png,cat,test", True),
    ],
    ids=["same-file", "train-and-test", "backslash-same-split"],
)
def test_custom_duplicate_image_rows_are_refused(tmp_path, runner, header, line3, split):
    output = _custom_fail(runner, tmp_path, _custom_csv(header, line3, split=split))
    assert "lines 3 and 8" in output and "'img5.png'" in output


def test_custom_missing_classes_file_is_named(tmp_path, runner):
    missing = tmp_path / "classes.txt"
    output = _custom_fail(runner, tmp_path, _custom_csv("image,labels"), "--classes", missing)
    assert f"--classes {missing} not found" in output


@pytest.mark.parametrize("value", ["nan", "inf", "0", "1"])
def test_custom_test_fraction_outside_open_interval_is_refused(tmp_path, runner, value):
    output = _custom_fail(runner, tmp_path, _custom_csv("image,labels"), "--test-fraction", value)
    assert "--test-fraction" in output and "(0, 1)" in output


# ----------------------------------------------------------------------------- D: sampling


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--num-pos", -3, "--num-pos must be >= 1, or -1 for all; got -3"),
        ("--num-pos", 0, "--num-pos must be >= 1, or -1 for all; got 0"),
        ("--num-neg", -2, "--num-neg must be >= 0, or -1 for all; got -2"),
    ],
)
def test_prepare_refuses_bad_observed_counts(tmp_path, runner, option, value, message):
    make_voc(tmp_path / "raw")
    output = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root", option, value)
    assert message in output
    assert not (tmp_path / "root" / "voc12").exists()


@pytest.mark.parametrize(
    "option,value,message",
    [("--num-pos", 0, "--num-pos must be >= 1"), ("--num-neg", -2, "--num-neg must be >= 0")],
)
def test_observe_refuses_bad_observed_counts(tmp_path, runner, option, value, message):
    make_voc(tmp_path / "raw")
    invoke(runner, ["data", "prepare", "voc12", "--source", tmp_path / "raw", "--root",
                    tmp_path / "root"])  # fmt: skip
    labels = tmp_path / "root" / "voc12" / "labels.h5"
    before = labels.read_bytes()
    output = _fail(runner, "data", "observe", labels.parent, option, value)
    assert message in output and "-1 for all" in output
    assert labels.read_bytes() == before


def test_import_features_refuses_bad_observed_counts(tmp_path, runner):
    rng = np.random.RandomState(0)
    files = {}
    for src, n in (("train", 12), ("test", 6)):
        labels = (rng.rand(n, 3) < 0.5).astype(np.uint8)
        labels[:, 0] = 1
        files[f"--{src}-features"] = tmp_path / f"{src}_x.npy"
        files[f"--{src}-labels"] = tmp_path / f"{src}_y.npy"
        np.save(files[f"--{src}-features"], rng.rand(n, 4).astype(np.float32))
        np.save(files[f"--{src}-labels"], labels)
    args = [a for option, path in files.items() for a in (option, path)]
    for option, value in (("--num-pos", -3), ("--num-pos", 0), ("--num-neg", -2)):
        output = _fail(runner, "import-features", tmp_path / "mine", *args, option, value)
        assert f"{option} must be >= " in output and f"got {value}" in output
        assert not (tmp_path / "mine" / "labels.h5").exists()


def test_observe_uniform_refuses_bad_counts_and_keeps_valid_ones():
    labels = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    for num_pos, num_neg, option in ((0, 0, "--num-pos"), (-3, 0, "--num-pos"),
                                     (1, -2, "--num-neg"), (1.5, 0, "--num-pos")):  # fmt: skip
        with pytest.raises(SplError, match=f"{option} must be"):
            observe_uniform(labels, num_pos, num_neg)
    assert (observe_uniform(labels, 1, 0) == -1).sum() == 0  # num_neg 0 is valid
    assert (observe_uniform(labels, -1, 0) == 1).sum() == 2


# ----------------------------------------------------------------------------- E: fractions


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan"])
def test_val_fraction_outside_open_interval_is_refused(tmp_path, runner, value):
    make_voc(tmp_path / "raw")
    output = _prepare_fail(
        runner, "voc12", tmp_path / "raw", tmp_path / "root", "--val-fraction", value
    )
    assert "--val-fraction must be" in output and "(0, 1)" in output
    assert not (tmp_path / "root" / "voc12").exists()


def test_split_train_val_refuses_nan():
    with pytest.raises(SplError, match="--val-fraction"):
        split_train_val(10, math.nan)


# ----------------------------------------------------------------------------- F: images


def test_missing_image_in_a_dataloader_worker_names_the_path(demo_small, tmp_path):
    """A worker's error reaches the main process as one line naming the image (torch wraps
    it in a traceback text that the command line would print in full)."""
    prepared = load_prepared(demo_small)
    dataset = ImageDataset(prepared, "test", build_transform(32), image_root=tmp_path)
    loader = DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(SplError) as raised:
        next(iter(loader))
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message == f"test split, test row 0: image not found: {dataset.path(0)}"


# ------------------------------------------------------- users' arrays: import-*


def _user_files(folder, n_train=160, n_test=80, dim=4, classes=10):
    """Good inputs of both import commands: features, 0/1 labels and scores per file."""
    rng = np.random.default_rng(0)
    files = {}
    for name, rows in (("train", n_train), ("test", n_test)):
        for kind, array in (
            ("features", rng.normal(size=(rows, dim)).astype(np.float32)),
            ("labels", (rng.random((rows, classes)) < 0.3).astype(np.uint8)),
            ("scores", rng.normal(size=(rows, classes)).astype(np.float32)),
        ):
            files[f"{name}-{kind}"] = folder / f"{name}-{kind}.npy"
            np.save(files[f"{name}-{kind}"], array)
    return files


def _bad_array_file(path, kind):
    """A file a user might pass for a .npy array, and is not one."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "npz":
        with open(path, "wb") as handle:  # np.savez would add .npz to a str name
            np.savez(handle, scores=np.zeros((160, 10)))
    elif kind == "csv":
        np.savetxt(path, np.zeros((160, 10)), delimiter=",")
    elif kind == "objects":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "strings":
        np.save(path, np.full((160, 10), "0.5"))
    elif kind == "truncated":
        np.save(path, np.zeros((160, 10), np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "1-d":
        np.save(path, np.zeros(160, np.float32))
    return path


BAD_ARRAYS = {
    "empty": "is empty (0 bytes)",
    "npz": "is a .npz archive (arrays scores; save the one you mean with numpy.save)",
    "csv": "is not a .npy file (it starts with b'0.0000",
    "objects": "holds Python objects (an object array), not numbers",
    "strings": "holds <U3 values, not numbers",
    "truncated": "is a damaged",
    "1-d": "holds an array of shape [160]",
}


@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_import_scores_refuses_a_file_that_is_not_a_npy_array_naming_it(
    demo_small, tmp_path, runner, kind
):
    import shutil

    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset, ignore=shutil.ignore_patterns("features", "scores"))
    files = _user_files(tmp_path)
    bad = _bad_array_file(tmp_path / "bad-train.npy", kind)
    output = _fail(runner, "import-scores", dataset, "--train", bad, "--test", files["test-scores"])
    output = output.replace("\n", " ")
    assert f"{bad} {BAD_ARRAYS[kind]}" in output
    assert (
        "expected the trainval scores: a .npy file (numpy.save) holding a float array of "
        "shape [160, 10] (the rows of the trainval file, classes)"
    ) in output
    tiles = _bad_array_file(tmp_path / "bad-tiles.npy", kind)
    args = ["--train-tiles", tiles, "--test-tiles", tiles]
    output = _fail(runner, "import-scores", dataset, "--train", files["train-scores"],
                   "--test", files["test-scores"], *args).replace("\n", " ")  # fmt: skip
    assert f"{tiles} " in output and "shape [160, g*g, 10] (the rows of the trainval" in output
    assert not (dataset / "scores").exists()


@pytest.mark.parametrize("option", ["--train-features", "--test-labels"])
@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_import_features_refuses_a_file_that_is_not_a_npy_array_naming_it(
    tmp_path, runner, kind, option
):
    files = _user_files(tmp_path)
    given = {f"--{n}": files[n] for n in ("train-features", "train-labels")}
    given |= {f"--{n}": files[n] for n in ("test-features", "test-labels")}
    given[option] = _bad_array_file(tmp_path / "bad.npy", kind)
    args = [a for pair in given.items() for a in pair]
    output = _fail(runner, "import-features", tmp_path / "mine", *args).replace("\n", " ")
    assert f"{given[option]} {BAD_ARRAYS[kind].replace('[160]', '')}" in output
    if option == "--train-features":
        expected = "the training features: a .npy file (numpy.save) holding a float array of "
        assert expected + "shape [N, D]" in output
    else:
        expected = "the test labels: a .npy file (numpy.save) holding a 0/1 array of shape"
        assert expected + " [N, L]" in output
    assert not (tmp_path / "mine").exists()


def test_import_commands_name_a_missing_or_undecodable_file_in_the_api(demo_small, tmp_path):
    from spl.imported import import_arrays, import_scores

    files = _user_files(tmp_path)
    with pytest.raises(SplError, match=r"gone\.npy not found; expected the test scores"):
        import_scores(demo_small, train=files["train-scores"], test=tmp_path / "gone.npy")
    (tmp_path / "classes.txt").write_bytes(b"caf\xe9\n")
    given = {k.replace("-", "_"): v for k, v in files.items() if "scores" not in k}
    with pytest.raises(SplError, match=r"cannot read class names from .*classes\.txt"):
        import_arrays(tmp_path / "mine", classes_file=tmp_path / "classes.txt", **given)


def _import_args(files, **replaced):
    given = {f"--{n}": files[n] for n in ("train-features", "train-labels")}
    given |= {f"--{n}": files[n] for n in ("test-features", "test-labels")}
    given |= {f"--{option.replace('_', '-')}": path for option, path in replaced.items()}
    return [a for pair in given.items() for a in pair]


def test_import_features_refuses_bad_content_in_any_block_leaving_nothing(
    tmp_path, runner, monkeypatch
):
    """Arrays are read in blocks (here of 4 rows): a NaN row or a label that is not 0/1 is
    refused wherever it lies, the rows named as when the arrays were read whole, and the
    refusal leaves no file and no folder behind."""
    import spl.imported

    monkeypatch.setattr(spl.imported, "BLOCK_BYTES", 4 * 4 * 4)  # 4 rows of 4 features
    files = _user_files(tmp_path)
    features = np.load(files["train-features"])
    features[[3, 17, 18, 40, 41]] = np.nan
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, train_features=_save(tmp_path, "nan5", features)))  # fmt: skip
    assert "nan5.npy: NaN or infinite features in rows 3, 17, 18, 40, 41" in output
    assert "..." not in output
    features[150, 2] = np.inf
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, train_features=_save(tmp_path, "nan6", features)))  # fmt: skip
    assert "nan6.npy: NaN or infinite features in rows 3, 17, 18, 40, 41 ..." in output
    labels = np.load(files["test-labels"]).astype(np.int64)
    labels[57, 3] = 2
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, test_labels=_save(tmp_path, "two", labels)))  # fmt: skip
    assert "two.npy: labels must be 0/1 (row 57 is not)" in output
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, test_features=_save(tmp_path, "wide", np.zeros((80, 5)))))  # fmt: skip
    assert "differ in feature dimension" in output
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, test_labels=_save(tmp_path, "narrow", np.zeros((80, 9)))))  # fmt: skip
    assert "differ in the number of classes" in output
    output = _fail(runner, "import-features", tmp_path / "mine", *_import_args(
        files, test_labels=_save(tmp_path, "short", np.zeros((79, 10)))))  # fmt: skip
    assert "test-features.npy has 80 rows but" in output and "short.npy has 79" in output
    assert not (tmp_path / "mine").exists()


def test_import_scores_refuses_non_finite_scores_in_any_block_leaving_nothing(
    demo_small, tmp_path, runner, monkeypatch
):
    import shutil

    import spl.imported

    monkeypatch.setattr(spl.imported, "BLOCK_BYTES", 8 * 10 * 4)  # 8 rows of 10 scores
    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset, ignore=shutil.ignore_patterns("features", "scores"))
    files = _user_files(tmp_path)
    scores = np.load(files["train-scores"])
    scores[[5, 70, 71, 150]] = np.nan
    bad = _save(tmp_path, "bad-scores", scores)
    output = _fail(runner, "import-scores", dataset, "--train", bad, "--test", files["test-scores"])
    prepared = load_prepared(dataset)
    from spl.extract.features import split_row_name

    named = [f"row {r} ({split_row_name(prepared, 'trainval', r).split(' (')[0]})"
             for r in (5, 70, 71)]  # fmt: skip
    assert f"bad-scores.npy: NaN or infinite scores in {', '.join(named)} and 1 more" in output
    tiles = np.zeros((80, 4, 10))
    tiles[79, 3, 9] = -np.inf
    args = ["--train-tiles", _save(tmp_path, "tiles", np.zeros((160, 4, 10))),
            "--test-tiles", _save(tmp_path, "bad-tiles", tiles)]  # fmt: skip
    output = _fail(runner, "import-scores", dataset, "--train", files["train-scores"],
                   "--test", files["test-scores"], *args)  # fmt: skip
    assert "bad-tiles.npy: NaN or infinite scores in row 79" in output and "more" not in output
    assert not (dataset / "scores").exists()


def _save(folder, name, array):
    path = folder / f"{name}.npy"
    np.save(path, array)
    return path
