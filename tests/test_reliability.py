"""Bad input and interruptions found by using every command as a new user would: each is
refused with a message naming the option, file or key, or recovered from."""

import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from spl.runs import read_csv

from conftest import invoke

SIZE = 32
LITE0 = ["--backbone", "efficientnet_lite0", "--image-size", SIZE]
TAG = f"efficientnet_lite0-IMAGENET1K_TF-{SIZE}"


def _imported(tmp_path: Path, runner) -> Path:
    rng = np.random.RandomState(0)
    centers = rng.randn(4, 12)
    args = ["import-features", tmp_path / "ds" / "mine"]
    for split, n in (("train", 120), ("test", 40)):
        labels = (rng.rand(n, 4) < 0.3).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, 4, n)] = 1
        np.save(tmp_path / f"{split}_f.npy", (labels @ centers + rng.randn(n, 12)).astype("f4"))
        np.save(tmp_path / f"{split}_l.npy", labels)
        args += [f"--{split}-features", tmp_path / f"{split}_f.npy"]
        args += [f"--{split}-labels", tmp_path / f"{split}_l.npy"]
    invoke(runner, args)
    return tmp_path / "ds" / "mine"


def _fit(runner, dataset, out, *extra, ok=True):
    args = ["fit-linear", dataset, "--features", "imported", "--out", out, "--quiet"]
    return invoke(runner, [*args, *extra], ok=ok)


@pytest.mark.parametrize("lrs", ["-1e-3", "0", "nan", "1e-3,inf"])
def test_learning_rates_must_be_positive_and_finite(tmp_path, runner, lrs):
    dataset = _imported(tmp_path, runner)
    result = _fit(runner, dataset, tmp_path / "runs", "--lrs", lrs, ok=False)
    assert "--lrs must be positive finite numbers" in result.output
    assert not (tmp_path / "runs").exists()
    result = invoke(runner, ["finetune", dataset, "--loss", "an", "--lrs", lrs], ok=False)
    assert "--lrs must be positive finite numbers" in result.output


def test_predict_refuses_a_negative_top_k(tmp_path, runner):
    model = tmp_path / "best.pt"
    model.write_bytes(b"x")
    result = invoke(runner, ["predict", model, "a.png", "--top-k", -1], ok=False)
    assert "--top-k must be >= 0, got -1" in result.output


def test_config_file_errors_name_the_file_and_key(tmp_path, runner):
    dataset = _imported(tmp_path, runner)
    config = tmp_path / "sweep.toml"
    for text, key in (('epochs = "many"\n', "epochs"), ("lrs = [1e-3, -1]\n", "lrs")):
        config.write_text(text)
        result = _fit(runner, dataset, tmp_path / "runs", "--config", config, ok=False)
        assert f"{config}: {key}" in result.output, result.output
        assert "--epochs" not in result.output and "--lrs" not in result.output
    # lists and per-loss option tables are read as the command line would read them
    config.write_text('lrs = [1e-3]\nbatch-sizes = [8]\nepochs = 1\nlosses = "role"\n'
                      "[loss_options.role]\nestimator_lr_multiplier = 5\n")  # fmt: skip
    _fit(runner, dataset, tmp_path / "runs", "--config", config)
    (run,) = (tmp_path / "runs" / "mine" / "imported").iterdir()
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["loss_options"]["role"]["estimator_lr_multiplier"] == 5.0
    assert recorded["settings"]["lrs"] == [1e-3]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo never run",))


def test_a_pickle_holding_code_is_refused_by_name(tmp_path, runner):
    model = tmp_path / "best.pt"
    model.write_bytes(pickle.dumps({"model": _Evil()}))
    result = invoke(runner, ["predict", model, "a.png"], ok=False)
    assert str(model) in result.output and "holds Python code or objects" in result.output
    assert "system" in result.output  # what it would have run
    assert "weights_only=False" not in result.output and "never run" not in result.output


def test_a_linear_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, runner):
    dataset = _imported(tmp_path, runner)
    args = ["--losses", "an,role", "--lrs", "1e-2", "--batch-sizes", 8, "--epochs", 3]
    _fit(runner, dataset, tmp_path / "straight", *args)
    (straight,) = (tmp_path / "straight" / "mine" / "imported").iterdir()
    # What a kill between creating the run and its first epoch leaves: config, marker.
    killed = tmp_path / "killed" / straight.name
    killed.mkdir(parents=True)
    shutil.copy(straight / "config.json", killed / "config.json")
    (killed / "INCOMPLETE").write_text("interrupted")
    invoke(runner, ["fit-linear", "--resume", killed, "--quiet"])
    assert read_csv(killed / "results.csv") == read_csv(straight / "results.csv")
    assert (killed / "history.jsonl").read_text() == (straight / "history.jsonl").read_text()
    assert not (killed / "INCOMPLETE").exists()


@pytest.fixture
def demo_copy(demo_small, tmp_path):
    target = tmp_path / "root" / "demo"
    shutil.copytree(demo_small, target, ignore=shutil.ignore_patterns("features", "cache"))
    return target


def _extract(runner, dataset, *extra):
    invoke(runner, ["extract", dataset, *LITE0, "--device", "cpu", "--workers", 0,
                    "--no-progress", *extra])  # fmt: skip


def _finetune(runner, dataset, out, *extra, ok=True):
    args = ["finetune", dataset, *LITE0, "--batch-sizes", 16, "--lrs", "1e-4", "--epochs", 1,
            "--device", "cpu", "--workers", 0, "--out", out, "--quiet", *extra]  # fmt: skip
    return invoke(runner, args, ok=ok)


def test_a_failure_while_writing_the_summary_leaves_no_half_written_file(
    demo_copy, tmp_path, runner, monkeypatch
):
    original = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if "summary.md" in self.name:
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _finetune(runner, demo_copy, tmp_path / "runs", "--loss", "an")
    (run,) = (tmp_path / "runs" / "demo" / TAG).iterdir()
    assert not (run / "summary.md").exists()  # never half written
    assert not [p for p in run.iterdir() if "summary.md" in p.name]
    assert (run / "INCOMPLETE").exists()


def _corrupt_a_training_image(dataset: Path) -> tuple[int, bytes]:
    from spl.data.prepared import load_prepared

    prepared = load_prepared(dataset)
    row = int(prepared.split["train"][3])
    path = prepared.image_root / prepared.images["trainval"][row]
    original = path.read_bytes()
    path.write_bytes(b"not an image")
    return row, original


@pytest.mark.slow
def test_both_training_commands_leave_out_the_same_unreadable_rows(demo_copy, tmp_path, runner):
    """The rule is the feature file's: a row another extraction could not read (since
    repaired) is trained on by fit-linear and by finetune alike."""
    from spl.data.prepared import load_prepared

    row, original = _corrupt_a_training_image(demo_copy)
    invoke(runner, ["extract", demo_copy, "--backbone", "efficientnet_lite0", "--image-size",
                    40, "--device", "cpu", "--workers", 0, "--no-progress", "--skip-bad"])  # fmt: skip
    prepared = load_prepared(demo_copy)
    (prepared.image_root / prepared.images["trainval"][row]).write_bytes(original)
    _extract(runner, demo_copy)
    with h5py.File(demo_copy / "features" / f"{TAG}.h5") as h5:
        assert len(h5["bad/trainval"][()]) == 0
    invoke(runner, ["fit-linear", demo_copy, "--features", TAG, "--losses", "role", "--lrs",
                    "1e-2", "--batch-sizes", 16, "--epochs", 2, "--out", tmp_path / "runs",
                    "--quiet"])  # fmt: skip
    (linear,) = (tmp_path / "runs" / "demo" / TAG).iterdir()
    _finetune(runner, demo_copy, tmp_path / "ft", "--loss", "role", "--init-from", linear)
    (run,) = (tmp_path / "ft" / "demo" / TAG).iterdir()
    (config,) = [p for p in run.iterdir() if p.is_dir()]
    history = [json.loads(line) for line in (config / "history.jsonl").read_text().splitlines()]
    assert history[-1]["steps"] == 128 // 16  # all 128 training rows, as in the linear run
    linear_config = json.loads((linear / "config.json").read_text())
    finetune_config = json.loads((run / "config.json").read_text())
    assert linear_config["excluded_bad_rows"] == finetune_config["excluded_bad_rows"]


@pytest.mark.slow
def test_cached_images_leave_out_unreadable_images(demo_copy, tmp_path, runner):
    _corrupt_a_training_image(demo_copy)
    _finetune(runner, demo_copy, tmp_path / "runs", "--loss", "an", "--cache-images")
    (run,) = (tmp_path / "runs" / "demo" / TAG).iterdir()
    (config,) = [p for p in run.iterdir() if p.is_dir()]
    history = [json.loads(line) for line in (config / "history.jsonl").read_text().splitlines()]
    assert history[-1]["steps"] == (128 - 1) // 16
    meta = json.loads((demo_copy / "cache" / f"trainval-{SIZE}.json").read_text())
    assert len(meta["bad_rows"]) == 1
