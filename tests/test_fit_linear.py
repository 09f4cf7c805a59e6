"""`spl import-features` and `spl fit-linear` end to end: run directory, selection, resume,
refusals of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spl.data.prepared import load_prepared
from spl.evaluate.selection import select_best
from spl.extract.features import feature_path, load_features, write_features
from spl.runs import read_csv

from conftest import import_user_arrays, invoke, kill_when_file_appears, user_arrays

_arrays = user_arrays  # (other test modules import it under this name)


@pytest.fixture
def imported(tmp_path, runner):
    return import_user_arrays(runner, tmp_path)


def _fit(runner, dataset, out, *extra, ok=True):
    args = ["fit-linear", dataset, "--features", "imported", "--out", out, "--quiet"]
    return invoke(runner, [*args, *extra], ok=ok)


def _run_dir(out):
    (run,) = [p for p in (out / "mine" / "imported").iterdir() if p.is_dir()]
    return run


def test_import_features_round_trip(imported, tmp_path):
    prepared = load_prepared(imported)
    assert prepared.classes == [f"c{i}" for i in range(6)]
    assert len(prepared.split["train"]) == 240 and len(prepared.split["val"]) == 60
    features = load_features(prepared, "imported")
    np.testing.assert_array_equal(features.features["trainval"], np.load(tmp_path / "train_f.npy"))
    np.testing.assert_array_equal(prepared.labels["test"], np.load(tmp_path / "test_l.npy"))
    assert features.attrs["backbone"] == "imported"


def test_fit_linear_writes_the_run_directory(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "--epochs", 4, "--lrs", "1e-2,1e-3")
    run = _run_dir(tmp_path / "runs")
    assert run.name.startswith("linear-") and not (run / "INCOMPLETE").exists()
    assert {"config.json", "history.jsonl", "results.csv", "heads.pt", "summary.md"} <= {
        p.name for p in run.iterdir()
    }
    assert not (run / "checkpoint.pt").exists()
    rows = read_csv(run / "results.csv")
    assert len(rows) == 9 * 2 * 2  # paper losses x lrs x batch sizes
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 36 * 4
    for row in rows:
        epochs = [h for h in history if h["head"] == row["head"]]
        best = max(epochs, key=lambda h: h["val_map"])
        assert int(row["best_epoch"]) == best["epoch"]
        assert float(row["val_map"]) == pytest.approx(best["val_map"], abs=1e-3)
    # the printed table is the selection rule applied to results.csv
    selected = select_best(rows)
    an = selected["an"]["picked"][0]
    assert f"{float(an['test_map']):.1f}" in result.output.split("AN ")[1].splitlines()[0]
    # heads.pt reloads with weights_only and reproduces the recorded test mAP
    heads = torch.load(run / "heads.pt", weights_only=True)
    prepared = load_prepared(imported)
    test_x = torch.tensor(load_features(prepared, "imported").features["test"])
    index = [h["loss"] + f"_lr{h['lr']:g}_bs{h['batch_size']}_s{h['seed']}" for h in heads["heads"]]
    i = index.index(an["head"])
    logits = test_x @ heads["weight"][i].T + heads["bias"][i]
    from spl.evaluate.metrics import mean_average_precision

    got = mean_average_precision(logits, torch.tensor(prepared.labels["test"])).item()
    assert got == pytest.approx(float(an["test_map"]), abs=1e-3)
    assert heads["names"] == index  # each head's name is stored with it
    estimates = {name: state["estimates"] for name, state in heads["state"].items()}
    assert set(estimates) == {r["head"] for r in rows if r["loss"] == "role"}
    assert estimates[next(iter(estimates))].shape == (240, 6)
    config = json.loads((run / "config.json").read_text())
    assert config["dataset_fingerprint"] == prepared.fingerprint and "finished" in config
    # where the command's time went: every phase recorded, and they add up to the whole
    # (less the gaps between phases, a few milliseconds)
    timings = config["timings"]
    phases = {"command", "read_labels", "read_features", "open_run", "setup", "first_step",
              "steps", "feature_wait", "loss_hooks", "validation", "on_epoch", "test_scoring",
              "write_results"}  # fmt: skip
    assert set(timings) == phases | {"total"} and min(timings.values()) >= 0
    assert timings["steps"] > 0 and timings["on_epoch"] > 0
    assert timings["feature_wait"] == 0  # resident features: no step waits for a batch
    # (each value is rounded to the millisecond, so the sum may pass the total by a few)
    assert -0.01 <= timings["total"] - sum(timings[p] for p in phases) < 0.5
    assert "| ROLE |" in (run / "summary.md").read_text()
    # a second run never overwrites the first
    _fit(runner, imported, tmp_path / "runs", "--epochs", 1, "--losses", "an", "--lrs", "1e-3")
    assert len(list((tmp_path / "runs" / "mine" / "imported").iterdir())) == 2


def test_seeds_give_mean_and_std(imported, tmp_path, runner):
    _fit(runner, imported, tmp_path / "runs", "--epochs", 2, "--losses", "an,role", "--lrs", "1e-2",
         "--batch-sizes", "8", "--seeds", "0,1")  # fmt: skip
    rows = read_csv(_run_dir(tmp_path / "runs") / "results.csv")
    selected = select_best(rows)
    tests = [float(r["test_map"]) for r in rows if r["loss"] == "an"]
    mean, std = selected["an"]["test_map"]
    assert mean == pytest.approx(np.mean(tests), abs=1e-3)
    assert std == pytest.approx(np.std(tests, ddof=1), abs=1e-3)


def _sklearn_map(scores: np.ndarray, labels: np.ndarray) -> float:
    """The official code's compute_metrics: AP per class (0 for a class with no positive),
    mean over all classes, x100."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(labels[:, j], scores[:, j]) if labels[:, j].any() else 0.0
           for j in range(labels.shape[1])]  # fmt: skip
    return 100.0 * float(np.mean(aps))


def test_val_observed_selects_on_the_val_single_positives(imported, tmp_path, runner):
    _fit(runner, imported, tmp_path / "runs", "--epochs", 6, "--losses", "an,role",
         "--lrs", "1e-2,1e-3", "--batch-sizes", 8, "--val", "observed")  # fmt: skip
    run = _run_dir(tmp_path / "runs")
    prepared = load_prepared(imported)
    val_rows = prepared.split["val"]
    observed = prepared.observed["uniform-p1-n0-s1200"]["trainval"][val_rows]
    selection = (observed == 1).astype(np.uint8)
    assert (selection.sum(1) == 1).all()  # the val rows carry one positive each
    full = prepared.labels["trainval"][val_rows]
    heads = torch.load(run / "heads.pt", weights_only=True)
    features = load_features(prepared, "imported").features
    val_x = torch.tensor(features["trainval"][val_rows])
    test_x = torch.tensor(features["test"])
    rows = read_csv(run / "results.csv")
    assert {(r["observed"], r["val"]) for r in rows} == {("uniform-p1-n0-s1200", "observed")}
    differed = 0
    for row in rows:
        i = heads["names"].index(row["head"])
        val_scores = (val_x @ heads["weight"][i].T + heads["bias"][i]).numpy()
        # the recorded val mAP is the best epoch's mAP on the observed positives ...
        assert float(row["val_map"]) == pytest.approx(_sklearn_map(val_scores, selection), abs=1e-3)
        differed += abs(_sklearn_map(val_scores, full) - float(row["val_map"])) > 0.5
        # ... and test mAP still uses the full test labels
        test_scores = (test_x @ heads["weight"][i].T + heads["bias"][i]).numpy()
        expected = _sklearn_map(test_scores, prepared.labels["test"])
        assert float(row["test_map"]) == pytest.approx(expected, abs=1e-3)
    assert differed >= len(rows) // 2  # full labels would have scored them differently
    summary = (run / "summary.md").read_text()
    assert "selected on the val split's observed single positives" in summary
    assert json.loads((run / "config.json").read_text())["settings"]["val"] == "observed"


def test_val_observed_with_another_observed_set_uses_that_set(imported, tmp_path, runner):
    invoke(runner, ["data", "observe", imported, "--seed", 7])
    _fit(runner, imported, tmp_path / "runs", "--epochs", 2, "--losses", "an", "--lrs", "1e-2",
         "--batch-sizes", 8, "--val", "observed", "--observed", "uniform-p1-n0-s7")  # fmt: skip
    run = _run_dir(tmp_path / "runs")
    prepared = load_prepared(imported)
    val_rows = prepared.split["val"]
    selection = prepared.observed["uniform-p1-n0-s7"]["trainval"][val_rows] == 1
    (row,) = read_csv(run / "results.csv")
    heads = torch.load(run / "heads.pt", weights_only=True)
    x = torch.tensor(load_features(prepared, "imported").features["trainval"][val_rows])
    scores = (x @ heads["weight"][0].T + heads["bias"][0]).numpy()
    assert float(row["val_map"]) == pytest.approx(_sklearn_map(scores, selection), abs=1e-3)
    assert row["observed"] == "uniform-p1-n0-s7"


def test_bad_val_choice_is_refused(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "--val", "clean", ok=False)
    assert "--val" in result.output and "full" in result.output and "observed" in result.output


@pytest.mark.slow
def test_killed_run_is_marked_incomplete_and_resumes_to_the_same_result(imported, tmp_path, runner):
    args = ["--epochs", 30, "--losses", "an,role,epr", "--lrs", "1e-3", "--batch-sizes", "8,16"]
    _fit(runner, imported, tmp_path / "straight", *args)
    straight = read_csv(_run_dir(tmp_path / "straight") / "results.csv")
    command = [sys.executable, "-m", "spl", "fit-linear", str(imported), "--features", "imported",
               "--out", str(tmp_path / "killed"), "--quiet", *map(str, args)]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    checkpoint = kill_when_file_appears(
        process, tmp_path / "killed", "mine/imported/linear-*/checkpoint.pt", timeout=120
    )
    run = checkpoint.parent
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    assert "--resume" in (run / "INCOMPLETE").read_text()
    # resuming with other options is refused, naming them
    refused = invoke(runner, ["fit-linear", "--resume", run, "--epochs", 5, "--quiet"], ok=False)
    assert "--epochs: run has 30, given 5" in refused.output
    invoke(runner, ["fit-linear", "--resume", run, "--quiet", "--out", tmp_path / "killed"])
    resumed = read_csv(run / "results.csv")
    assert resumed == straight
    assert not (run / "INCOMPLETE").exists()
    history = (run / "history.jsonl").read_text().splitlines()
    assert len(history) == 3 * 2 * 30


# ----------------------------------------------------------------------------- bad input


def test_nan_features_name_the_split_and_row(imported, runner, tmp_path):
    prepared = load_prepared(imported)
    features = load_features(prepared, "imported")
    train = features.features["trainval"].copy()
    val_row = int(prepared.split["val"][2])
    train[val_row, 3] = np.nan
    attrs = {
        k: features.attrs[k] for k in ("tag", "backbone", "dataset_name", "dataset_fingerprint")
    }
    write_features(feature_path(imported, "imported"), {"trainval": train, "test": features.features["test"]},
                   attrs, force=True)  # fmt: skip
    result = _fit(runner, imported, tmp_path / "runs", "--epochs", 1, ok=False)
    assert f"val split row 2 (trainval row {val_row})" in result.output


def test_features_of_another_dataset_are_refused(imported, tmp_path, runner):
    (tmp_path / "other").mkdir()
    paths = _arrays(tmp_path / "other", seed=1)
    args = ["import-features", tmp_path / "ds" / "other"]
    for key, path in paths.items():
        args += [f"--{key}", path]
    invoke(runner, args)
    other = feature_path(tmp_path / "ds" / "other", "imported")
    target = feature_path(imported, "imported")
    target.write_bytes(other.read_bytes())
    result = _fit(runner, imported, tmp_path / "runs", ok=False)
    assert "made from another prepared dataset" in result.output and "spl extract" in result.output


def test_unknown_loss_lists_the_available(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "--losses", "an,focal", ok=False)
    assert "unknown loss 'focal'" in result.output and "role" in result.output


def test_iu_without_negatives_explains_which_set(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "--losses", "iu",
                  "--observed-iu", "uniform-p1-n0-s1200", ok=False)  # fmt: skip
    assert "iu trains on observed negatives" in result.output
    assert "uniform-p1-n1-s1200" in result.output


def test_bad_compile_setting_is_refused_before_a_run_exists(
    imported, tmp_path, runner, monkeypatch
):
    monkeypatch.setenv("SPL_COMPILE", "fast")
    result = _fit(runner, imported, tmp_path / "runs", "--epochs", 1, ok=False)
    assert "SPL_COMPILE='fast': use auto (the default), 1 or 0" in result.output
    assert not (tmp_path / "runs").exists()


def test_split_smaller_than_batch_is_an_error(imported, tmp_path, runner):
    result = _fit(runner, imported, tmp_path / "runs", "--batch-sizes", "500", ok=False)
    assert "the train split has 240 rows, fewer than batch size 500" in result.output
    assert not (tmp_path / "runs").exists()


def test_run_file_says_where_the_run_went(imported, tmp_path, runner):
    from spl.data.common import SplError
    from spl.settings import FitLinearOptions, settings_from

    record = tmp_path / "logs" / "fit.run"  # its folder is made
    result = _fit(runner, imported, tmp_path / "runs", "--epochs", 1, "--losses", "an",
                  "--lrs", "1e-2", "--run-file", record)  # fmt: skip
    run = _run_dir(tmp_path / "runs")
    assert record.read_text() == f"{run}\n" and f"run: {run}" in result.output
    # its valid range: a file path, not a folder, not under a file; refused before a run
    (tmp_path / "a-file").write_text("x")
    for bad, message in ((tmp_path, "is a directory"),
                         (tmp_path / "a-file" / "fit.run", "is a file, not a folder")):  # fmt: skip
        result = _fit(runner, imported, tmp_path / "other", "--run-file", bad, ok=False)
        assert "--run-file" in result.output and message in result.output, result.output
        assert not (tmp_path / "other").exists()
    with pytest.raises(SplError, match="'.' is a folder; give a file path"):
        settings_from(FitLinearOptions, {"run_file": "."})  # as a --config key or from Python


def test_import_refuses_bad_arrays(tmp_path, runner):
    paths = _arrays(tmp_path)
    feats = np.load(paths["test-features"])
    feats[7, 0] = np.inf
    np.save(paths["test-features"], feats)
    args = ["import-features", tmp_path / "ds" / "x"]
    for key, path in paths.items():
        args += [f"--{key}", path]
    result = invoke(runner, args, ok=False)
    assert "test_f.npy" in result.output and "rows 7" in result.output


def test_checkpoints_take_a_bounded_share_of_the_run(tmp_path):
    """The first epoch is always checkpointed (a run killed later resumes from it); then a
    checkpoint is written only once the training since the last has taken 1 / share times
    what writing one took, so writing checkpoints stays a small share of a long sweep."""
    import time

    from spl.linear import CHECKPOINT_SHARE, checkpoint_writer
    from spl.runs import Run

    saves = []

    class SlowToSave:  # a model whose state takes 10 ms to write
        history_ = [{"head": "h", "epoch": 1}]

        def state_dict(self):
            time.sleep(0.01)
            saves.append(time.perf_counter())
            return {"saved": len(saves)}

    run = Run(tmp_path, {})
    on_epoch = checkpoint_writer(run, None)
    record = {"group": type("G", (), {"heads": ["h"]})()}
    on_epoch(SlowToSave(), record)
    on_epoch(SlowToSave(), record)  # right after: not due
    assert len(saves) == 1 and (tmp_path / "checkpoint.pt").exists()
    first_written = time.perf_counter()
    epochs = 2
    while len(saves) == 1 and time.perf_counter() - first_written < 60:
        time.sleep(0.05)
        on_epoch(SlowToSave(), record)
        epochs += 1
    # due again, not before 1 / share times the 10 ms the state alone took to make
    assert len(saves) == 2 and saves[1] - saves[0] >= 0.01 / CHECKPOINT_SHARE
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == epochs  # every one
