"""The sweep as a user runs it: `spl fit-linear` on VOC-sized features, timed from process
start to the process's exit (every file written), cold and warm.

Cold: empty compile and update-path caches (a fresh ``TORCHINDUCTOR_CACHE_DIR`` and
``XDG_CACHE_HOME`` for the process), as on a machine's first run. Warm: the same caches a
second time. The run's ``config.json`` says where the command's time went (``timings``).

Used by ``bench_fit_linear.py --parts u``; runnable alone:

    python benchmarks/command_sweep.py [--losses paper] [--epochs 25] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOC = {"train": 4574, "val": 1143, "test": 5823, "dim": 2048, "classes": 20, "k": 1.5}


def write_arrays(folder: Path, seed: int = 0) -> dict[str, Path]:
    """VOC-sized synthetic features and labels as the .npy files `spl import-features`
    reads: the trainval file (train + val rows) and the test file."""
    rng = np.random.RandomState(seed)
    L, D = VOC["classes"], VOC["dim"]
    centers = np.abs(rng.randn(L, D)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", VOC["train"] + VOC["val"]), ("test", VOC["test"])):
        labels = (rng.rand(n, L) < (VOC["k"] - 1) / L).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, L, n)] = 1
        feats = labels.astype(np.float32) @ centers / 2 + np.abs(rng.randn(n, D)).astype(np.float32)
        paths[f"{split}-features"] = folder / f"{split}_features.npy"
        paths[f"{split}-labels"] = folder / f"{split}_labels.npy"
        np.save(paths[f"{split}-features"], feats.astype(np.float32))
        np.save(paths[f"{split}-labels"], labels)
    return paths


def spl_command() -> list[str]:
    return [sys.executable, "-m", "spl"]


def prepare(root: Path) -> Path:
    """The dataset folder with labels.h5 and features/imported.h5 (made once per root)."""
    dataset = root / "voc-sized"
    if (dataset / "features" / "imported.h5").exists():
        return dataset
    paths = write_arrays(root / "arrays")
    args = [*spl_command(), "import-features", str(dataset)]
    for key, path in paths.items():
        args += [f"--{key}", str(path)]
    subprocess.run(args, check=True, capture_output=True)
    return dataset


def time_command(
    dataset: Path, runs: Path, caches: Path, losses: str, epochs: int, extra_env=None
) -> dict:
    """Seconds from the process's start to its exit, and the run's own timings record."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "XDG_CACHE_HOME": str(caches / "xdg"),
        **(extra_env or {}),
    }
    before = set(runs.glob("*/*/linear-*")) if runs.exists() else set()
    command = [*spl_command(), "fit-linear", str(dataset), "--features", "imported",
               "--losses", losses, "--epochs", str(epochs), "--out", str(runs), "--quiet",
               "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fit-linear failed:\n{done.stdout}\n{done.stderr}")
    (run,) = set(runs.glob("*/*/linear-*")) - before
    config = json.loads((run / "config.json").read_text())
    return {"seconds": seconds, "timings": config.get("timings", {}), "run": str(run)}


def cold_and_warm(root: Path, losses: str = "paper", epochs: int = 25, warm_runs: int = 1):
    """One cold run (empty caches), then ``warm_runs`` with the caches it filled."""
    dataset = prepare(root)
    caches = root / f"caches-{losses}-{time.time_ns()}"
    out = {"cold": time_command(dataset, root / "runs", caches, losses, epochs)}
    out["warm"] = [
        time_command(dataset, root / "runs", caches, losses, epochs) for _ in range(warm_runs)
    ]
    shutil.rmtree(caches, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default="paper")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--warm-runs", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="Work folder to keep (reused).")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="spl-command-"))
    result = cold_and_warm(root, args.losses, args.epochs, args.warm_runs)
    print(json.dumps(result, indent=2))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
