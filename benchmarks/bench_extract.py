"""Extraction speed: images/s of the data loading, of the model alone, and of the pipeline.

CPU, the demo set (the numbers in results/extract.md)::

    python benchmarks/bench_extract.py --device cpu --backbone efficientnet_lite0 \\
        --image-sizes 64,96,128 --results benchmarks/results/extract.md

GPU, synthetic 640x480 JPEGs, ResNet-50 at 448 with random weights (nothing to download)::

    python benchmarks/bench_extract.py --device cuda --synthetic 2000 --image-sizes 448 \\
        --backbone resnet50 --pretrained false --results results-gpu.md

For every image size it measures: the model-only ceiling (the same batches, already
normalised on the device, fed from memory), the data loading alone (workers decoding and
resizing, no model) and the whole extraction loop of ``spl extract`` for each decode route
(``pil``: PIL in the workers; ``device``: nvJPEG on the GPU). Steady-state rates come from
two runs, over one pass of the images and over ``--passes`` passes: (extra images) / (extra
seconds), so that worker start-up and the workers' head start cancel. Needs only torch,
torchvision, numpy, h5py and PIL (no scikit-learn, tqdm or click), and runs from a
checkout without installing spl.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spl.data.runtime import default_workers, resolve_device  # noqa: E402
from spl.extract.backbones import get_backbone  # noqa: E402
from spl.extract.run import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    FeatureStep,
    ImageFiles,
    Timing,
    chunk_batches,
    collate,
    make_loader,
    run_chunks,
)


def synthetic_jpegs(folder: Path, count: int, width: int = 640, height: int = 480) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus texture, quality 90), made in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{k:06d}.jpg" for k in range(count)]
    jobs = [(str(p), k, width, height) for k, p in enumerate(paths)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_one_jpeg, jobs, chunksize=16))
    return paths


def _one_jpeg(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = job
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray(rng.randint(0, 255, (6, 8, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def demo_paths(dataset: Path | None, train: int, test: int) -> tuple[list[Path], str]:
    from spl.data.prepared import SOURCES, load_prepared

    if dataset is None:
        from spl.data.demo import build_demo
        from spl.data.prepared import write_prepared

        dataset = Path(tempfile.mkdtemp(prefix="bench-demo-")) / "demo"
        write_prepared(
            build_demo(dataset, train_images=train, test_images=test), dataset / "labels.h5"
        )
    prepared = load_prepared(dataset)
    paths = [prepared.image_root / p for src in SOURCES for p in prepared.images[src]]
    return paths, f"demo ({len(paths)} PNGs of 64x64)"


def measure_ceiling(step: FeatureStep, files: ImageFiles, batch_size: int, count: int) -> float:
    """Model-only images/s: a few real batches, normalised on the device, fed again and again."""
    held = []
    for indices in chunk_batches(0, min(len(files), 4 * batch_size), batch_size):
        batch = collate([files[k] for k in indices])
        if len(indices) == batch_size:
            held.append(step.images(batch)[0])
    for x in held[:2]:  # warm-up (cuDNN autotuning)
        step.features(x)
    _sync(step)
    start, done, k = time.perf_counter(), 0, 0
    while done < count:
        out = step.features(held[k % len(held)])
        done += out.shape[0]
        k += 1
    _sync(step)
    return done / (time.perf_counter() - start)


def measure_data(
    files: ImageFiles, batch_size: int, workers: int, pin: bool, short: int, long: int
) -> float:
    """Data-only images/s: the DataLoader workers decoding and resizing, no model.

    Steady state: ``long - short`` images over the difference of the two runs' times, so
    that the workers' start-up and head start cancel.
    """

    def seconds(count: int) -> float:
        start = time.perf_counter()
        for _ in make_loader(files, chunk_batches(0, count, batch_size), workers, pin):
            pass
        return time.perf_counter() - start

    first = seconds(short)
    return (long - short) / max(seconds(long) - first, 1e-9)


def measure_pipeline(
    step: FeatureStep, files: ImageFiles, batch_size: int, workers: int, chunk: int, count: int
) -> tuple[Timing, float, np.ndarray]:
    """The extraction loop of ``spl extract`` over the first ``count`` images (chunks of
    ``chunk`` rows, features kept in memory): its timing, wall seconds and the features."""
    plan = [
        (start, chunk_batches(start, min(start + chunk, count), batch_size))
        for start in range(0, count, chunk)
    ]
    kept: list[np.ndarray] = []
    start = time.perf_counter()
    timing = run_chunks(
        step, files, plan, workers=workers, on_chunk=lambda key, a, b, e: kept.append(a)
    )
    _sync(step)
    return timing, time.perf_counter() - start, np.concatenate(kept)


def _sync(step: FeatureStep) -> None:
    if step.cuda:
        torch.cuda.synchronize(step.device)


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", text).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pretrained", default="true", choices=["true", "false"])
    parser.add_argument("--image-sizes", default="64,96,128")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="N synthetic JPEGs instead of the demo"
    )
    parser.add_argument("--dataset", type=Path, help="a prepared dataset (default: build the demo)")
    parser.add_argument("--demo-train", type=int, default=2000)
    parser.add_argument("--demo-test", type=int, default=1000)
    parser.add_argument(
        "--routes", default="auto", help="pil,device (auto: both on CUDA, pil on CPU)"
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=1, help="report medians of N repeats")
    parser.add_argument(
        "--passes", type=int, help="the long run reads the images P times [4 on CUDA, 2 on CPU]"
    )
    parser.add_argument(
        "--results", type=Path, help="Markdown file whose section this run replaces"
    )
    parser.add_argument(
        "--check", default="true", choices=["true", "false"], help="CUDA: compare with CPU float32"
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    routes = (
        (["pil", "device"] if cuda else ["pil"])
        if args.routes == "auto"
        else args.routes.split(",")
    )
    batch_size = args.batch_size or (128 if cuda else 32)
    workers = args.workers if args.workers is not None else default_workers()
    model, spec = get_backbone(args.backbone, pretrained=args.pretrained == "true")
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        if args.synthetic:
            start = time.perf_counter()
            paths = synthetic_jpegs(Path(tmp) / "jpegs", args.synthetic)
            what = f"{len(paths)} synthetic 640x480 JPEGs (made in {time.perf_counter() - start:.0f} s)"
        else:
            paths, what = demo_paths(args.dataset, args.demo_train, args.demo_test)
        machine = torch.cuda.get_device_name(device) if cuda else cpu_name()
        header = (
            f"{machine}; {os.cpu_count()} CPUs; torch {torch.__version__}; {args.backbone} "
            f"({spec.weights}); {what}; batch {batch_size}; {workers} workers; "
            f"threads {torch.get_num_threads()}"
        )
        passes = args.passes or (4 if cuda else 2)
        short, long = len(paths), passes * len(paths)
        header += f"; steady state from runs over {short} and {long} images ({passes} passes)"
        print(header, flush=True)
        rows, notes = [], []
        for size in [int(s) for s in args.image_sizes.split(",")]:
            runs: dict[str, list[dict]] = {route: [] for route in routes}
            for _ in range(args.repeat):  # interleaved, so that a busy moment hits all alike
                files = ImageFiles(paths * passes, size, "pil")
                step = FeatureStep(model, spec, size, device, files=files)
                ceiling = measure_ceiling(step, files, batch_size, long)
                data = measure_data(files, batch_size, workers, cuda, short, long)
                reference = None
                for route in routes:
                    files = ImageFiles(paths * passes, size, route)
                    step.files = files
                    _, first, features = measure_pipeline(
                        step, files, batch_size, workers, args.chunk_size, short
                    )
                    timing, wall, _ = measure_pipeline(
                        step, files, batch_size, workers, args.chunk_size, long
                    )
                    reference = features if reference is None else reference
                    runs[route].append(
                        {
                            "size": size,
                            "route": route,
                            "ceiling": ceiling,
                            "data": data,
                            "pipeline": long / wall,
                            "steady": (long - short) / max(wall - first, 1e-9),
                            "data_s": timing.data_s,
                            "model_s": timing.model_s,
                            "wall_s": wall,
                            "cosine": _cosine(features, reference),
                        }
                    )
                    print(_row(runs[route][-1]), flush=True)
            for route in routes:
                rows.append(_median(runs[route]))
            if cuda and args.check == "true":
                cosine = _cpu_check(model, spec, files, size, reference)
                notes.append(
                    f"{size} px: features of {step.compute} vs CPU float32, lowest cosine "
                    f"similarity over 16 images: {cosine:.5f}"
                )
                print(notes[-1], flush=True)
        if args.repeat > 1:
            notes.append(f"medians of {args.repeat} interleaved repeats")
        table = _table(header, rows, cuda, notes)
        print(table)
        if args.results:
            _update_results(args.results, f"{'gpu' if cuda else 'cpu'}-{args.backbone}", table)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a * b).sum(axis=1).min())


def _cpu_check(model, spec, files: ImageFiles, size: int, reference: np.ndarray) -> float:
    """The lowest cosine similarity between the CUDA features and float32 CPU features."""
    import copy

    cpu = FeatureStep(copy.deepcopy(model).float(), spec, size, torch.device("cpu"))
    count = min(16, len(files))
    batch = collate([ImageFiles(files.paths, size, "pil")[k] for k in range(count)])
    features = cpu(batch)[0].numpy()
    return _cosine(features, reference[:count])


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _row(r: dict) -> str:
    return (
        f"| {r['size']} | {r['route']} | {_rate(r['ceiling'])} | {_rate(r['data'])} "
        f"| {_rate(r['pipeline'])} | {_rate(r['steady'])} | {100 * r['steady'] / r['ceiling']:.0f} % "
        f"| {r['data_s']:.1f} / {r['model_s']:.1f} / {r['wall_s']:.1f} | {r['cosine']:.4f} |"
    )


def _median(runs: list[dict]) -> dict:
    """The run with the median steady throughput, with the median ceiling and data rates."""
    middle = sorted(runs, key=lambda r: r["steady"])[len(runs) // 2]
    return {
        **middle,
        "ceiling": float(np.median([r["ceiling"] for r in runs])),
        "data": float(np.median([r["data"] for r in runs])),
    }


def _table(header: str, rows: list[dict], cuda: bool, notes: list[str]) -> str:
    lines = [
        f"{'GPU' if cuda else 'CPU'}: {header}",
        "",
        "| size | decode | model-only ceiling img/s | data-only img/s (steady) "
        "| pipeline img/s (long run, with start-up) | pipeline img/s (steady) "
        "| steady / ceiling | long run: data wait / model / wall s | min cosine vs first route |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_row(r) for r in rows],
        *(["", *[f"- {note}" for note in notes]] if notes else []),
    ]
    return "\n".join(lines)


def _update_results(path: Path, key: str, table: str) -> None:
    """Replace the ``key`` section between markers in ``path`` (append it when absent)."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = path.read_text() if path.exists() else "# Extraction benchmarks\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
