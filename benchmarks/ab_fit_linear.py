"""A/B of the linear engine: the paper's VOC-sized sweep (9 losses x 4 lrs x 2 batch sizes
x 25 epochs, test scored once) timed with this checkout and with another install of
`spl`, alternately, in one run on one machine: what a change did to the engine's speed.

    python benchmarks/ab_fit_linear.py --baseline DIR [--repeats 2] [--epochs 25]

DIR is put first on PYTHONPATH for the baseline's runs: a `pip install --target DIR` of
another commit's wheel, or a source checkout of it. Each run is a fresh process (so a
compile cache warmed by one side does not help the other, beyond what a user's second run
gets). Prints a table and appends it to benchmarks/results/fit_linear.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# The same synthetic VOC-sized data as bench_fit_linear.py, built with NumPy only so that
# any version of spl can run it.
CHILD = r"""
import inspect, sys, time
import numpy as np
from spl.data.sampling import observe_uniform
from spl.fit.engine import StackedHeads
from spl.fit.losses import PAPER_LOSSES

epochs = int(sys.argv[1])
rng = np.random.RandomState(0)
L, D, k = 20, 2048, 1.5
centers = np.abs(rng.randn(L, D)).astype(np.float32)
data = {}
for split, n in (("train", 4574), ("val", 1143), ("test", 5823)):
    labels = (rng.rand(n, L) < (k - 1) / L).astype(np.uint8)
    labels[np.arange(n), rng.randint(0, L, n)] = 1
    feats = labels.astype(np.float32) @ centers / 2 + np.abs(rng.randn(n, D)).astype(np.float32)
    data[split] = (feats.astype(np.float32), labels)
observed = observe_uniform(data["train"][1], 1, 0)
observed_iu = observe_uniform(data["train"][1], 1, 1)
parameters = inspect.signature(StackedHeads).parameters
if "expected_positives" in parameters:
    kwargs = {"expected_positives": k}
else:  # before the loss interface
    from spl.fit.losses import LossOptions
    kwargs = {"options": LossOptions(expected_positives=k)}
start = time.perf_counter()
model = StackedHeads(losses=PAPER_LOSSES, lrs=[1e-2, 1e-3, 1e-4, 1e-5], batch_sizes=[8, 16],
                     epochs=epochs, device="cpu", **kwargs)
Xtr, Ytr = data["train"]
model.fit(Xtr, observed, labels=Ytr, X_val=data["val"][0], Y_val=data["val"][1],
          observed_iu=observed_iu)
model.score(*data["test"])
print(f"SECONDS {time.perf_counter() - start:.3f}")
"""


def run(pythonpath: str, epochs: int) -> float:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(epochs)], env=env, cwd="/", capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("SECONDS"))
    return float(line.split()[1])


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(x.split(":", 1)[1].strip() for x in text.splitlines() if "model name" in x)
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_linear.md")
    args = parser.parse_args()
    sides = {"this checkout": str(REPO), f"baseline ({args.baseline})": str(args.baseline)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, path in sides.items():
            seconds = run(path, args.epochs)
            times[name].append(seconds)
            print(f"repeat {repeat + 1}: {name}: {seconds:.1f} s", flush=True)
    rows = [
        (name, ", ".join(f"{t:.1f}" for t in ts), statistics.median(ts))
        for name, ts in times.items()
    ]
    (new, _, new_median), (old, _, old_median) = rows
    table = ["| engine | runs (s) | median (s) |", "|---|---|---|"]
    table += [f"| {name} | {runs} | {median:.1f} |" for name, runs, median in rows]
    table.append(f"| baseline / this checkout | | {old_median / new_median:.2f}x |")
    header = (
        f"## A/B — {cpu_model()}, {os.cpu_count()} CPUs — {time.strftime('%Y-%m-%d')}\n\n"
        f"Command: `python {' '.join(sys.argv)}` (VOC-sized paper sweep, {args.epochs} "
        f"epochs, test scored once; runs alternate, each a fresh process)"
    )
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    previous = args.out.read_text() if args.out.exists() else "# fit-linear benchmark results\n"
    args.out.write_text(previous.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
