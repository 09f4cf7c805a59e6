"""Fine-tuning throughput (issue: finetune, point 7), through the real `spl.finetune` code.

CPU (default): training images/s of EfficientNet-Lite0 on the demo digits at the demo's
image size, and the share of step time spent waiting for data.
GPU (--device cuda): ResNet-50 at 448 on synthetic VOC-sized JPEGs, fp32 against bf16
autocast + channels-last, each with JPEG decoding in DataLoader workers and with the
pre-resized image cache; images/s and data-wait share per mode.

    python benchmarks/bench_fit_linear.py ...  # sibling benchmark
    python benchmarks/bench_finetune.py [--device cuda] [--steps 40]

Prints a table and appends it to benchmarks/results/finetune.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spl.data.loaders import ImageSplits  # noqa: E402
from spl.data.prepared import load_prepared  # noqa: E402
from spl.data.runtime import Processes  # noqa: E402
from spl.extract.backbones import get_backbone  # noqa: E402
from spl.extract.features import unreadable_rows  # noqa: E402
from spl.fit.finetune import Classifier, FineTuner, Trainable, make_optimizer  # noqa: E402
from spl.fit.losses import get_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(dataset: Path, backbone: str, weights: str | None, size: int, batch: int, steps: int,
            device: str, amp: bool, channels_last: bool, cache: bool, workers: int | None) -> dict:  # fmt: skip
    """Train `steps` steps (after 5 warm-up steps) and time them."""
    procs = Processes.start(device)
    prepared = load_prepared(dataset)
    backbone_module, spec = get_backbone(backbone, weights)
    data = ImageSplits(
        prepared, image_size=size, mean=spec.mean, std=spec.std,
        observed="uniform-p1-n0-s1200", excluded=unreadable_rows(prepared), procs=procs,
        workers=workers, cache_images=cache,
    )  # fmt: skip
    loss = get_loss("an").make()
    model = Trainable(Classifier(backbone_module, spec.feature_dim, prepared.num_classes), loss, {})
    model = model.to(procs.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-4)
    tuner = FineTuner(loss, lr=1e-4, batch_size=batch, amp=amp, channels_last=channels_last)
    tuner.model_ = model
    timing = {"wait": 0.0, "step": 0.0, "n": 0}

    def on_step(step, waited, seconds):
        if step >= 5:  # warm-up steps excluded (cudnn autotune, worker start)
            timing["wait"] += waited
            timing["step"] += seconds
            timing["n"] += 1

    loader = data.train_loader(batch, seed=0, epoch=1)
    limited = _take(loader, steps + 5)
    tuner.train_epoch(model, optimizer, limited, procs.device, 1,
                       prepare=data.prepare(train=True), on_step=on_step)  # fmt: skip
    busy = timing["wait"] + timing["step"]
    return {
        "images_per_second": timing["n"] * batch / busy,
        "wait_share": timing["wait"] / busy,
        "steps": timing["n"],
    }


def _take(loader, count):
    for i, item in enumerate(loader):
        if i >= count:
            break
        yield item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=1024, help="GPU: synthetic JPEGs")
    parser.add_argument("--synthetic", action="store_true", help="the GPU modes on any device")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune.md")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="spl-bench-ft-"))
    rows = []
    if args.device == "cpu" and not args.synthetic:
        from spl.data.demo import build_demo
        from spl.data.prepared import write_prepared

        size = args.image_size or 128
        dataset = root / "demo"
        if not (dataset / "labels.h5").exists():
            write_prepared(
                build_demo(dataset, train_images=400, test_images=50), dataset / "labels.h5"
            )
        result = measure(dataset, "efficientnet_lite0", None, size, args.batch_size, args.steps,
                         "cpu", False, False, False, args.workers)  # fmt: skip
        machine = f"CPU ({torch.get_num_threads()} threads)"
        rows.append(
            (f"EfficientNet-Lite0, demo digits at {size}px, batch {args.batch_size}", result)
        )
    else:
        from synthetic import make_jpeg_dataset

        size = args.image_size or 448
        dataset = make_jpeg_dataset(root, args.images)
        machine = torch.cuda.get_device_name() if args.device != "cpu" else "CPU"
        for cache in (False, True):
            for amp in (False, True):
                start = time.perf_counter()
                fast = amp and args.device != "cpu"  # bf16 + channels-last are CUDA modes
                result = measure(dataset, "resnet50", "random", size, args.batch_size, args.steps,
                                 args.device, fast, fast, cache, args.workers)  # fmt: skip
                mode = f"{'bf16 + channels-last' if amp else 'fp32'}, {'cached pixels' if cache else 'JPEG decode in workers'}"
                rows.append((f"ResNet-50 at {size}px, batch {args.batch_size}: {mode}", result))
                print(f"{mode}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    lines = ["| setting | train images/s | data-wait share |", "|---|---|---|"]
    for name, result in rows:
        lines.append(
            f"| {name} | {result['images_per_second']:.1f} | {100 * result['wait_share']:.0f} % |"
        )
    table = "\n".join(lines)
    print(table)
    header = f"## {machine} — {time.strftime('%Y-%m-%d')} — torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else "# fine-tune benchmark results\n"
    args.out.write_text(
        previous.rstrip() + f"\n\n{header}\n\nCommand: `python {' '.join(sys.argv)}`\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
