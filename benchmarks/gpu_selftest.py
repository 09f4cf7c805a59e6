"""Checks of the CUDA code paths, for a lent GPU (CI has none): run by gpu_check.sh.

1. The stacked engine on CUDA, eagerly and replaying CUDA graphs, against the CPU in
   float64 (every loss, two lrs, three epochs): the weights must agree.
2. The pipeline on CUDA with a random-weight ResNet-18 at 64 px on a small digits set:
   extract (nvJPEG route unused: PNGs), fit-linear (graphs), finetune with LinearInit,
   bf16 autocast, channels-last and the pre-resized cache, predict.

Prints PASS/FAIL lines; exits non-zero on a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spl.data.sampling import observe_uniform  # noqa: E402
from spl.fit.engine import StackedHeads  # noqa: E402
from spl.fit.losses import LOSSES, Scores  # noqa: E402

FAILURES: list[str] = []
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # `cpu` tries the script here


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def engine_checks() -> None:
    rng = np.random.RandomState(0)
    n, d, num_classes = 400, 64, 7
    centers = rng.randn(num_classes, d)
    labels = (rng.rand(n, num_classes) < 0.3).astype(np.uint8)
    labels[np.arange(n), rng.randint(0, num_classes, n)] = 1
    X = (labels @ centers + 0.5 * rng.randn(n, d)).astype(np.float32)
    observed, observed_iu = observe_uniform(labels, 1, 0), observe_uniform(labels, 1, 1)
    kwargs = dict(losses=list(LOSSES), lrs=[1e-2, 1e-3], batch_sizes=[8, 16], epochs=3,
                  expected_positives=1.8, loss_options={"gpr": {"grid": 2}})  # fmt: skip
    # cosines leaning towards the labels, for VLPL's and AEVLP's pseudo-labels
    image = 0.2 + 0.05 * labels + 0.02 * rng.randn(n, num_classes)
    scores = Scores(torch.tensor(image), torch.tensor(image[:, None] + 0.03 * rng.randn(n, 4, 7)))
    fit = dict(labels=labels, X_val=X[:100], Y_val=labels[:100], observed_iu=observed_iu,
               scores=scores)  # fmt: skip
    reference = StackedHeads(device="cpu", dtype=torch.float64, **kwargs).fit(X, observed, **fit)
    for graphs in (False, True):
        start = time.perf_counter()
        model = StackedHeads(device="cuda", cuda_graphs=graphs, **kwargs).fit(X, observed, **fit)
        seconds = time.perf_counter() - start
        worst = max(
            float((a.weight.double().cpu() - b.weight).abs().max())
            for a, b in zip(model.groups_, reference.groups_, strict=True)
        )
        import warnings

        captured = None
        if graphs:  # a failed capture warns and trains eagerly: make that a failure here
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                StackedHeads(device="cuda", cuda_graphs=True, **{**kwargs, "epochs": 1}).fit(
                    X, observed, **fit
                )
            captured = not any("capture failed" in str(w.message) for w in caught)
            check("CUDA graph captured", captured, str([str(w.message) for w in caught]))
        check(f"engine cuda graphs={graphs} vs cpu float64", worst < 2e-4,
              f"max |dw| = {worst:.2e}, {seconds:.1f} s, graphs released: {captured}")  # fmt: skip
        theta = max(
            float(
                (a.slots["role"].state["theta"].double().cpu() - b.slots["role"].state["theta"])
                .abs()
                .max()
            )
            for a, b in zip(model.groups_, reference.groups_, strict=True)
            if "role" in a.slots
        )
        check(f"ROLE estimator cuda graphs={graphs}", theta < 2e-3, f"max |dtheta| = {theta:.2e}")


def spl(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "spl", *args], cwd=cwd, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:])
    check("spl " + " ".join(args[:2]), done.returncode == 0)
    return done.stdout


def pipeline_checks() -> None:
    work = Path(tempfile.mkdtemp(prefix="spl-gpu-"))
    common = ["--device", DEVICE]
    spl("data", "prepare", "demo", "--root", str(work), "--train-images", "300",
        "--test-images", "100", cwd=work)  # fmt: skip
    dataset = str(work / "demo")
    spl("extract", dataset, "--backbone", "resnet18", "--weights", "random", "--image-size", "64",
        *common, cwd=work)  # fmt: skip
    tag = "resnet18-random-64"
    out = spl("fit-linear", dataset, "--features", tag, "--losses", "an,role", "--lrs", "1e-3",
              "--batch-sizes", "16", "--epochs", "5", "--quiet", "--out", str(work / "runs"),
              *common, cwd=work)  # fmt: skip
    print(out)
    (linear,) = (work / "runs" / "demo" / tag).glob("linear-*")
    out = spl("finetune", dataset, "--loss", "role", "--init-from", str(linear),
              "--backbone", "resnet18", "--weights", "random", "--image-size", "64",
              "--lrs", "1e-4", "--batch-sizes", "16", "--epochs", "2", "--cache-images",
              "--quiet", "--out", str(work / "runs"), *common, cwd=work)  # fmt: skip
    print(out)
    (run,) = (work / "runs" / "demo" / tag).glob("finetune-*")
    (config,) = [p for p in run.iterdir() if p.is_dir()]
    history = [json.loads(x) for x in (config / "history.jsonl").read_text().splitlines()]
    check("LinearInit epoch 0 = linear head's val mAP",
          abs(history[0]["val_map"] - history[0]["linear_val_map"]) < 0.5,
          f"{history[0]['val_map']:.2f} vs {history[0]['linear_val_map']:.2f} (bf16 autocast)")  # fmt: skip
    print(json.dumps(history, indent=1))
    image = work / "demo" / "images" / "test" / "00000.png"
    out = spl("predict", str(config / "best.pt"), str(image), "--device", DEVICE, cwd=work)
    check(f"predict on {DEVICE}", out.count("\n") == 6, out.splitlines()[1] if out else "")


def main() -> None:
    if DEVICE == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), flush=True)
        engine_checks()
    pipeline_checks()
    print("failures:", FAILURES or "none")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
