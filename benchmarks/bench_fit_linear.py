"""Speed and memory of `spl fit-linear`'s engine (issue: fit-linear, point 6).

a. VOC-sized synthetic features: the paper's full sweep (9 losses x 4 lrs x 2 batch sizes
   x 25 epochs) with the stacked engine, and side by side in the same run the same sweep
   done the way the reference code does it (one configuration at a time, a DataLoader over
   features, torch.optim.Adam, val and test scored every epoch with scikit-learn's AP).
   The reference costs the same per configuration whatever its learning rate, so by
   default it runs every loss at both batch sizes for one lr (18 of the 72 runs, full 25
   epochs) and multiplies by the number of lrs; --reference-lrs all runs all 72.
b. COCO-sized features: seconds per epoch of the full sweep (timed over a slice of each
   group's epoch and scaled), peak memory, projected total.
c. mAP: the batched implementation against scikit-learn's per-class loop.
d. With --device cuda: the COCO-sized full sweep on the GPU (all 25 epochs).

    python benchmarks/bench_fit_linear.py --parts a,b,c [--device cpu]

Prints a table and writes benchmarks/results/fit_linear.md (one section per machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from spl.data.protocol import BATCH_SIZES as PAPER_BATCH_SIZES
from spl.data.protocol import LRS as PAPER_LRS
from spl.data.sampling import observe_uniform
from spl.evaluate.metrics import mean_average_precision
from spl.fit.engine import StackedHeads
from spl.fit.losses import PAPER_LOSSES, WITH_NEGATIVES, Batch, Context, estimator_init, get_loss

RESULTS = Path(__file__).resolve().parent / "results"
VOC = {"train": 4574, "val": 1143, "test": 5823, "dim": 2048, "classes": 20, "k": 1.5}
COCO = {"train": 65665, "val": 16416, "test": 40137, "dim": 2048, "classes": 80, "k": 2.9}


def synthetic(sizes: dict, seed: int = 0):
    """Features of a multi-label problem with the given split sizes (ReLU-like, non-negative)."""
    rng = np.random.RandomState(seed)
    L, D = sizes["classes"], sizes["dim"]
    centers = np.abs(rng.randn(L, D)).astype(np.float32)
    out = {}
    for split in ("train", "val", "test"):
        n = sizes[split]
        labels = (rng.rand(n, L) < (sizes["k"] - 1) / L).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, L, n)] = 1
        feats = labels.astype(np.float32) @ centers / 2 + np.abs(rng.randn(n, D)).astype(np.float32)
        out[split] = (feats.astype(np.float32), labels)
    observed = observe_uniform(out["train"][1], 1, 0)
    observed_iu = observe_uniform(out["train"][1], 1, 1)
    return out, observed, observed_iu


# ------------------------------------------------------------------ reference-style loop


class _FeatureDataset(torch.utils.data.Dataset):
    """As the reference code's feature dataset: one dict per item, copied from NumPy."""

    def __init__(self, feats, labels, observed):
        self.feats, self.labels, self.observed = feats, labels, observed

    def __len__(self):
        return len(self.feats)

    def __getitem__(self, idx):
        return {
            "feats": torch.FloatTensor(np.copy(self.feats[idx])),
            "label_vec_obs": torch.FloatTensor(np.copy(self.observed[idx])),
            "label_vec_true": torch.FloatTensor(np.copy(self.labels[idx])),
            "idx": idx,
        }


def _sklearn_map(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    aps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(labels.shape[1]):
            aps.append(
                average_precision_score(labels[:, j], scores[:, j]) if labels[:, j].any() else 0
            )
    return 100 * float(np.mean(aps))


def reference_run(loss, lr, bs, data, observed, observed_iu, epochs, k, device):
    """One configuration the way the reference code trains it."""
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data["train"], data["val"], data["test"]
    key = loss
    loss = get_loss(key).make(context=Context(Ytr.shape[1], k))
    obs = observed_iu if loss.trains_on == WITH_NEGATIVES else observed
    loaders = {
        "train": torch.utils.data.DataLoader(
            _FeatureDataset(Xtr, Ytr, obs), batch_size=bs, shuffle=True, drop_last=True
        ),
        "val": torch.utils.data.DataLoader(_FeatureDataset(Xva, Yva, Yva), batch_size=bs),
        "test": torch.utils.data.DataLoader(_FeatureDataset(Xte, Yte, Yte), batch_size=bs),
    }
    model = torch.nn.Linear(Xtr.shape[1], Ytr.shape[1]).to(device)
    groups = [{"params": model.parameters(), "lr": lr}]
    theta = None
    if key == "role":
        theta = torch.nn.Parameter(estimator_init(torch.tensor(obs)).to(device))
        groups.append({"params": [theta], "lr": lr * loss.lr_multiplier("theta")})
    optimizer = torch.optim.Adam(groups)
    best = -1.0
    for _ in range(epochs):
        model.train()
        for batch in loaders["train"]:
            feats = batch["feats"].to(device)
            state = {} if theta is None else {"estimates": theta[batch["idx"].to(device)]}
            lb = Batch(
                batch["label_vec_obs"].to(device), batch["label_vec_true"].to(device), state=state
            )
            optimizer.zero_grad()
            loss.batch_loss(model(feats), lb).backward()
            optimizer.step()
        model.eval()
        scores = {}
        with torch.no_grad():
            for phase in ("val", "test"):
                preds, labels = [], []
                for batch in loaders[phase]:
                    preds.append(torch.sigmoid(model(batch["feats"].to(device))).cpu().numpy())
                    labels.append(batch["label_vec_true"].numpy())
                scores[phase] = _sklearn_map(np.concatenate(preds), np.concatenate(labels))
        best = max(best, scores["val"])
    return best


# ------------------------------------------------------------------ parts


def part_a(args, rows):
    data, observed, observed_iu = synthetic(VOC)
    k = VOC["k"]
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data["train"], data["val"], data["test"]
    start = time.perf_counter()
    model = StackedHeads(
        losses=PAPER_LOSSES,
        lrs=PAPER_LRS,
        batch_sizes=PAPER_BATCH_SIZES,
        epochs=args.epochs,
        expected_positives=k,
        device=args.device,
    ).fit(Xtr, observed, labels=Ytr, X_val=Xva, Y_val=Yva, observed_iu=observed_iu)
    model.score(Xte, Yte)
    ours = time.perf_counter() - start
    lrs = PAPER_LRS if args.reference_lrs == "all" else PAPER_LRS[:1]
    start = time.perf_counter()
    for loss in PAPER_LOSSES:
        for bs in PAPER_BATCH_SIZES:
            for lr in lrs:
                reference_run(
                    loss, lr, bs, data, observed, observed_iu, args.epochs, k, args.device
                )
    measured = time.perf_counter() - start
    reference = measured * len(PAPER_LRS) / len(lrs)
    configs = len(PAPER_LOSSES) * len(PAPER_BATCH_SIZES) * len(PAPER_LRS)
    rows.append(
        (
            "a",
            f"VOC-sized full sweep ({configs} heads x {args.epochs} epochs), stacked engine",
            f"{ours:.1f} s",
        )
    )
    note = (
        ""
        if args.reference_lrs == "all"
        else f" (measured {len(PAPER_LOSSES) * 2 * len(lrs)} runs: {measured:.0f} s, x{len(PAPER_LRS) // len(lrs)})"
    )
    rows.append(("a", f"same sweep, reference-style loop{note}", f"{reference:.0f} s"))
    rows.append(("a", "speed-up (reference / stacked)", f"{reference / ours:.1f}x"))


def part_b(args, rows):
    data, observed, observed_iu = synthetic(COCO)
    k = COCO["k"]
    (Xtr, Ytr), (Xva, Yva), _ = data["train"], data["val"], data["test"]
    # The full sweep is far above the engine's threshold for compiling its CPU steps; the
    # short slices timed here are not, so they are told to compile as the sweep would.
    os.environ.setdefault("SPL_COMPILE", "1")
    per_epoch = 0.0
    for bs in PAPER_BATCH_SIZES:
        steps = args.coco_steps

        def heads(epochs, bs=bs):
            return StackedHeads(
                losses=PAPER_LOSSES, lrs=PAPER_LRS, batch_sizes=[bs], epochs=epochs,
                expected_positives=k, device=args.device,
            )  # fmt: skip

        # Warm up first (torch.compile's one-off compilation on a CPU, CUDA's first
        # launches): paid once per run, not per step, so it is reported on its own.
        start = time.perf_counter()
        heads(1).fit(Xtr[: 4 * bs], observed[: 4 * bs], labels=Ytr[: 4 * bs], X_val=Xva[:bs],
                     Y_val=Yva[:bs], observed_iu=observed_iu[: 4 * bs])  # fmt: skip
        warmup = time.perf_counter() - start
        # Time a slice of the epoch: train on the first `steps` batches' rows only.
        rows_used = steps * bs
        start = time.perf_counter()
        heads(1).fit(Xtr[:rows_used], observed[:rows_used], labels=Ytr[:rows_used],
                     X_val=Xva[:bs], Y_val=Yva[:bs], observed_iu=observed_iu[:rows_used])  # fmt: skip
        sliced = time.perf_counter() - start
        # The slice's estimator is smaller than the full one; time ROLE's dense Adam on the
        # full estimator separately and add the difference.
        theta_extra = _dense_estimator_adam_seconds(
            len(Xtr), COCO["classes"], len(PAPER_LRS), steps, args.device
        )
        theta_slice = _dense_estimator_adam_seconds(
            rows_used, COCO["classes"], len(PAPER_LRS), steps, args.device
        )
        step_seconds = (sliced + theta_extra - theta_slice) / steps
        start = time.perf_counter()
        full_eval = heads(0)
        full_eval.fit(Xtr, observed, labels=Ytr, X_val=Xva, Y_val=Yva, observed_iu=observed_iu)
        group = full_eval.groups_[0]
        full_eval._data = {"X": None}
        val = full_eval._map(
            _aug(Xva, args.device),
            group.weight,
            torch.as_tensor(Yva, dtype=torch.float32, device=full_eval.device_),
        )
        hist = full_eval._hidden_positive_histogram(group.weight, _aug(Xtr, args.device))
        eval_seconds = time.perf_counter() - start
        epoch_seconds = step_seconds * (len(Xtr) // bs) + eval_seconds
        per_epoch += epoch_seconds
        rows.append(
            (
                "b",
                f"COCO-sized, batch {bs}: s/step (36 heads), s/epoch",
                f"{step_seconds * 1e3:.1f} ms, {epoch_seconds:.0f} s",
            )
        )
        rows.append(("b", f"COCO-sized, batch {bs}: one-off warm-up (4 steps)", f"{warmup:.1f} s"))
        del val, hist
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows.append(
        ("b", "COCO-sized full sweep: seconds per epoch (both batch sizes)", f"{per_epoch:.0f} s")
    )
    rows.append(
        ("b", "COCO-sized: projected total for 25 epochs", f"{per_epoch * 25 / 3600:.1f} h")
    )
    rows.append(("b", "COCO-sized: peak resident memory", f"{peak:.1f} GiB"))


def _aug(X, device):
    X = torch.as_tensor(X, device=device)
    return torch.cat([X, X.new_ones(len(X), 1)], 1)


def _dense_estimator_adam_seconds(rows, classes, heads, steps, device):
    theta = torch.zeros(rows, classes, device=device, requires_grad=True)
    theta.grad = torch.zeros_like(theta)
    opt = torch.optim.Adam([theta], fused=True)
    opt.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(min(steps, 50)):
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / min(steps, 50) * steps * heads


def part_c(args, rows):
    rng = np.random.RandomState(0)
    heads, n, L = 72, VOC["test"], VOC["classes"]
    scores = rng.rand(heads, n, L).astype(np.float32)
    labels = (rng.rand(n, L) < 0.1).astype(np.int64)
    start = time.perf_counter()
    ours = mean_average_precision(torch.tensor(scores), torch.tensor(labels), chunk=16).numpy()
    batched = time.perf_counter() - start
    start = time.perf_counter()
    ref = [_sklearn_map(scores[h], labels) for h in range(heads)]
    loop = time.perf_counter() - start
    assert np.allclose(ours, ref, atol=1e-4)
    rows.append(
        (
            "c",
            f"mAP of {heads} heads on VOC test size: batched / sklearn loop",
            f"{batched:.2f} s / {loop:.2f} s = {loop / batched:.0f}x",
        )
    )


def part_d(args, rows):
    data, observed, observed_iu = synthetic(COCO)
    k = COCO["k"]
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data["train"], data["val"], data["test"]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()

    def progress(model, record):  # a killed run still shows how far it got
        print(
            f"  batch {record['group'].batch_size} epoch {record['epoch']}: "
            f"{record['seconds']:.1f} s, {time.perf_counter() - start:.0f} s so far",
            flush=True,
        )

    model = StackedHeads(
        losses=PAPER_LOSSES,
        lrs=PAPER_LRS,
        batch_sizes=PAPER_BATCH_SIZES,
        epochs=args.epochs,
        expected_positives=k,
        device="cuda",
        cuda_graphs=not args.no_graphs,
    ).fit(
        Xtr, observed, labels=Ytr, X_val=Xva, Y_val=Yva, observed_iu=observed_iu, on_epoch=progress
    )
    model.score(Xte, Yte)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    name = torch.cuda.get_device_name()
    peak = torch.cuda.max_memory_allocated() / 2**30
    rows.append(
        (
            "d",
            f"COCO-sized full sweep on {name} ({args.epochs} epochs, graphs {'off' if args.no_graphs else 'on'})",
            f"{total:.0f} s",
        )
    )
    rows.append(("d", "GPU peak memory", f"{peak:.1f} GiB"))


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in model.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--reference-lrs", choices=["one", "all"], default="one")
    parser.add_argument("--coco-steps", type=int, default=200)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_linear.md")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    for part in args.parts.split(","):
        {"a": part_a, "b": part_b, "c": part_c, "d": part_d}[part](args, rows)
        for row in rows:
            print(f"{row[0]}  {row[1]:<90} {row[2]}", flush=True)
        print()
    header = f"## {machine()} — {time.strftime('%Y-%m-%d')} — torch {torch.__version__}"
    table = "\n".join(
        ["| part | measurement | value |", "|---|---|---|"]
        + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    )
    record = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else "# fit-linear benchmark results\n"
    args.out.write_text(
        previous.rstrip() + f"\n\n{header}\n\nCommand: `python {' '.join(sys.argv)}`\n\n{table}\n"
    )
    (args.out.with_suffix(".jsonl")).open("a").write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
