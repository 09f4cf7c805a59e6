"""Shared fixtures: CLI runner with no user config, tiny prepared datasets."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, args: list[str], ok: bool = True):
    """Run `spl ARGS`; assert success (or failure) and return the result."""
    from spl.cli import main

    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> Path:
    """A small prepared demo dataset (real digit images), shared by the tests that read it."""
    from spl.data.demo import build_demo
    from spl.data.prepared import write_prepared

    root = tmp_path_factory.mktemp("demo_root")
    raw = build_demo(root / "demo", train_images=160, test_images=80, seed=0)
    write_prepared(raw, root / "demo" / "labels.h5")
    return root / "demo"


def kill_when_file_appears(
    process: subprocess.Popen, root: Path, pattern: str, timeout=300
) -> Path:
    """SIGKILL ``process`` as soon as a file matching ``root.glob(pattern)`` exists: an
    interruption in the middle of a run, at a point the test chooses."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        found = list(root.glob(pattern))
        if found:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"{pattern} did not appear before the process ended")


def user_arrays(tmp_path: Path, n_train=300, n_test=120, dim=24, classes=6, seed=0) -> dict:
    """A user's arrays for `spl import-features`, saved as .npy under ``tmp_path``: labels
    with one positive or more an image, features informative about them (class centres
    plus noise). Returns the command's options as ``{"train-features": path, ...}``."""
    import numpy as np

    rng = np.random.RandomState(seed)
    centers = rng.randn(classes, dim)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (rng.rand(n, classes) < 0.3).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, classes, n)] = 1
        feats = (labels @ centers + 0.8 * rng.randn(n, dim)).astype(np.float32)
        paths[f"{split}-features"] = tmp_path / f"{split}_f.npy"
        paths[f"{split}-labels"] = tmp_path / f"{split}_l.npy"
        np.save(paths[f"{split}-features"], feats)
        np.save(paths[f"{split}-labels"], labels)
    return paths


def import_user_arrays(runner: CliRunner, tmp_path: Path, **shape) -> Path:
    """`spl import-features` of :func:`user_arrays` (``shape``: its sizes) with class
    names c0, c1, ...; returns the prepared dataset's folder."""
    paths = user_arrays(tmp_path, **shape)
    classes = shape.get("classes", 6)
    (tmp_path / "names.txt").write_text("\n".join(f"c{i}" for i in range(classes)))
    args = ["import-features", tmp_path / "ds" / "mine"]
    for key, path in paths.items():
        args += [f"--{key}", path]
    invoke(runner, [*args, "--classes", tmp_path / "names.txt"])
    return tmp_path / "ds" / "mine"
