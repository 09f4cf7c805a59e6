"""``spl demo``: the pipeline end to end on the bundled digits, offline, on a laptop CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from spl.fit.losses import PAPER_LOSSES, SINCE_2021
from spl.reproduce import LINEARINIT, Plan, paper_agreement, reproduce


def demo_plan(root: Path, image_size: int, finetune_epochs: int, device: str) -> Plan:
    """The paper's linear protocol in full (9 losses x 4 lrs x 2 batch sizes x 25 epochs) on
    EfficientNet-Lite0 features, with the nine methods since the paper in the same sweep;
    the fine-tuned table reduced to its two LinearInit rows,
    one configuration each, a few epochs. Fine-tuning keeps BatchNorm's pretrained
    statistics: grey digit grids are far from ImageNet, and train-mode BatchNorm would first
    undo the linear head it starts from (see README)."""
    return Plan(
        tables=["linear", "recovery", "finetune"],
        datasets=["demo"],
        linear_losses=[*PAPER_LOSSES, *SINCE_2021],
        root=root / "datasets",
        runs=root / "runs",
        out=root / "tables",
        backbone="efficientnet_lite0",
        image_size=image_size,
        finetune_losses=[f"{k}+linearinit" for k in LINEARINIT],
        finetune_lrs=[1e-4],
        finetune_batch_sizes=[16],
        finetune_epochs=finetune_epochs,
        finetune_options={"batchnorm": "frozen"},
        device=device,
        jobs=1,
        figure_dataset="demo",
    )


def run_demo(
    root: Path,
    *,
    image_size: int = 64,
    finetune_epochs: int = 3,
    device: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    from spl.data.demo import build_demo
    from spl.data.prepared import format_summary, load_prepared, write_prepared

    start = time.perf_counter()
    dataset = root / "datasets" / "demo"
    if not (dataset / "labels.h5").exists():
        log("preparing the demo digits ...")
        raw = build_demo(dataset, seed=seed, force=True)
        write_prepared(raw, dataset / "labels.h5")
    log(format_summary(load_prepared(dataset).summary()))
    plan = demo_plan(root, image_size, finetune_epochs, device)
    result = reproduce(plan, log=log)
    for path in result["written"]:
        if path.suffix == ".md":
            log("")
            log(path.read_text().rstrip())
    log("")
    for line in paper_agreement(result["cells"]):
        log(line)
    if result["figure"]:
        log(f"figure: {result['figure']}")
    log(f"demo finished in {time.perf_counter() - start:.0f} s; tables in {plan.out}")
    return result
