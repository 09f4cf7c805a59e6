"""The paper's VOC-sized sweep across versions of spl, as the engine runs it and as a user
runs the command: what each version costs, side by side in one run on one machine.

For each source checkout (a `git worktree add --detach DIR COMMIT`, or any tree whose
`spl/` imports from its root), in turn:

- **command, cold**: `spl import-features` of the same VOC-sized arrays, then
  `spl fit-linear` timed from process start to exit, with empty compile and update-path
  caches (a fresh ``TORCHINDUCTOR_CACHE_DIR`` and ``XDG_CACHE_HOME``), as on a machine's
  first run;
- **command, warm**: the same command again with the caches the cold run filled;
- **engine, warm**: the sweep in-process (`StackedHeads(...).fit` and the test scored once,
  the child of ``ab_fit_linear.py``), with those caches.

    python benchmarks/bisect_fit_linear.py --source LABEL=DIR [--source LABEL=DIR ...]

Prints a table and appends it to benchmarks/results/fit_linear.md, naming the CPU and
whether anything else ran (the load average before and after).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_fit_linear import CHILD, cpu_model  # noqa: E402
from command_sweep import write_arrays  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _env(source: Path, caches: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(source),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "XDG_CACHE_HOME": str(caches / "xdg"),
    }


def _spl(source: Path, caches: Path, args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "spl", *args], env=_env(source, caches), cwd=cwd,
        capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"spl {args[0]} failed in {source}:\n{done.stdout}\n{done.stderr}")
    return seconds


def measure(source: Path, arrays: dict[str, Path], work: Path, epochs: int) -> dict:
    """Cold and warm command, warm engine, for one source tree."""
    caches = work / "caches"
    dataset = work / "voc-sized"
    args = ["import-features", str(dataset)]
    for key, path in arrays.items():
        args += [f"--{key}", str(path)]
    _spl(source, work / "import-caches", args, cwd=work)  # each version writes its own files
    fit = ["fit-linear", str(dataset), "--features", "imported", "--epochs", str(epochs),
           "--out", str(work / "runs"), "--quiet", "--device", "cpu"]  # fmt: skip
    out = {"command_cold": _spl(source, caches, fit, cwd=work)}
    out["command_warm"] = _spl(source, caches, fit, cwd=work)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(epochs)], env=_env(source, caches), cwd=work,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("SECONDS"))
    out["engine_warm"] = float(line.split()[1])
    runs = sorted((work / "runs").glob("*/*/linear-*/config.json"))
    timings = json.loads(runs[-1].read_text()).get("timings") if runs else None
    out["timings_warm"] = timings
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", required=True, help="LABEL=DIR")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_linear.md")
    args = parser.parse_args()
    sources = [item.split("=", 1) for item in args.source]
    root = Path(tempfile.mkdtemp(prefix="spl-bisect-"))
    arrays = write_arrays(root / "arrays")
    load_before = os.getloadavg()
    rows = []
    for label, directory in sources:
        work = root / label
        work.mkdir()
        result = measure(Path(directory).resolve(), arrays, work, args.epochs)
        rows.append((label, result))
        print(f"{label:<40} command cold {result['command_cold']:6.1f} s  warm "
              f"{result['command_warm']:6.1f} s  engine warm {result['engine_warm']:6.1f} s",
              flush=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)
    table = [
        "| version | command, cold (s) | command, warm (s) | engine in-process, warm (s) |",
        "|---|---|---|---|",
    ]
    for label, r in rows:
        table.append(f"| {label} | {r['command_cold']:.1f} | {r['command_warm']:.1f} | "
                     f"{r['engine_warm']:.1f} |")  # fmt: skip
    header = f"## Bisect — {cpu_model()}, {os.cpu_count()} CPUs — {time.strftime('%Y-%m-%d')}"
    note = (
        f"Command: `python {' '.join(sys.argv)}`. VOC-sized sweep (paper's 9 losses x 4 lrs x "
        f"2 batch sizes x {args.epochs} epochs). Load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min): anything above ~0.3 before means something else ran."
    )
    text = "\n".join([header, "", note, "", *table])
    print("\n" + text)
    for label, r in rows:
        if r.get("timings_warm"):
            print(f"{label} warm timings: {json.dumps(r['timings_warm'])}")
    previous = args.out.read_text() if args.out.exists() else "# fit-linear benchmark results\n"
    args.out.write_text(previous.rstrip() + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
