"""Packaging: the wheel holds every stage as a subpackage of `spl` and installs a command."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, invoke


@pytest.mark.slow
def test_wheel_contains_all_subpackages_and_runs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", tmp_path / "dist", REPO],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("spl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("spl", "spl/data", "spl/extract", "spl/fit", "spl/evaluate"):
        assert f"{package}/__init__.py" in names
    assert not any(n.startswith(("data/", "fit/", "tests/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", target, wheel],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True}
    out = subprocess.run([sys.executable, "-m", "spl", "data", "--help"], **run)
    assert out.returncode == 0 and "prepare" in out.stdout, out.stderr
    code = "import spl.data, spl.fit; print(spl.data.__file__)"
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert str(target) in out.stdout, out.stderr
    out = subprocess.run([target / "bin" / "spl", "--help"], **run)
    assert out.returncode == 0 and "fit-linear" in out.stdout, out.stderr


def test_python_dash_m_from_the_checkout():
    out = subprocess.run(
        [sys.executable, "-m", "spl", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "data" in out.stdout, out.stderr


def test_config_file_sets_defaults_and_rejects_unknown_keys(tmp_path, runner):
    (tmp_path / "ok.toml").write_text(
        "num-pos = 2\nseed = 5\ntrain-images = 30\ntest-images = 10\n"
    )
    invoke(
        runner, ["data", "prepare", "demo", "--root", tmp_path, "--config", tmp_path / "ok.toml"]
    )
    from spl.data.prepared import load_prepared

    assert "uniform-p2-n0-s5" in load_prepared(tmp_path / "demo").observed
    (tmp_path / "bad.toml").write_text("nmu-pos = 2\n")
    result = invoke(
        runner,
        ["data", "prepare", "demo", "--root", tmp_path / "x", "--config", tmp_path / "bad.toml"],
        ok=False,
    )
    assert "unknown keys nmu_pos" in result.output


@pytest.mark.slow
def test_the_finetune_benchmark_runs_the_trainers_epoch(tmp_path):
    """The benchmark times FineTuner.train_epoch on a model it builds itself: it must keep
    working as the trainer changes (it once called a private method that fit() set up)."""
    out = tmp_path / "finetune.md"
    done = subprocess.run(
        [sys.executable, REPO / "benchmarks" / "bench_finetune.py", "--device", "cpu",
         "--steps", "1", "--images", "96", "--synthetic", "--batch-size", "4",
         "--image-size", "32", "--workers", "0", "--root", tmp_path / "root", "--out", out],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ResNet-50 at 32px, batch 4: fp32, cached pixels |" in out.read_text()
