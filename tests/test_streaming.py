"""`spl fit-linear` within a memory budget: features streamed from the feature file and
labels read per batch give the resident run's numbers bit for bit (float32 and float16
files, contiguous and chunked layouts, dense and sparse labels, the OpenImages fixture
with its verified and its single-positive labels); partially labelled datasets scored by
the OpenImages rule (checked against scikit-learn); the memory plan against a hand count;
budgets refused with what to reduce."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from openimages_fixture import make_openimages
from sklearn.metrics import average_precision_score

from spl.data import labels as label_store
from spl.data.prepared import load_prepared
from spl.extract.features import FORMAT, feature_path, load_features, write_features
from spl.linear_plan import plan_of_run
from spl.memory_plan import HEAD_COPIES, parse_size
from spl.runs import read_csv
from spl.settings import LinearSettings

from conftest import import_user_arrays, invoke, kill_when_file_appears

GRID = ["--epochs", 2, "--lrs", "1e-2", "--batch-sizes", "8,16", "--quiet"]
# a loss on each of the engine's routes: label-only weights (an, epr's weights...), fused
# per-row state (role), closed form, hooks (ll_r), observed negatives (iun)
LOSSES = ["--losses", "an,role,epr,ll_r,iun"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return import_user_arrays(CliRunner(), tmp_path_factory.mktemp("imported"),
                              n_train=120, n_test=60, dim=10, classes=5)  # fmt: skip


def _fit(runner, dataset, out, tag, *extra, ok=True):
    args = ["fit-linear", dataset, "--features", tag, "--out", out, *GRID, *extra]
    return invoke(runner, args, ok=ok)


def _run(out):
    (run,) = [p for p in out.glob("*/*/linear-*") if p.is_dir()]
    return run


def _same_run(a, b):
    """Results, history and weights (and every head's exported state) bit for bit."""
    assert (a / "results.csv").read_text() == (b / "results.csv").read_text()
    assert (a / "per_class_ap.csv").read_text() == (b / "per_class_ap.csv").read_text()
    assert (a / "history.jsonl").read_text() == (b / "history.jsonl").read_text()
    heads_a = torch.load(a / "heads.pt", weights_only=True)
    heads_b = torch.load(b / "heads.pt", weights_only=True)
    assert torch.equal(heads_a["weight"], heads_b["weight"])
    assert torch.equal(heads_a["bias"], heads_b["bias"])
    assert heads_a["state"].keys() == heads_b["state"].keys()
    for name, state in heads_a["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, heads_b["state"][name][key])


def _plan(run):
    return json.loads((run / "config.json").read_text())["memory_plan"]


def _labels_per_batch_budget(dataset, tag, *extra) -> int:
    """A budget that streams the features and reads the labels per batch: the plan's own
    total for that case, which the resident-labels plan passes."""
    settings = LinearSettings(stream_features=True, epochs=2, lrs=[1e-2], batch_sizes=[8, 16])
    for key, value in extra:
        setattr(settings, key, value)
    plan = plan_of_run(dataset, tag, settings)
    assert plan.resident_labels  # with the machine's budget
    labels = [i for i in plan.items if i.name.startswith(("train labels", "val labels"))]
    return plan.total - sum(i.bytes for i in labels if not i.streamed)


def test_streamed_features_and_labels_per_batch_give_the_resident_run(imported, tmp_path, runner):
    _fit(runner, imported, tmp_path / "resident", "imported", *LOSSES)
    _fit(runner, imported, tmp_path / "streamed", "imported", *LOSSES, "--stream-features")
    losses = [("losses", ["an", "role", "epr", "ll_r", "iun"])]
    budget = _labels_per_batch_budget(imported, "imported", *losses)
    _fit(runner, imported, tmp_path / "batches", "imported", *LOSSES,
         "--stream-features", "--memory-budget", budget)  # fmt: skip
    resident, streamed, batches = (_run(tmp_path / k) for k in ("resident", "streamed", "batches"))
    _same_run(resident, streamed)
    _same_run(resident, batches)
    assert not _plan(resident)["stream_features"] and _plan(resident)["resident_labels"]
    assert _plan(streamed)["stream_features"] and _plan(streamed)["resident_labels"]
    assert _plan(batches)["stream_features"] and not _plan(batches)["resident_labels"]
    assert _plan(batches)["budget"] == budget
    timings = json.loads((streamed / "config.json").read_text())["timings"]
    assert timings["feature_wait"] >= 0 and timings["steps"] > 0
    # a fully labelled dataset: every test class is in the mean
    assert {r["test_classes_evaluated"] for r in read_csv(resident / "results.csv")} == {"5"}


def _rewrite(dataset, tag, dtype, chunks):
    """The imported feature file again under ``tag``: another dtype, HDF5-chunked or not
    (chunked: as spl wrote feature files before)."""
    prepared = load_prepared(dataset)
    loaded = load_features(prepared, "imported")
    path = feature_path(dataset, tag)
    with h5py.File(path, "w") as h5:
        for src in ("trainval", "test"):
            h5.create_dataset(src, data=loaded.features[src].astype(dtype), chunks=chunks)
            h5.create_dataset(f"bad/{src}", data=np.zeros(0, np.int64))
        h5.attrs.update({**loaded.attrs, "format": FORMAT, "tag": tag, "dtype": str(dtype)})
    return loaded


def test_float16_chunked_file_streams_to_the_resident_numbers(imported, tmp_path, runner):
    loaded = _rewrite(imported, "half", np.float16, (16, 4))
    with h5py.File(feature_path(imported, "half")) as h5:
        assert h5["trainval"].chunks == (16, 4) and h5["trainval"].dtype == np.float16
    losses = ["--losses", "an,role"]
    _fit(runner, imported, tmp_path / "resident", "half", *losses)
    _fit(runner, imported, tmp_path / "streamed", "half", *losses, "--stream-features")
    _same_run(_run(tmp_path / "resident"), _run(tmp_path / "streamed"))
    # float16 to float32 is exact: the streamed rows are the file's values
    from spl.fit.data import StreamedFeatures

    rows = np.array([5, 1, 1, 30])
    for chunks in ((16, 4), None):
        _rewrite(imported, "h", np.float16, chunks)
        features = StreamedFeatures(feature_path(imported, "h"), "trainval", np.arange(40, 80))
        assert features.layout == ("hdf5" if chunks else "direct")
        block = features.read(rows)
        features.close()
        expected = loaded.features["trainval"][40 + rows].astype(np.float16).astype(np.float32)
        assert block.dtype == torch.float32 and torch.equal(
            block[:, :-1], torch.from_numpy(expected)
        )
        assert torch.equal(block[:, -1], torch.ones(4))


# --------------------------------------------------------------------------- OpenImages


@pytest.fixture(scope="module")
def openimages(tmp_path_factory):
    """The OpenImages fixture prepared with `spl data prepare openimages`, stored dense and
    stored sparse (CSR: the layout a large file takes), each with the same float32 features
    (written contiguous by the project's writer, informative about the verified labels)."""
    runner = CliRunner()
    tmp = tmp_path_factory.mktemp("oi")
    raw = tmp / "raw"
    make_openimages(raw)
    out = {}
    for layout in ("dense", "sparse"):
        root = tmp / layout
        with pytest.MonkeyPatch.context() as patch:
            if layout == "sparse":  # the fixture is tiny: any matrix goes sparse
                patch.setattr(label_store, "SPARSE_THRESHOLD_BYTES", 1)
            invoke(runner, ["data", "prepare", "openimages", "--source", raw, "--root", root])
        dataset = root / "openimages"
        prepared = load_prepared(dataset)
        assert prepared.partial and prepared.sparse == (layout == "sparse")
        rng = np.random.RandomState(1)
        centers = rng.randn(prepared.num_classes, 6)
        features = {}
        for src in ("trainval", "test"):
            states = prepared.label_states(src, np.arange(len(prepared.images[src])))
            noise = rng.randn(len(states), 6)
            features[src] = (states @ centers + noise).astype(np.float32)
        attrs = {"tag": "f", "backbone": "synthetic", "dataset_name": prepared.name,
                 "dataset_fingerprint": prepared.fingerprint}  # fmt: skip
        write_features(feature_path(dataset, "f"), features, attrs)
        with h5py.File(feature_path(dataset, "f")) as h5:  # memory-mapped when streamed
            assert h5["trainval"].chunks is None and h5["trainval"].compression is None
        out[layout] = dataset
    return out


OI_GRID = ["--batch-sizes", "4,8", "--losses"]


@pytest.mark.parametrize(
    "observed, losses",
    [("verified", "an,role,epr"), ("uniform-p1-n0-s1200", "an,role,ll_r")],
)
def test_openimages_streamed_equals_resident(openimages, tmp_path, runner, observed, losses):
    """Dense and sparse labels.h5, resident and streamed with labels per batch: one run's
    numbers. The sparse run reads CSR blocks."""
    extra = ["--observed", observed, *OI_GRID, losses]
    runs = {}
    for layout, dataset in openimages.items():
        _fit(runner, dataset, tmp_path / f"{layout}-resident", "f", *extra)
        settings = LinearSettings(stream_features=True, epochs=2, lrs=[1e-2], batch_sizes=[4, 8],
                                  losses=losses.split(","), observed=observed)  # fmt: skip
        plan = plan_of_run(dataset, "f", settings)
        labels = [i for i in plan.items if i.name.startswith(("train labels", "val labels"))]
        budget = plan.total - sum(i.bytes for i in labels)
        _fit(runner, dataset, tmp_path / f"{layout}-batches", "f", *extra,
             "--stream-features", "--memory-budget", budget)  # fmt: skip
        runs[layout] = _run(tmp_path / f"{layout}-resident")
        batches = _run(tmp_path / f"{layout}-batches")
        assert not _plan(batches)["resident_labels"]
        _same_run(runs[layout], batches)
    _same_run(runs["dense"], runs["sparse"])


def _verified_map(logits, labels, known):
    """100 x the mean over classes with a verified positive of scikit-learn's AP over the
    class's verified entries; and how many classes that is."""
    aps = [
        average_precision_score(labels[known[:, c], c], logits[known[:, c], c])
        for c in range(labels.shape[1])
        if (labels[known[:, c], c] == 1).any()
    ]
    return 100 * float(np.mean(aps)), len(aps)


def test_partial_labels_are_scored_over_the_verified_entries(openimages, tmp_path, runner):
    dataset = openimages["sparse"]
    _fit(runner, dataset, tmp_path / "runs", "f", "--observed", "verified", *OI_GRID, "an,role")
    run = _run(tmp_path / "runs")
    prepared = load_prepared(dataset)
    heads = torch.load(run / "heads.pt", weights_only=True)
    features = load_features(prepared, "f").features
    config = json.loads((run / "config.json").read_text())
    assert config["memory_plan"]["items"] and config["settings"]["memory_budget"] is None
    rows = read_csv(run / "results.csv")
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    splits = {split: prepared.rows(split) for split in ("train", "val", "test")}
    for i, name in enumerate(heads["names"]):
        row = next(r for r in rows if r["head"] == name)
        weight, bias = heads["weight"][i].double().numpy(), heads["bias"][i].double().numpy()
        got = {}
        for split, (source, split_rows) in splits.items():
            logits = features[source][split_rows].astype(np.float64) @ weight.T + bias
            labels = prepared.labels[source][split_rows]
            known = prepared.known(source, split_rows)
            assert not known.all()  # partially labelled indeed
            got[split] = _verified_map(logits, labels, known)
        assert float(row["test_map"]) == pytest.approx(got["test"][0], abs=1e-4)
        assert int(row["test_classes_evaluated"]) == got["test"][1]
        assert float(row["train_recovery_map"]) == pytest.approx(got["train"][0], abs=1e-4)
        best = next(
            h for h in history if h["head"] == name and h["epoch"] == int(row["best_epoch"])
        )
        assert best["val_map"] == pytest.approx(got["val"][0], abs=1e-4)
        assert float(row["val_map"]) == pytest.approx(got["val"][0], abs=1e-4)
    # a class without a verified test positive is left out of the mean, and counted
    test_source, test_rows = splits["test"]
    positives = (prepared.labels[test_source][test_rows] == 1).any(axis=0)
    assert int(rows[0]["test_classes_evaluated"]) == int(positives.sum())


# --------------------------------------------------------------------------- the plan


def test_plan_counts_what_the_sweep_holds(imported):
    """Every item of a small plan against a count by hand: 120 train rows (96 train, 24
    val), 60 test rows, D = 10, L = 5; an and role at 2 lrs x 2 batch sizes."""
    settings = LinearSettings(losses=["an", "role"], lrs=[1e-2, 1e-3], batch_sizes=[8, 16])
    plan = plan_of_run(imported, "imported", settings)
    items = {i.name: i.bytes for i in plan.items}
    n, nv, nt, width, classes = 96, 24, 60, 11, 5
    heads = 2 * 2 * 2  # losses x lrs x batch sizes
    assert items["train features"] == n * width * 4
    assert items["val features"] == nv * width * 4
    assert items["test features"] == nt * width * 4
    # as stored: the single-positive set (int8) and the val labels (uint8) held by the
    # inputs; train and test labels (uint8) given to the engine and the scoring
    assert items["label matrices as stored"] == n * classes + nv * classes + (n + nt) * classes
    assert items["train labels and observed sets (dense)"] == 2 * n * classes * 4
    assert items["val labels (dense)"] == nv * classes * 4
    # an's label-only weights: a table for l+ and one for l-, [N, 1, L] float32 each
    assert items["label-only weight tables of an epoch"] == 2 * 1 * n * classes * 4
    group = 2 * 2  # heads per (batch size, seed): losses x lrs
    assert (
        items[f"heads and their Adam state ({heads} heads)"]
        == (HEAD_COPIES * heads + group) * classes * width * 4
    )
    # role's estimates [N, L] float32 per head: the state, its gradient, Adam's two
    # moments, the best epoch's snapshot, the copy exported for heads.pt
    assert items["role's state (4 heads)"] == 4 * 6 * n * classes * 4
    # role's estimator starts from a dense float32 copy of the observed set
    assert items["observed set made dense for a loss's initial state"] == n * classes * 4
    labels = load_prepared(imported).labels["trainval"][load_prepared(imported).split["train"]]
    hidden = int(labels.sum()) - n  # positives less the one observed per image
    assert items["unobserved positives followed by the histograms"] == 16 * hidden
    # validation, test and recovery blocks: the logits of a group over the largest split's
    # rows and all classes, and the AP working memory of 16 heads at most (64 bytes an entry)
    assert items["scoring blocks (val, test, recovery)"] == n * classes * (group * 4 + group * 64)
    assert plan.total == sum(items.values()) and plan.fits
    assert not plan.stream_features and plan.resident_labels


def test_dry_run_prints_the_plan_and_makes_no_run(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "imported", "--losses", "an",
                  "--stream-features", "--dry-run")  # fmt: skip
    assert "memory plan on cpu" in result.output
    assert "read-ahead buffers" in result.output and "streamed" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_budget_too_small_is_refused_naming_what_to_reduce(imported, tmp_path, runner):
    args = ["--losses", "an,role", "--lrs", "1e-2,1e-3,1e-4", "--seeds", "0,1"]
    result = _fit(runner, imported, tmp_path / "runs", "imported", *args,
                  "--memory-budget", "100KiB", ok=False)  # fmt: skip
    # role's estimates: 6 copies x 96 rows x 5 classes x 4 bytes x 12 heads = 135 KiB
    assert "role's state (12 heads) needs 135.0 KiB" in result.output
    assert "leave role out of --losses" in result.output and "100.0 KiB" in result.output
    assert not (tmp_path / "runs").exists()  # refused before a run exists


@pytest.mark.parametrize("text", ["0", "-1GiB", "lots", "3 parsecs", "0.2", "nan"])
def test_bad_budgets_are_refused_however_set(imported, tmp_path, runner, text):
    result = _fit(runner, imported, tmp_path / "runs", "imported", "--memory-budget", text,
                  ok=False)  # fmt: skip
    assert "--memory-budget" in result.output and "8GiB" in result.output
    config = tmp_path / "fit.toml"
    config.write_text(f'memory_budget = "{text}"\n')
    result = _fit(runner, imported, tmp_path / "runs", "imported", "--config", config, ok=False)
    assert "memory_budget" in result.output and "8GiB" in result.output
    with pytest.raises(Exception, match="8GiB"):
        LinearSettings(memory_budget=text)
    assert not (tmp_path / "runs").exists()


def test_budget_sizes_parse():
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2.5GB") == 2_500_000_000
    assert parse_size("1e3") == 1000 and parse_size(4096) == 4096 and parse_size("7 kb") == 7000
    assert parse_size(None) is None
    assert LinearSettings(memory_budget="1GiB").memory_budget == 2**30


@pytest.mark.slow
def test_killed_streamed_run_resumes_to_the_resident_result(imported, tmp_path, runner):
    args = ["--losses", "an,role", "--epochs", 12]
    _fit(runner, imported, tmp_path / "straight", "imported", *args)
    budget = _labels_per_batch_budget(imported, "imported", ("losses", ["an", "role"]))
    command = [sys.executable, "-m", "spl", "fit-linear", str(imported), "--features",
               "imported", "--out", str(tmp_path / "killed"), *map(str, GRID), *map(str, args),
               "--stream-features", "--memory-budget", str(budget)]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path)
    checkpoint = kill_when_file_appears(
        process, tmp_path / "killed", "mine/imported/linear-*/checkpoint.pt", timeout=120
    )
    run = checkpoint.parent
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    invoke(runner, ["fit-linear", "--resume", run, "--quiet", "--out", tmp_path / "killed"])
    assert not _plan(run)["resident_labels"]
    _same_run(_run(tmp_path / "straight"), run)


def test_blocked_scoring_gives_the_one_block_numbers(openimages):
    """linear_results with scoring blocks of one class (and a few test rows per P@k block)
    gives the numbers of one block, to rounding; fully and partially labelled."""
    from spl.evaluate.scoring import linear_results
    from spl.fit.engine import StackedHeads

    prepared = load_prepared(openimages["sparse"])
    features = load_features(prepared, "f").features
    x = {s: features[prepared.rows(s)[0]][prepared.rows(s)[1]] for s in ("train", "val", "test")}
    y = {s: prepared.split_labels(s) for s in ("train", "val", "test")}
    known = {s: prepared.known(*prepared.rows(s)) for s in ("train", "val", "test")}
    observed = prepared.observed_set("verified")["trainval"][prepared.rows("train")[1]]
    from spl.fit.losses import Context, make_losses

    context = Context(prepared.num_classes, prepared.expected_positives, prepared.name)
    losses = make_losses(["an", "role"], {}, context)
    model = StackedHeads(losses=losses, lrs=[1e-2, 1e-3], batch_sizes=[4], epochs=2)
    model.fit(x["train"], observed, labels=y["train"], X_val=x["val"], Y_val=y["val"],
              val_known=known["val"])  # fmt: skip
    for test_known, train_known in ((None, None), (known["test"], known["train"])):
        kwargs = {"X_train": x["train"], "Y_train": y["train"], "test_known": test_known,
                  "train_known": train_known}  # fmt: skip
        whole, whole_ap = linear_results(model, x["test"], y["test"], **kwargs)
        small, small_ap = linear_results(model, x["test"], y["test"], score_bytes=1, **kwargs)
        np.testing.assert_allclose(small_ap, whole_ap, atol=1e-4)
        for a, b in zip(whole, small, strict=True):
            assert a.keys() == b.keys()
            for key, value in a.items():
                assert value == pytest.approx(b[key], abs=1e-4), key
        classes = {r["test_classes_evaluated"] for r in whole}
        if test_known is None:
            assert classes == {prepared.num_classes}
        else:
            assert classes == {int((y["test"].astype(bool) & known["test"]).any(0).sum())}


# --------------------------------------------------------------------------- fit/data.py


def test_label_rows_read_a_csr_as_its_dense_matrix():
    from spl.data.labels import CSR
    from spl.fit.data import HiddenPositives, LabelRows

    rng = np.random.RandomState(3)
    dense = (rng.rand(50, 7) < 0.3).astype(np.int8) * rng.choice([-1, 1], (50, 7)).astype(np.int8)
    sparse = LabelRows(CSR.from_dense(dense), dtype=torch.float32, device="cpu", resident=False)
    resident = LabelRows(dense, dtype=torch.float32, device="cpu", resident=True)
    assert sparse.sparse and not resident.sparse
    rows = np.array([4, 0, 4, 49, 17])
    expected = torch.from_numpy(dense[rows].astype(np.float32))
    for matrix in (sparse, resident):
        assert torch.equal(matrix.read(rows), expected)
        assert torch.equal(matrix.take(torch.from_numpy(rows)), expected)
        assert torch.equal(matrix.columns(2, 5), torch.from_numpy(dense[:, 2:5].astype(np.float32)))
        assert torch.equal(matrix.dense(), torch.from_numpy(dense.astype(np.float32)))
    # hidden positives (y = 1, z = 0) per class, read block by block from the CSR
    labels = (dense == 1).astype(np.int8)
    observed = np.zeros_like(labels)
    observed[np.arange(50), labels.argmax(1)] = labels.max(1)
    hidden = HiddenPositives.find(
        LabelRows(CSR.from_dense(labels), dtype=torch.float32, device="cpu", resident=False),
        LabelRows(CSR.from_dense(observed), dtype=torch.float32, device="cpu", resident=False),
        torch.device("cpu"),
    )
    mask = (labels == 1) & (observed == 0)
    assert hidden.count == int(mask.sum())
    for c in range(7):
        rows_c = hidden.class_rows(c, 0, 50)
        got = [] if rows_c is None else rows_c.tolist()
        assert got == np.flatnonzero(mask[:, c]).tolist()


def test_read_ahead_gives_the_batches_in_order_and_raises_the_readers_error():
    from spl.fit.data import ReadAhead

    batches = [np.arange(i, i + 3) for i in range(0, 30, 3)]
    reader = ReadAhead(lambda rows: {"x": torch.from_numpy(rows * 10)}, batches, window_rows=7)
    got = [block["x"] for block in reader]
    reader.close()
    assert [g.tolist() for g in got] == [(b * 10).tolist() for b in batches]

    def failing(rows):
        if rows[0] >= 9:
            raise OSError("disk gone")
        return {"x": torch.from_numpy(rows)}

    reader = ReadAhead(failing, batches, window_rows=1)
    with pytest.raises(OSError, match="disk gone"):
        list(reader)
    reader.close()
    # an epoch interrupted early stops the thread
    reader = ReadAhead(
        lambda rows: {"x": torch.from_numpy(rows)}, batches, window_rows=1, windows=1
    )
    next(reader)
    reader.close()
    assert not reader._thread.is_alive()


_RSS_FILE_CHILD = """
import sys, numpy as np, h5py
from spl.fit.data import StreamedFeatures

def rss_file():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssFile"))

path = sys.argv[1]
features = StreamedFeatures(path, "trainval")
assert features.layout == "direct", features.layout
h5 = h5py.File(path)
before = rss_file()
for start, stop, block in features.blocks():  # a pass over every row, as validation makes
    assert np.array_equal(block[:, :-1].numpy(), h5["trainval"][start:stop])
scattered = np.arange(3, features.num_rows, 7)  # scattered rows, as batches are
assert np.array_equal(features.read(scattered)[:, :-1].numpy(), h5["trainval"][scattered])
print(rss_file() - before)
"""


def test_a_streamed_pass_leaves_the_file_out_of_the_process_memory(tmp_path):
    """The memory plan counts streamed features as zero: reading them must not make the
    file's pages the process's (a memory map's pages count in its resident memory once
    touched, and a pass over OpenImages' 7 GiB of features made it that much larger)."""
    path = tmp_path / "big.h5"
    rows, dim = 40_000, 512  # 78 MiB of float32
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset("trainval", (rows, dim), np.float32)  # contiguous
        for start in range(0, rows, 8_000):
            data[start : start + 8_000] = np.random.RandomState(start).rand(8_000, dim)
    grown = subprocess.run(
        [sys.executable, "-c", _RSS_FILE_CHILD, str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert int(grown) < 16 * 2**20  # far below the 78 MiB a memory map would add


@pytest.mark.slow
def test_openimages_under_torchrun_equals_one_process(openimages, tmp_path):
    """The fixture's sparse, partially labelled dataset on its verified labels, features
    streamed: two torchrun processes (gloo) write the run one process writes, file for file.
    Both sides with one thread a process, as torchrun gives each."""
    from test_fit_linear_torchrun import _assert_same_run, _torchrun_command

    args = [str(a) for a in ("fit-linear", openimages["sparse"], "--features", "f", "--quiet",
                             "--observed", "verified", "--stream-features", "--epochs", 3,
                             "--lrs", "1e-2", *OI_GRID, "an,role,epr")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, command in (
        ("one", [sys.executable, "-m", "spl"]),
        ("two", _torchrun_command([])),
    ):
        done = subprocess.run([*command, *args, "--out", str(tmp_path / out)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = _run(tmp_path / "one"), _run(tmp_path / "two")
    _assert_same_run(one, two)
    assert json.loads((two / "config.json").read_text())["processes"] == 2


def test_torchrun_processes_on_one_cpu_machine_share_its_budget(imported, monkeypatch):
    """N processes of a torchrun job on one machine each plan within budget / N on a CPU
    (they share its RAM); each GPU's budget is its own, so CUDA plans keep the whole."""
    settings = LinearSettings(losses=["an", "role"], lrs=[1e-2, 1e-3], batch_sizes=[8, 16])
    alone = plan_of_run(imported, "imported", settings)
    budget = 2 * alone.total - 2  # fits alone, not in half of it
    settings = LinearSettings(losses=["an", "role"], lrs=[1e-2, 1e-3], batch_sizes=[8, 16],
                              memory_budget=budget)  # fmt: skip
    assert plan_of_run(imported, "imported", settings).budget == budget
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shared = plan_of_run(imported, "imported", settings)  # features stream to fit the share
    assert shared.budget == budget // 2 and shared.sharing == 2 and shared.stream_features
    assert "divided by the 2 torchrun processes" in shared.text()
    from spl.memory_plan import plan_linear  # the CUDA rule, on the same shape

    shape = _shape(imported, settings)
    assert plan_linear(shape, budget, "cuda:0", sharing=2).budget == budget
    assert plan_linear(shape, budget, "cpu", sharing=2).budget == budget // 2
    with pytest.raises(ValueError):
        plan_linear(shape, budget, "cpu", sharing=0)


def _shape(dataset, settings):
    from spl.data.prepared import load_prepared as load
    from spl.extract.features import unreadable_rows
    from spl.linear_plan import sweep_shape
    from spl.training import training_inputs

    prepared = load(dataset)
    inputs = training_inputs(
        prepared, settings, settings.losses, unreadable_rows(prepared, "imported")
    )
    return sweep_shape(inputs, "imported")
