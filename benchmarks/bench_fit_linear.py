"""Speed and memory of `spl fit-linear`'s engine (issue: fit-linear, point 6).

f. The machine's floor for the sweep: its CPU model and caches, its copy bandwidth inside
   and beyond the caches, its GEMM rate at the sweep's shapes and one Adam pass over each
   group's stacked weights and ROLE estimators, each measured alone; the floor is what a
   sweep made of nothing but those kernels would take (steps x (forward GEMM + gradient
   GEMM + Adam passes) + the val and test scoring), printed next to part a's time.
a. VOC-sized synthetic features: the paper's full sweep (9 losses x 4 lrs x 2 batch sizes
   x 25 epochs) with the stacked engine, and side by side in the same run the same sweep
   done by a lean plain loop (one configuration at a time: a DataLoader over the feature
   rows, nn.Linear, torch.optim.Adam, the loss object built once; val and test scored
   once per epoch each, with one forward and scikit-learn's AP). A configuration costs
   the same whatever its learning rate, so by default it runs every loss at both batch
   sizes for one lr (18 of the 72 runs, full 25 epochs) and multiplies by the number of
   lrs; --reference-lrs all runs all 72.
b. COCO-sized features: seconds per epoch of the full sweep (timed over a slice of each
   group's epoch and scaled), peak memory, projected total.
c. mAP: the batched implementation against scikit-learn's per-class loop.
d. With --device cuda: the COCO-sized full sweep on the GPU (all 25 epochs).
s. The nine methods since the paper against the paper's nine, side by side in one run: each
   a full VOC-sized sweep over the paper's grid (72 heads x 25 epochs), after a two-epoch
   warm-up of each that compiles its step (reported separately: a cold compile cache
   costs it once per machine).
u. The sweep as a user runs it: `spl fit-linear` from process start to exit on VOC-sized
   imported features, cold (empty compile and update-path caches) and warm, for the paper's
   nine losses and the nine since; where the warm command's time goes beyond its steps
   (the run's config.json timings); its ratio to part a's lean loop and part f's floor when
   they ran first (`--parts f,a,u`).

    python benchmarks/bench_fit_linear.py --parts f,a,c [--device cpu]

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
from spl.fit.epoch import hidden_positive_histogram, split_map
from spl.fit.losses import (
    PAPER_LOSSES,
    SINCE_2021,
    WITH_NEGATIVES,
    Batch,
    Context,
    estimator_init,
    get_loss,
)

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


def reference_run(key, lr, bs, data, observed, observed_iu, epochs, k, device):
    """One configuration the way a lean plain loop trains it."""
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data["train"], data["val"], data["test"]
    loss = get_loss(key).make(context=Context(Ytr.shape[1], k))
    obs = observed_iu if loss.trains_on == WITH_NEGATIVES else observed
    rows = torch.utils.data.TensorDataset(
        torch.from_numpy(Xtr), torch.from_numpy(obs.astype(np.float32)),
        torch.from_numpy(Ytr.astype(np.float32)), torch.arange(len(Xtr)),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(rows, batch_size=bs, shuffle=True, drop_last=True)
    model = torch.nn.Linear(Xtr.shape[1], Ytr.shape[1]).to(device)
    groups = [{"params": model.parameters(), "lr": lr}]
    theta = None
    if key == "role":
        theta = torch.nn.Parameter(estimator_init(torch.tensor(obs)).to(device))
        groups.append({"params": [theta], "lr": lr * loss.lr_multiplier("theta")})
    optimizer = torch.optim.Adam(groups)
    X_val, X_test = torch.from_numpy(Xva).to(device), torch.from_numpy(Xte).to(device)
    best = -1.0
    for _ in range(epochs):
        for x, z, y, index in loader:
            state = {} if theta is None else {"estimates": theta[index.to(device)]}
            batch = Batch(z.to(device), y.to(device), state=state)
            optimizer.zero_grad()
            loss.batch_loss(model(x.to(device)), batch).backward()
            optimizer.step()
        with torch.no_grad():
            val = _sklearn_map(torch.sigmoid(model(X_val)).cpu().numpy(), Yva)
            _sklearn_map(torch.sigmoid(model(X_test)).cpu().numpy(), Yte)
        best = max(best, val)
    return best


# ------------------------------------------------------------------ parts


def _median_seconds(function, repeats: int = 9, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cache_sizes() -> dict[str, int]:
    """Bytes of each cache level (per core for L1/L2, per socket for L3), from sysfs."""
    sizes = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        sizes[f"L{level}"] = int(text.rstrip("KMG")) * scale
    return sizes


def copy_bandwidth(nbytes: int) -> float:
    """GB/s moved (read + write) by copying a buffer of ``nbytes``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), repeats=7 if nbytes < 2**28 else 3)
    return 2 * nbytes / seconds / 1e9


def floor_of_sweep(sizes: dict, heads_per_lr: int, epochs: int) -> dict:
    """Seconds the sweep's kernels take alone: per step the forward and gradient GEMMs and
    one Adam pass over the stacked weights and over ROLE's estimators (dense), per epoch the
    val scoring of every head, and the test scoring once."""
    from spl.evaluate.metrics import mean_average_precision
    from spl.fit.fused import denormals_flushed

    D, L = sizes["dim"] + 1, sizes["classes"]
    blocks, columns = len(PAPER_LRS), heads_per_lr * L
    out: dict = {"per_step": {}}
    with denormals_flushed():
        weight = torch.randn(blocks, D, columns) * 0.01
        moments = [torch.zeros_like(weight), torch.zeros_like(weight)]
        theta = torch.randn(blocks, sizes["train"], L)
        theta_moments = [torch.zeros_like(theta), torch.zeros_like(theta)]
        steps = [torch.ones(()) for _ in range(2)]

        def adam(param, grad, m, v, step):
            torch._fused_adam_([param], [grad], [m], [v], [], [step], lr=1e-3, beta1=0.9,
                               beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                               maximize=False)  # fmt: skip

        adam_weights = _median_seconds(lambda: adam(weight, weight, *moments, steps[0]))
        adam_theta = _median_seconds(lambda: adam(theta, theta, *theta_moments, steps[1]))
        total = total_sequence = 0.0
        for bs in PAPER_BATCH_SIZES:
            x = torch.randn(bs, D)
            grad_out = torch.randn(blocks, bs, columns)
            grad = torch.empty_like(weight)
            forward = _median_seconds(lambda x=x: torch.matmul(x, weight))
            backward = _median_seconds(
                lambda x=x, g=grad_out, o=grad: torch.matmul(x.t(), g, out=o)
            )
            step = forward + backward + adam_weights + adam_theta
            theta_grad = torch.zeros_like(theta)

            def back_to_back(x=x, g=grad_out, o=grad, t=theta_grad):
                # the same kernels in a step's order, each on its own tensors: what one
                # kernel leaves in the caches is what the next finds, as in the engine
                torch.matmul(x, weight)
                torch.matmul(x.t(), g, out=o)
                adam(weight, o, *moments, steps[0])
                adam(theta, t, *theta_moments, steps[1])

            sequence = _median_seconds(back_to_back, repeats=51, warmup=5)
            out["per_step"][bs] = {"forward": forward, "gradient": backward,
                                   "adam_weights": adam_weights, "adam_theta": adam_theta,
                                   "step": step, "sequence": sequence,
                                   "gflops": 2 * 2 * bs * D * blocks * columns
                                   / (forward + backward) / 1e9}  # fmt: skip
            total += epochs * (sizes["train"] // bs) * step
            total_sequence += epochs * (sizes["train"] // bs) * sequence
        val = torch.randn(sizes["val"], D)
        flat = weight.permute(1, 0, 2).reshape(D, -1)
        labels = (torch.rand(sizes["val"], L) < 0.1).float()
        score_val = _median_seconds(
            lambda: mean_average_precision((val @ flat).view(-1, blocks * heads_per_lr, L)
                                           .permute(1, 0, 2), labels, chunk=16), repeats=3,
        )  # fmt: skip
        scoring = epochs * len(PAPER_BATCH_SIZES) * score_val
        scoring += score_val * sizes["test"] / sizes["val"]  # the test split, once
        out["score_val"] = score_val
    out["total"] = total + scoring
    out["total_sequence"] = total_sequence + scoring
    return out


def part_f(args, rows):
    caches = cache_sizes()
    named = ", ".join(f"{k} {v / 2**20:g} MiB" for k, v in caches.items())
    rows.append(("f", f"CPU: {machine()}; caches: {named or 'unknown'}", ""))
    inside = int(min(caches.get("L2", 2**21), 2**22) * 0.5)
    l3 = caches.get("L3", 2**25)
    for label, nbytes in (
        (f"copy bandwidth inside L2 ({inside / 2**20:.1f} MiB buffer)", inside),
        (f"copy bandwidth inside L3 ({min(l3 // 4, 2**26) / 2**20:.0f} MiB)", min(l3 // 4, 2**26)),
        (f"copy bandwidth beyond the caches ({4 * l3 / 2**30:.1f} GiB)", 4 * l3),
    ):
        rows.append(("f", label, f"{copy_bandwidth(nbytes):.0f} GB/s"))
    floor = floor_of_sweep(VOC, len(PAPER_LOSSES), args.epochs)
    for bs, parts in floor["per_step"].items():
        rows.append((
            "f", f"batch {bs}, kernels alone: forward / gradient GEMM ({parts['gflops']:.0f} "
            "GFLOP/s), Adam over weights / ROLE estimators",
            f"{parts['forward'] * 1e3:.2f} / {parts['gradient'] * 1e3:.2f} / "
            f"{parts['adam_weights'] * 1e3:.2f} / {parts['adam_theta'] * 1e3:.2f} ms = "
            f"{parts['step'] * 1e3:.2f} ms a step",
        ))  # fmt: skip
    rows.append(("f", "val scoring of the 72 heads (one epoch of one group)",
                 f"{floor['score_val'] * 1e3:.0f} ms"))  # fmt: skip
    for bs, parts in floor["per_step"].items():
        rows.append(("f", f"batch {bs}: the same kernels back to back, a step",
                     f"{parts['sequence'] * 1e3:.2f} ms"))  # fmt: skip
    rows.append((
        "f", f"floor of the VOC-sized sweep ({args.epochs} epochs): kernels alone (hot caches) "
        "/ back to back (the machine's floor)",
        f"{floor['total']:.1f} s / {floor['total_sequence']:.1f} s",
    ))  # fmt: skip
    # Kernels alone re-read what they just wrote: on a CPU whose L3 holds less than a step's
    # working set (weights, Adam's moments, ROLE's estimators: ~31 MB at the VOC sizes),
    # only the back-to-back sequence pays the trips to memory that a real step pays.
    args.floor = floor["total_sequence"]


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
    rows.append(("a", f"same sweep, lean plain loop{note}", f"{reference:.0f} s"))
    rows.append(("a", "speed-up (lean loop / stacked)", f"{reference / ours:.1f}x"))
    args.reference = reference
    if getattr(args, "floor", None):
        rows.append(
            ("a", "stacked engine / the machine's floor (part f)", f"{ours / args.floor:.2f}x")
        )


def part_u(args, rows):
    """The sweep as a user runs it: `spl fit-linear` on VOC-sized imported features, from
    process start to exit, cold (empty compile and update-path caches) then warm, for the
    paper's nine losses and the nine since; where the warm command's time went."""
    import shutil
    import tempfile

    from command_sweep import cold_and_warm

    root = Path(tempfile.mkdtemp(prefix="spl-command-"))
    measured = {}
    try:
        for losses in ("paper", "since-2021"):
            result = cold_and_warm(root, losses, args.epochs)
            cold, warm = result["cold"], result["warm"][0]
            measured[losses] = warm["seconds"]
            for name, run in (("cold", cold), ("warm", warm)):
                rows.append(("u", f"`spl fit-linear --losses {losses}`, {name}: process start "
                             "to exit", f"{run['seconds']:.1f} s"))  # fmt: skip
            setup = {k: cold["timings"].get(k, 0) - warm["timings"].get(k, 0)
                     for k in ("setup", "first_step")}  # fmt: skip
            rows.append(("u", f"{losses}: cold start's extra (update-path timing; compiling "
                         "in the first steps)", f"{setup['setup']:.1f} s; "
                         f"{setup['first_step']:.1f} s"))  # fmt: skip
            t = warm["timings"]
            beyond = {
                "interpreter and imports": t.get("command", 0),
                "reading labels and features": t.get("read_labels", 0) + t.get("read_features", 0),
                "building the groups (update paths)": t.get("setup", 0),
                "first steps (compiled code loads)": t.get("first_step", 0),
                "val scoring and histograms": t.get("validation", 0),
                "loss hooks": t.get("loss_hooks", 0),
                "checkpoints and history": t.get("on_epoch", 0),
                "test scoring": t.get("test_scoring", 0),
                "writing results": t.get("write_results", 0) + t.get("open_run", 0),
            }
            rows.append(
                ("u", f"{losses}, warm: the steps themselves", f"{t.get('steps', 0):.1f} s")
            )
            rows.append(("u", f"{losses}, warm: beyond the steps", "; ".join(
                f"{k} {v:.1f} s" for k, v in beyond.items())))  # fmt: skip
            if losses == "paper" and getattr(args, "reference", None):
                for name, run in (("warm", warm), ("cold", cold)):
                    rows.append(("u", f"lean plain loop (part a) / the command, {name} "
                                 f"(target {'20' if name == 'warm' else '15'}x)",
                                 f"{args.reference / run['seconds']:.1f}x"))  # fmt: skip
            if losses == "paper" and getattr(args, "floor", None):
                rows.append(("u", "the command, warm / the machine's floor (part f; target 2x)",
                             f"{warm['seconds'] / args.floor:.2f}x"))  # fmt: skip
        rows.append(("u", "since-2021 / paper, warm commands (target at most 1.5x)",
                     f"{measured['since-2021'] / measured['paper']:.2f}x"))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def part_s(args, rows):
    data, observed, observed_iu = synthetic(VOC)
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = data["train"], data["val"], data["test"]
    measured = {}
    for name, losses in (("paper", PAPER_LOSSES), ("since-2021", SINCE_2021)):
        timings = {}
        for phase, epochs in (("warm-up", 2), ("sweep", args.epochs)):
            start = time.perf_counter()
            model = StackedHeads(
                losses=losses, lrs=PAPER_LRS, batch_sizes=PAPER_BATCH_SIZES, epochs=epochs,
                expected_positives=VOC["k"], device=args.device,
                # APL's warm-up must end inside the short run; the sweep keeps its default
                loss_options={"em_apl": {"warmup": 1}} if epochs <= 5 and "em_apl" in losses else None,
            ).fit(Xtr, observed, labels=Ytr, X_val=Xva, Y_val=Yva, observed_iu=observed_iu)  # fmt: skip
            model.score(Xte, Yte)
            timings[phase] = time.perf_counter() - start
        measured[name] = timings["sweep"]
        heads = len(losses) * len(PAPER_LRS) * len(PAPER_BATCH_SIZES)
        rows.append(("s", f"{name} losses ({heads} heads x {args.epochs} epochs), two-epoch "
                     "warm-up incl. compiling", f"{timings['warm-up']:.1f} s"))  # fmt: skip
        rows.append(("s", f"{name} losses, full sweep", f"{timings['sweep']:.1f} s"))
    ratio = measured["since-2021"] / measured["paper"]
    rows.append(("s", "since-2021 / paper (target at most 1.5x)", f"{ratio:.2f}x"))


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
        val = split_map(
            _aug(Xva, args.device),
            group.weight,
            torch.as_tensor(Yva, dtype=torch.float32, device=full_eval.device_),
            full_eval.eval_chunk_heads,
        )
        hidden = torch.as_tensor((Ytr == 1) & (observed == 0), device=full_eval.device_)
        hist = hidden_positive_histogram(
            group.weight, _aug(Xtr, args.device), hidden, full_eval.histogram_bins
        )
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


def _other_processes() -> str:
    """Processes other than this one using a CPU now (a benchmark must run alone)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--no-headers"],
                             capture_output=True, text=True).stdout  # fmt: skip
    except OSError:
        return ""
    busy = [line.split(None, 2) for line in out.splitlines()]
    busy = [f"{c} ({p} %)" for pid, p, c in busy if int(pid) != os.getpid() and float(p) > 20]
    return ", ".join(busy)


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
    parser.add_argument("--parts", default="f,a,c")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--reference-lrs", choices=["one", "all"], default="one")
    parser.add_argument("--coco-steps", type=int, default=200)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_linear.md")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    busy = _other_processes()
    if busy:
        rows.append(("-", "other busy processes at the start (the run is not alone)", busy))
    for part in args.parts.split(","):
        parts = {
            "a": part_a,
            "b": part_b,
            "c": part_c,
            "d": part_d,
            "f": part_f,
            "s": part_s,
            "u": part_u,
        }
        parts[part](args, rows)
        for row in rows:
            print(f"{row[0]}  {row[1]:<90} {row[2]}", flush=True)
        print()
    load = os.getloadavg()
    header = (
        f"## {machine()} — {time.strftime('%Y-%m-%d')} — torch {torch.__version__} — load "
        f"average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min; "
        "this run's own two threads give about 2)"
    )
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
