"""`spl data prepare` on fixture trees in every raw layout: row order, label rules, refusals."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from spl.data.common import SplError, atomic_path
from spl.data.prepared import load_prepared
from spl.data.sampling import observe_uniform, split_train_val
from spl.data.sources import read_voc12

from conftest import invoke
from rawfixtures import make_coco, make_cub, make_nuswide, make_voc, write_image


def _prepare(runner, name, source, root, *extra):
    return invoke(runner, ["data", "prepare", name, "--source", source, "--root", root, *extra])


def _check_observed(prepared):
    """Observed sets equal a replay of the rule on each whole source file (fresh RNG each)."""
    for name, params in prepared.observed_params.items():
        for src in ("trainval", "test"):
            expected = observe_uniform(
                prepared.labels[src], params["num_pos"], params["num_neg"], params["seed"]
            )
            np.testing.assert_array_equal(prepared.observed[name][src], expected)


def test_voc_rows_labels_and_split(tmp_path, runner):
    expected = make_voc(tmp_path / "raw")
    result = _prepare(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "voc12")
    assert "train" in result.output and "classes" in result.output
    for src, phase in (("trainval", "train"), ("test", "val")):
        ids = [Path(p).stem for p in prepared.images[src]]
        assert ids == list(expected[phase])  # sorted by name; difficult-only image dropped
        for row, image_id in enumerate(ids):
            assert list(np.nonzero(prepared.labels[src][row])[0]) == expected[phase][image_id]
    assert "2008_000005" not in [Path(p).stem for p in prepared.images["trainval"]]
    assert prepared.images["trainval"][0] == "VOC2012/JPEGImages/2007_000033.jpg"
    assert prepared.expected_positives == 1.5
    train, val = split_train_val(4)
    np.testing.assert_array_equal(prepared.split["train"], train)
    np.testing.assert_array_equal(prepared.split["val"], val)
    assert set(prepared.observed) == {"uniform-p1-n0-s1200", "uniform-p1-n1-s1200"}
    _check_observed(prepared)
    # every image decodes through the dataset's own path
    assert (prepared.image_root / prepared.images["test"][0]).is_file()


def test_voc_accepts_vocdevkit_parent(tmp_path):
    make_voc(tmp_path / "raw" / "VOCdevkit")
    raw = read_voc12(tmp_path / "raw")
    assert raw.images["trainval"][0].startswith("VOCdevkit/VOC2012/JPEGImages/")


def test_coco_ids_sorted_as_strings_and_crowd_counts(tmp_path, runner):
    make_coco(tmp_path / "raw")
    _prepare(runner, "coco14", tmp_path / "raw", tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "coco14")
    assert prepared.classes == ["person", "car", "dog"]
    ids = [int(Path(p).stem.split("_")[-1]) for p in prepared.images["trainval"]]
    assert ids == [100, 25, 9]  # "100" < "25" < "9"; image 7 has no annotation
    np.testing.assert_array_equal(prepared.labels["trainval"], [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    test_ids = [int(Path(p).stem.split("_")[-1]) for p in prepared.images["test"]]
    assert test_ids == [1000, 5]
    assert prepared.images["test"][0] == "val2014/COCO_val2014_000000001000.jpg"
    _check_observed(prepared)


def test_cub_is_present_and_split(tmp_path, runner):
    spec = make_cub(tmp_path / "raw")
    _prepare(runner, "cub", tmp_path / "raw", tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "cub")
    train_rows = [r for r, e in enumerate(spec["entries"]) if e[2] == 1]
    test_rows = [r for r, e in enumerate(spec["entries"]) if e[2] == 0]
    np.testing.assert_array_equal(prepared.labels["trainval"], spec["present"][train_rows])
    np.testing.assert_array_equal(prepared.labels["test"], spec["present"][test_rows])
    assert prepared.images["trainval"][0] == "CUB_200_2011/images/001.Albatross/a_1.jpg"
    assert len(prepared.classes) == 5 and prepared.expected_positives == 31.4
    _check_observed(prepared)


def test_nuswide_keeps_unlabeled_unless_asked(tmp_path, runner):
    spec = make_nuswide(tmp_path / "raw")
    result = _prepare(runner, "nuswide", tmp_path / "raw", tmp_path / "root")
    prepared = load_prepared(tmp_path / "root" / "nuswide")
    assert len(prepared.classes) == 81
    np.testing.assert_array_equal(prepared.labels["trainval"], spec["train"][1])
    assert (prepared.observed["uniform-p1-n0-s1200"]["trainval"][0] == 0).all()
    unlabeled = int((spec["train"][1].sum(1) == 0).sum() + (spec["val"][1].sum(1) == 0).sum())
    assert "dropped: 0" in result.output
    _prepare(runner, "nuswide", tmp_path / "raw", tmp_path / "root", "--drop-unlabeled", "--force")
    dropped = load_prepared(tmp_path / "root" / "nuswide")
    assert dropped.attrs["dropped_unlabeled"] == unlabeled > 0
    assert (dropped.labels["trainval"].sum(1) > 0).all()
    _check_observed(dropped)


def test_custom_csv_with_and_without_split(tmp_path, runner):
    images = tmp_path / "imgs"
    rows = ["image,labels,split"]
    for i in range(12):
        write_image(images / f"sub/{i}.png", seed=i, fmt="PNG")
        names = ["cat;dog", "dog", "", "bird;cat"][i % 4]
        rows.append(f"sub/{i}.png,{names},{'test' if i % 3 == 0 else 'train'}")
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    _prepare(
        runner, "custom", images, tmp_path / "root", "--csv", tmp_path / "a.csv", "--name", "pets"
    )
    prepared = load_prepared(tmp_path / "root" / "pets")
    assert prepared.name == "pets" and prepared.classes == ["bird", "cat", "dog"]
    assert list(prepared.images["test"]) == ["sub/0.png", "sub/3.png", "sub/6.png", "sub/9.png"]
    np.testing.assert_array_equal(
        prepared.labels["trainval"][:3], [[0, 0, 1], [0, 0, 0], [0, 1, 1]]
    )  # sub/1 dog, sub/2 none, sub/4 cat;dog
    # k for a custom dataset is the training mean
    assert prepared.expected_positives == pytest.approx(prepared.labels["trainval"].sum(1).mean())
    no_split = "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n"
    (tmp_path / "b.csv").write_text(no_split)
    _prepare(runner, "custom", images, tmp_path / "r2", "--csv", tmp_path / "b.csv")
    random_split = load_prepared(tmp_path / "r2" / "custom")
    assert len(random_split.images["test"]) == round(0.2 * 12)


def test_demo_is_deterministic_for_its_seed(tmp_path, runner):
    args = ["--train-images", 40, "--test-images", 20]
    for root in ("a", "b"):
        invoke(runner, ["data", "prepare", "demo", "--root", tmp_path / root, *args])
    a, b = load_prepared(tmp_path / "a" / "demo"), load_prepared(tmp_path / "b" / "demo")
    np.testing.assert_array_equal(a.labels["trainval"], b.labels["trainval"])
    np.testing.assert_array_equal(a.observed["uniform-p1-n0-s1200"]["trainval"],
                                  b.observed["uniform-p1-n0-s1200"]["trainval"])  # fmt: skip
    first = a.image_root / a.images["test"][3]
    assert first.read_bytes() == (b.image_root / b.images["test"][3]).read_bytes()
    assert a.fingerprint == b.fingerprint
    assert 1.0 < a.labels["trainval"].sum(1).mean() < 4.0
    assert set(np.nonzero(a.labels["trainval"].sum(0))[0]) == set(range(10))
    invoke(runner, ["data", "prepare", "demo", "--root", tmp_path / "c", *args, "--demo-seed", 1])
    c = load_prepared(tmp_path / "c" / "demo")
    assert not np.array_equal(a.labels["trainval"], c.labels["trainval"])


def test_demo_pools_are_disjoint():
    from sklearn.datasets import load_digits

    from spl.data.demo import scan_pools

    train, test = scan_pools(load_digits().target, np.random.RandomState(0), 1 / 3)
    assert not set(train) & set(test) and len(train) + len(test) == 1797


def test_info_prints_the_summary(tmp_path, runner, demo_small):
    result = invoke(runner, ["data", "info", demo_small])
    assert "train" in result.output and "128" in result.output  # 160 * 0.8 train rows
    as_json = invoke(runner, ["data", "info", demo_small, "--json"])
    assert '"images": 32' in as_json.output


def test_observe_adds_a_set(tmp_path, runner):
    make_voc(tmp_path / "raw")
    _prepare(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    invoke(runner, ["data", "observe", tmp_path / "root" / "voc12", "--num-pos", 2, "--seed", 7])
    prepared = load_prepared(tmp_path / "root" / "voc12")
    assert "uniform-p2-n0-s7" in prepared.observed
    _check_observed(prepared)


# ----------------------------------------------------------------------------- bad input


def test_missing_layout_names_path_and_expected_layout(tmp_path, runner):
    (tmp_path / "raw").mkdir()
    result = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    assert "VOC2012" in result.output and "Expected layout" in result.output
    make_voc(tmp_path / "raw")
    (tmp_path / "raw" / "VOC2012" / "ImageSets" / "Main" / "cow_val.txt").unlink()
    result = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    assert "cow_val.txt" in result.output
    result = _prepare_fail(runner, "cub", tmp_path / "raw", tmp_path / "root")
    assert "images.txt" in result.output


def _prepare_fail(runner, name, source, root, *extra):
    return invoke(
        runner, ["data", "prepare", name, "--source", source, "--root", root, *extra], ok=False
    )


def test_malformed_annotations_name_file_and_key(tmp_path, runner):
    make_coco(tmp_path / "raw")
    path = tmp_path / "raw" / "annotations" / "instances_val2014.json"
    path.write_text(path.read_text().replace('"categories"', '"kategorien"'))
    result = _prepare_fail(runner, "coco14", tmp_path / "raw", tmp_path / "root")
    assert "instances_val2014.json" in result.output and "'categories'" in result.output
    path.write_text("{not json")
    assert (
        "not valid JSON" in _prepare_fail(runner, "coco14", tmp_path / "raw", tmp_path / "r").output
    )


def test_escaping_image_paths_are_refused(tmp_path, runner):
    images = tmp_path / "imgs"
    write_image(images / "a.png", 0, fmt="PNG")
    for bad in ("../outside.png", "/etc/passwd"):
        (tmp_path / "x.csv").write_text(f"image,labels\na.png,cat\n{bad},dog\n")
        result = _prepare_fail(
            runner, "custom", images, tmp_path / "root", "--csv", tmp_path / "x.csv"
        )
        assert "x.csv, line 3" in result.output and "image root" in result.output


def test_missing_images_are_named(tmp_path, runner):
    make_voc(tmp_path / "raw")
    (tmp_path / "raw" / "VOC2012" / "JPEGImages" / "2010_000003.jpg").unlink()
    result = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    assert "2010_000003.jpg" in result.output and "--allow-missing" in result.output
    _prepare(runner, "voc12", tmp_path / "raw", tmp_path / "root", "--allow-missing")


def test_existing_labels_are_not_overwritten_without_force(tmp_path, runner):
    make_voc(tmp_path / "raw")
    _prepare(runner, "voc12", tmp_path / "raw", tmp_path / "root")
    target = tmp_path / "root" / "voc12" / "labels.h5"
    before = target.read_bytes()
    result = _prepare_fail(runner, "voc12", tmp_path / "raw", tmp_path / "root", "--seed", 3)
    assert "--force" in result.output and target.read_bytes() == before
    _prepare(runner, "voc12", tmp_path / "raw", tmp_path / "root", "--seed", 3, "--force")
    assert "uniform-p1-n0-s3" in load_prepared(target.parent).observed


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "labels.h5"
    target.write_bytes(b"earlier")
    with pytest.raises(RuntimeError), atomic_path(target, force=True) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5["x"] = np.arange(3)
        raise RuntimeError("killed mid-way")
    assert target.read_bytes() == b"earlier"
    assert list(tmp_path.iterdir()) == [target]
    with pytest.raises(SplError, match="--force"), atomic_path(target):
        pass


def test_not_a_prepared_dataset(tmp_path, runner):
    result = invoke(runner, ["data", "info", tmp_path], ok=False)
    assert "spl data prepare" in result.output
    (tmp_path / "labels.h5").write_bytes(b"garbage")
    assert "not a readable HDF5" in invoke(runner, ["data", "info", tmp_path], ok=False).output
