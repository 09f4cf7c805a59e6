"""Biased single-positive sets (`spl data observe --bias`, docs/methods.md section 11): the
weights from known areas, boxes and clicks, the draw's frequencies and parity with the
release's use of Python's `random`, the set in labels.h5, and the refusals."""

import json
import random

import h5py
import numpy as np
import pytest

from spl.data import bias
from spl.data.common import SplError
from spl.data.prepared import add_observed_set, load_prepared

from conftest import invoke
from rawfixtures import (
    COCO_CLASS_WEIGHTS,
    COCO_CLICK_WEIGHTS,
    COCO_CLICKS,
    COCO_INSTANCES,
    COCO_INSTANCES_ROWS,
    COCO_INSTANCES_WEIGHTS,
    make_voc,
    write_clicks,
    write_coco,
)

PHASE = {"trainval": "train2014", "test": "val2014"}
CLASSES = ["person", "car", "dog"]


@pytest.fixture
def coco(tmp_path, runner):
    """COCO_INSTANCES prepared with `spl data prepare coco14`: (dataset folder, raw folder)."""
    raw = tmp_path / "raw"
    write_coco(raw, COCO_INSTANCES)
    invoke(runner, ["data", "prepare", "coco14", "--source", raw, "--root", tmp_path / "root"])
    return tmp_path / "root" / "coco14", raw


def _instances(raw, src, **need):
    path = raw / "annotations" / f"instances_{PHASE[src]}.json"
    return bias.read_instances(path, PHASE[src], **need)


def _normalised(values):
    values = np.asarray(values, dtype=float)
    return values / values.sum() if values.sum() else values


def _chi_square_ok(counts, probabilities, alpha=1e-3) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` against ``probabilities`` (cells with p > 0) and
    the critical value at ``alpha``; a cell with p = 0 must have no count at all."""
    counts, probabilities = np.asarray(counts, float), np.asarray(probabilities, float)
    assert counts[probabilities == 0].sum() == 0, (counts, probabilities)
    keep = probabilities > 0
    expected = counts.sum() * probabilities[keep]
    statistic = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    try:
        from scipy.stats import chi2

        critical = float(chi2.ppf(1 - alpha, df))
    except ImportError:  # tabulated chi-square critical values at alpha = 0.001
        critical = {1: 10.828, 2: 13.816, 3: 16.266}[df]
    return statistic, critical


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("src", ["trainval", "test"])
def test_size_and_location_weights_are_the_hand_computed_ones(coco, src):
    _, raw = coco
    file = _instances(raw, src, areas=True, boxes=True, sizes=True)
    assert file.image_ids == COCO_INSTANCES_ROWS[src]  # sorted as decimal strings
    size = bias.image_weights("size", file, 3)
    location = bias.image_weights("location", file, 3)
    for row, image_id in enumerate(file.image_ids):
        expected_size, inverse_distance = COCO_INSTANCES_WEIGHTS[image_id]
        assert size[row] == pytest.approx(expected_size, abs=1e-12)
        # the release's per-image constant scales every weight alike: compare shares
        assert _normalised(location[row]) == pytest.approx(
            _normalised(inverse_distance), rel=1e-12, abs=1e-15
        )


def test_location_centre_hit_counts_as_0_0005_and_boxes_read_as_x_y_w_h():
    # one box centred on the image centre, one 10 px away: 1/0.0005 against 1/10
    centred = bias.Instance(0, box=(40.0, 40.0, 20.0, 20.0))  # [x, y, w, h]: centre (50, 50)
    near = bias.Instance(1, box=(55.0, 45.0, 10.0, 10.0))  # centre (60, 50)
    weights = bias.location_weights([centred, near], 100, 100, 2)
    assert weights[0] / weights[1] == pytest.approx((1 / 0.0005) / (1 / 10))
    # read as [x1, y1, x2, y2] the first box's centre would be (30, 30), d = 28.3
    assert weights[0] / weights[1] > 1000


def test_size_weight_sums_instances_of_a_class():
    instances = [bias.Instance(0, 30.0), bias.Instance(1, 60.0), bias.Instance(0, 10.0)]
    assert bias.size_weights(instances, 3) == pytest.approx([0.4, 0.6, 0.0])
    assert bias.size_weights([bias.Instance(2, 0.0)], 3) == [0.0, 0.0, 0.0]


def test_click_weights_count_as_the_release_with_the_papers_box(coco, tmp_path):
    _, raw = coco
    val = _instances(raw, "test", boxes=True, sizes=True)
    folder = write_clicks(tmp_path / "clicks")
    per_file = {}
    for name, expected in COCO_CLICK_WEIGHTS.items():
        clicks = bias.read_clicks(folder / name, val)
        assert len(clicks) == len(COCO_CLICKS[name])
        per_file[name] = bias.click_weights(clicks, val.instances, val.sizes, 3)
        assert per_file[name] == pytest.approx(expected)
    assert bias.semantic_class_weights(per_file, CLASSES) == pytest.approx(COCO_CLASS_WEIGHTS)
    # the annotate file's dog click (25, 60) lies in the dog box [10, 50, 30, 20]; the
    # release's reading (y <= box[2] = 30) would call it bad and give dog 0 there
    assert bias.box_contains([10, 50, 30, 20], 25, 60)


# ----------------------------------------------------------------------------- the draw


def _frequencies(weights, positives, seeds):
    counts = np.zeros((len(weights), len(weights[0])), dtype=np.int64)
    for seed in seeds:
        counts += bias.draw_single_positive(weights, positives, seed)
    return counts


@pytest.mark.parametrize("kind", ["size", "location", "semantic"])
def test_draw_frequencies_over_seeds_match_the_weights(coco, kind):
    """Over 3,000 seeds, each row's draws follow weight / sum (Pearson chi-square at
    alpha = 0.001; rows whose expected counts are too small for the test are only checked
    never to draw a class the image lacks); all-zero rows are uniform over the positives."""
    _, raw = coco
    file = _instances(raw, "trainval", areas=True, boxes=True, sizes=True)
    weights = bias.image_weights(kind, file, 3, COCO_CLASS_WEIGHTS)
    positives = [file.positives(i) for i in file.image_ids]
    counts = _frequencies(weights, positives, range(3000))
    assert (counts.sum(axis=1) == 3000).all()
    tested = 0
    for row, image_id in enumerate(file.image_ids):
        probabilities = _normalised(weights[row])
        if not probabilities.sum():  # image 31 under size: no area, uniform
            probabilities = np.isin(np.arange(3), positives[row]) / len(positives[row])
        assert (counts[row][probabilities == 0] == 0).all(), (image_id, counts[row])
        if (probabilities > 0).sum() > 1 and (3000 * probabilities[probabilities > 0]).min() >= 5:
            statistic, critical = _chi_square_ok(counts[row], probabilities)
            assert statistic < critical, (kind, image_id, counts[row], probabilities)
            tested += 1
    assert tested >= 2


def test_all_zero_rows_are_drawn_uniformly_over_the_positives():
    weights, positives = [[0.0, 0.0, 0.0, 0.0, 0.0]], [[1, 4]]
    counts = _frequencies(weights, positives, range(2000))[0]
    statistic, critical = _chi_square_ok(counts, [0, 0.5, 0, 0, 0.5])
    assert statistic < critical and counts[[0, 2, 3]].sum() == 0
    # the release: random.choice over the positives in column order
    random.seed(7)
    expected = random.choice([1, 4])
    assert bias.draw_single_positive(weights, positives, 7)[0, expected] == 1


def test_draw_replays_the_releases_random_calls(coco):
    """random.seed(seed), then per row in order choices(range(L), weights)[0], or choice
    of the positives when they all weigh 0: the module-level calls the release makes."""
    _, raw = coco
    file = _instances(raw, "trainval", areas=True)
    weights = bias.image_weights("size", file, 3)
    positives = [file.positives(i) for i in file.image_ids]
    for seed in (1200, 0, 5):
        random.seed(seed)
        expected = np.zeros((4, 3), dtype=np.int8)
        for row, row_weights in enumerate(weights):
            if any(row_weights):
                expected[row, random.choices(range(3), weights=row_weights)[0]] = 1
            else:
                expected[row, random.choice(positives[row])] = 1
        np.testing.assert_array_equal(bias.draw_single_positive(weights, positives, seed), expected)


def test_draw_is_deterministic_for_a_seed_and_leaves_global_random_alone(coco):
    dataset, raw = coco
    prepared = load_prepared(dataset)
    random.seed(99)
    state = random.getstate()
    a, params = bias.observe_biased(prepared, "location", 1200)
    assert random.getstate() == state
    b, _ = bias.observe_biased(prepared, "location", 1200, source=raw)
    for src in ("trainval", "test"):
        np.testing.assert_array_equal(a[src], b[src])
        assert a[src].dtype == np.int8 and (a[src].sum(axis=1) == 1).all()
        assert (prepared.labels[src][a[src] == 1] == 1).all()  # always a true positive
    assert params == {"bias": "location", "seed": 1200, "num_pos": 1, "num_neg": 0}
    seeds = [bias.observe_biased(prepared, "size", s)[0]["trainval"] for s in range(6)]
    assert len({s.tobytes() for s in seeds}) > 1


# ----------------------------------------------------------------------------- labels.h5


def test_observe_bias_size_end_to_end(coco, runner):
    dataset, raw = coco
    result = invoke(runner, ["data", "observe", dataset, "--bias", "size"])
    assert "size-p1-s1200" in result.output and "--observed size-p1-s1200" in result.output
    prepared = load_prepared(dataset)
    assert set(prepared.observed) == {"uniform-p1-n0-s1200", "uniform-p1-n1-s1200", "size-p1-s1200"}
    assert prepared.observed_params["size-p1-s1200"] == {
        "bias": "size", "seed": 1200, "num_pos": 1, "num_neg": 0,
    }  # fmt: skip
    assert prepared.observed_params["uniform-p1-n1-s1200"]["bias"] == "uniform"
    # what fit-linear reads to offer IU sets still sees only the set with a negative
    with_negatives = [n for n, p in prepared.observed_params.items() if p.get("num_neg", 0)]
    assert with_negatives == ["uniform-p1-n1-s1200"]
    for src in ("trainval", "test"):
        observed = prepared.observed_set("size-p1-s1200")[src]
        assert observed.shape == prepared.labels[src].shape and observed.dtype == np.int8
        assert (observed.sum(axis=1) == 1).all() and set(np.unique(observed)) <= {0, 1}
        file = _instances(raw, src, areas=True)
        expected = bias.draw_single_positive(
            bias.image_weights("size", file, 3), [file.positives(i) for i in file.image_ids], 1200
        )
        np.testing.assert_array_equal(observed, expected)
    with h5py.File(dataset / "labels.h5") as h5:
        assert h5["observed/size-p1-s1200"].attrs["bias"] == "size"
    # another seed is another set; the same one again needs --force
    invoke(runner, ["data", "observe", dataset, "--bias", "size", "--seed", 3])
    assert "size-p1-s3" in load_prepared(dataset).observed
    again = invoke(runner, ["data", "observe", dataset, "--bias", "size"], ok=False)
    assert "--force" in again.output
    invoke(runner, ["data", "observe", dataset, "--bias", "size", "--force"])


def test_observe_bias_semantic_records_the_click_digest(coco, runner, tmp_path):
    dataset, raw = coco
    clicks = write_clicks(tmp_path / "clicks")
    invoke(runner, ["data", "observe", dataset, "--bias", "semantic", "--clicks", clicks])
    prepared = load_prepared(dataset)
    params = prepared.observed_params["semantic-p1-s1200"]
    assert params["bias"] == "semantic" and params["clicks_sha256"] == bias.clicks_digest(clicks)
    for src in ("trainval", "test"):
        file = _instances(raw, src)
        weights = bias.image_weights("semantic", file, 3, COCO_CLASS_WEIGHTS)
        expected = bias.draw_single_positive(
            weights, [file.positives(i) for i in file.image_ids], 1200
        )
        np.testing.assert_array_equal(prepared.observed["semantic-p1-s1200"][src], expected)


def test_add_observed_set_location_through_the_api(coco):
    dataset, _ = coco
    name = add_observed_set(dataset, seed=4, bias="location")
    assert name == "location-p1-s4"
    assert load_prepared(dataset).observed_params[name]["seed"] == 4


# ----------------------------------------------------------------------------- refusals


def _fail(runner, *args) -> str:
    output = invoke(runner, ["data", "observe", *args], ok=False).output
    assert output.startswith("Error: ") and "Traceback" not in output, output
    return output


def test_bias_without_instance_annotations_names_the_missing_file(tmp_path, runner):
    make_voc(tmp_path / "raw")
    invoke(runner, ["data", "prepare", "voc12", "--source", tmp_path / "raw", "--root", tmp_path])
    output = _fail(runner, tmp_path / "voc12", "--bias", "size")
    assert "annotations/instances_train2014.json not found" in output


def test_bias_with_a_missing_val_file_names_it(coco, runner):
    dataset, raw = coco
    (raw / "annotations" / "instances_val2014.json").unlink()
    output = _fail(runner, dataset, "--bias", "location")
    assert "instances_val2014.json not found" in output


def test_clicks_missing_classes_are_named(coco, runner, tmp_path):
    dataset, _ = coco
    clicks = {name: list(rows) for name, rows in COCO_CLICKS.items()}
    spotting = "crowdsourcing_instance_spotting_val2014.json"
    clicks[spotting] = [c for c in clicks[spotting] if c[1] != 18]  # no dog click left
    folder = write_clicks(tmp_path / "clicks", clicks)
    output = _fail(runner, dataset, "--bias", "semantic", "--clicks", folder)
    assert spotting in output and "classes: dog;" in output
    (folder / spotting).unlink()
    output = _fail(runner, dataset, "--bias", "semantic", "--clicks", folder)
    assert f"{spotting} not found" in output


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--bias", "size", "--num-neg", "1"], "exactly one observed positive"),
        (["--bias", "location", "--num-pos", "2"], "--num-pos 2"),
        (["--bias", "semantic"], "--bias semantic needs --clicks"),
        (["--bias", "size", "--clicks", "."], "--clicks is read only by --bias semantic"),
        (["--source", "."], "--source is read only by --bias"),
        (["--bias", "sideways"], "'sideways' is not one of"),
    ],
    ids=["num-neg", "num-pos", "no-clicks", "clicks-for-size", "source-for-uniform", "bad-bias"],
)
def test_bad_options_are_refused_before_reading(coco, runner, args, expected):
    dataset, _ = coco
    output = invoke(runner, ["data", "observe", dataset, *args], ok=False).output
    assert expected in output


def test_a_gone_source_asks_for_source_and_a_different_one_is_refused(coco, runner, tmp_path):
    dataset, raw = coco
    raw.rename(tmp_path / "moved")
    output = _fail(runner, dataset, "--bias", "size")
    assert "--source" in output and str(raw) in output
    invoke(runner, ["data", "observe", dataset, "--bias", "size", "--source", tmp_path / "moved"])
    # an instances file other than the one the dataset was prepared from
    other = tmp_path / "other"
    phases = json.loads(json.dumps(COCO_INSTANCES))
    phases["train2014"]["annotations"] = phases["train2014"]["annotations"][:-1]  # 31 loses person
    write_coco(other, phases)
    output = _fail(runner, dataset, "--bias", "size", "--source", other, "--force")
    assert "does not match" in output and "COCO_train2014_000000000031.jpg" in output


def test_malformed_areas_and_clicks_name_the_file_and_entry(coco, runner, tmp_path):
    dataset, raw = coco
    path = raw / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["area"] = "big"
    path.write_text(json.dumps(data))
    output = _fail(runner, dataset, "--bias", "size")
    assert "instances_train2014.json: annotations[2]: 'area' must be a finite number" in output
    folder = write_clicks(tmp_path / "clicks")
    name = "crowdsourcing_annotate_category_val2014.json"
    (folder / name).write_text(json.dumps([{"im_id": 5, "cat_id": 18, "x": 0.1}]))
    output = _fail(runner, dataset, "--bias", "semantic", "--clicks", folder)
    assert f"{name}: entry[0] lacks the key 'y'" in output


def test_unknown_bias_in_the_api_is_refused(coco):
    dataset, _ = coco
    with pytest.raises(SplError, match="--bias must be one of"):
        add_observed_set(dataset, bias="colour")


def test_a_relative_source_is_found_from_another_directory(tmp_path, runner, monkeypatch):
    write_coco(tmp_path / "raw", COCO_INSTANCES)
    monkeypatch.chdir(tmp_path)
    invoke(runner, ["data", "prepare", "coco14", "--source", "raw", "--root", "root"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    invoke(runner, ["data", "observe", tmp_path / "root" / "coco14", "--bias", "location"])
    assert "location-p1-s1200" in load_prepared(tmp_path / "root" / "coco14").observed


@pytest.mark.parametrize(
    ("x", "y", "hint"), [(6, 6, " (pixels?)"), (0.5, 1.2, " (pixels?)"), (-0.1, 0.5, "")]
)
def test_clicks_outside_the_unit_square_are_refused_naming_the_entry(
    coco, runner, tmp_path, x, y, hint
):
    """Click coordinates are fractions of the image's width and height; pixels (x = y = 6)
    would be counted as clicks outside every box instead of being refused."""
    dataset, _ = coco
    clicks = {name: list(rows) for name, rows in COCO_CLICKS.items()}
    spotting = "crowdsourcing_instance_spotting_val2014.json"
    clicks[spotting][2] = (5, 18, x, y)
    folder = write_clicks(tmp_path / "clicks", clicks)
    labels = dataset / "labels.h5"
    before = labels.read_bytes()
    output = _fail(runner, dataset, "--bias", "semantic", "--clicks", folder).replace("\n", " ")
    assert (
        f"{spotting}: entry[2] (image id 5, 200 x 100) clicks at x {x}, y {y}{hint}; a click's "
        "x and y are fractions of the image's width and height, in [0, 1]"
    ) in output
    assert labels.read_bytes() == before
