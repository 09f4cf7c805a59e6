"""Scoring speed: images/s of the `spl pseudo-labels` scorer, one decode per image for the
whole image and its tiles, beside the naive way (decoding the file again for every tile).

CPU, synthetic 640x480 JPEGs (VOC-sized photos), a small open_clip model with random
weights (the numbers in results/scores.md)::

    python benchmarks/bench_scores.py --device cpu --scorer openclip:ViT-S-32 --grid 4 \\
        --images 96 --repeat 3 --results benchmarks/results/scores.md

For each way of reading the images it measures the data loading alone (DataLoader workers
decoding, cutting the g x g tiles and resizing the 1 + g*g views, no model) and the whole
scoring loop of ``spl pseudo-labels`` (the same :class:`ScoreStep` and ``run_chunks``, chunks
kept in memory), plus the model-only ceiling (the same batches, already on the device, fed
again and again). Rates count images (each with its 1 + g*g views) and include worker
start-up. It also checks that both ways give the same scores. Runs from a checkout without
installing spl; needs open_clip_torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spl.data.images import load_rgb  # noqa: E402
from spl.data.runtime import default_workers, resolve_device  # noqa: E402
from spl.extract.run import (  # noqa: E402
    ImageFiles,
    chunk_batches,
    collate,
    make_loader,
    run_chunks,
    tile_boxes,
)


class PerViewDecode(ImageFiles):
    """The naive way: the whole image and every tile each decode the file again."""

    def tiled(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        image = load_rgb(path)
        views = [self._pixels(image)]
        for box in tile_boxes(*image.size, self.grid):
            views.append(self._pixels(load_rgb(path).crop(box)))
        return torch.from_numpy(np.stack(views))


WAYS = {"one decode per image": ImageFiles, "decode per view (naive)": PerViewDecode}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or lscpu)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    from bench_extract import cpu_name as from_lscpu

    return from_lscpu() or platform.processor() or "unknown CPU"


def build_step(scorer: str, image_size: int, device: torch.device, classes: int):
    """The scorer of ``spl pseudo-labels`` with random weights and ``classes`` prompts."""
    from spl.extract.backbones import resolve_weights
    from spl.extract.libraries import import_library, openclip_model, split_name
    from spl.extract.scorer import ScoreStep, prompts_for, text_features

    arch = split_name(scorer)[1]
    _, weights, path, digest = resolve_weights(scorer, "random", None, True, None)
    model, spec = openclip_model(arch, weights, path, digest, image_size)
    tokens = import_library("openclip").get_tokenizer(arch)(
        prompts_for("a photo of a {}.", [f"class {k}" for k in range(classes)])
    )
    text = text_features(model.to(device), tokens, device)
    return ScoreStep(model.visual, text, spec, image_size, device)


def measure_ceiling(step, files: ImageFiles, batch_size: int, count: int) -> float:
    """Model-only images/s: two real batches on the device, scored again and again."""
    held = [collate([files[k] for k in b]) for b in chunk_batches(0, 2 * batch_size, batch_size)]
    step(held[0])  # warm-up
    _sync(step)
    start, done, k = time.perf_counter(), 0, 0
    while done < count:
        out, _ = step(held[k % len(held)])
        done += out["scores"].shape[0]
        k += 1
    _sync(step)
    return done / (time.perf_counter() - start)


def measure_data(files: ImageFiles, batch_size: int, workers: int, pin: bool) -> float:
    start = time.perf_counter()
    for _ in make_loader(files, chunk_batches(0, len(files), batch_size), workers, pin):
        pass
    return len(files) / (time.perf_counter() - start)


def measure_pipeline(step, files: ImageFiles, batch_size: int, workers: int, chunk: int):
    """The scoring loop over every image: (images/s, timing, scores and tiles)."""
    count = len(files)
    plan = [
        (start, chunk_batches(start, min(start + chunk, count), batch_size))
        for start in range(0, count, chunk)
    ]
    kept: list[dict] = []
    start = time.perf_counter()
    timing = run_chunks(
        step, files, plan, workers=workers, on_chunk=lambda key, a, b, e: kept.append(a)
    )
    _sync(step)
    wall = time.perf_counter() - start
    scores = np.concatenate([k["scores"] for k in kept])
    tiles = np.concatenate([k["tiles"] for k in kept]) if "tiles" in kept[0] else None
    return count / wall, timing, wall, scores, tiles


def _sync(step) -> None:
    if step.cuda:
        torch.cuda.synchronize(step.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scorer", default="openclip:ViT-S-32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--images", type=int, default=96, help="synthetic 640x480 JPEGs")
    parser.add_argument("--classes", type=int, default=20, help="prompts (VOC has 20)")
    parser.add_argument("--batch-size", type=int, help="images per batch [64 views on a CPU]")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=1, help="report medians of N repeats")
    parser.add_argument("--results", type=Path, help="Markdown file the table is appended to")
    args = parser.parse_args(argv)

    from bench_extract import synthetic_jpegs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    views = 1 + args.grid * args.grid
    batch_size = args.batch_size or max(1, (1024 if cuda else 64) // views)
    workers = args.workers if args.workers is not None else default_workers()
    load = os.getloadavg()
    step = build_step(args.scorer, args.image_size, device, args.classes)
    with tempfile.TemporaryDirectory(prefix="bench-scores-") as tmp:
        start = time.perf_counter()
        paths = synthetic_jpegs(Path(tmp) / "jpegs", args.images)
        made = time.perf_counter() - start
        machine = torch.cuda.get_device_name(device) if cuda else cpu_name()
        header = (
            f"{machine}; {os.cpu_count()} CPUs; torch {torch.__version__}; {args.scorer} "
            f"(random weights) at {args.image_size} px, {step.compute}; grid {args.grid} "
            f"({views} views per image); {args.classes} prompts; {len(paths)} synthetic 640x480 "
            f"JPEGs (made in {made:.0f} s); batch {batch_size} images; {workers} workers; "
            f"threads {torch.get_num_threads()}"
        )
        print(header, flush=True)
        first = ImageFiles(paths, args.image_size, "pil", grid=args.grid)
        ceilings, runs = [], {way: [] for way in WAYS}
        reference = None
        for _ in range(args.repeat):  # interleaved, so that a busy moment hits both alike
            ceilings.append(measure_ceiling(step, first, batch_size, len(paths)))
            for way, kind in WAYS.items():
                files = kind(paths, args.image_size, "pil", grid=args.grid)
                data = measure_data(files, batch_size, workers, cuda)
                rate, timing, wall, scores, tiles = measure_pipeline(
                    step, files, batch_size, workers, args.chunk_size
                )
                if reference is None:
                    reference = (scores, tiles)
                same = np.array_equal(scores, reference[0]) and (
                    tiles is None or np.array_equal(tiles, reference[1])
                )
                runs[way].append(
                    {
                        "way": way,
                        "data": data,
                        "pipeline": rate,
                        "data_s": timing.data_s,
                        "model_s": timing.model_s,
                        "wall_s": wall,
                        "same": same,
                    }
                )
                print(way, {k: v for k, v in runs[way][-1].items() if k != "way"}, flush=True)
        ceiling = float(np.median(ceilings))
        rows = [_median(runs[way]) for way in WAYS]
        notes = [
            f"model-only ceiling: {_rate(ceiling)} images/s ({_rate(ceiling * views)} views/s)"
        ]
        one, naive = rows
        notes.append(
            f"one decode per image vs per view: {one['pipeline'] / naive['pipeline']:.2f}x the "
            f"images/s of the scoring loop, {one['data'] / naive['data']:.1f}x of the data loading"
        )
        if args.repeat > 1:
            notes.append(f"medians of {args.repeat} interleaved repeats")
        # The benchmark's own threads and workers raise the end value; the start tells
        # whether other work shared the machine.
        busy = load[0] >= (os.cpu_count() or 1) - 0.5
        notes.append(
            f"load average (1 min) at the start {load[0]:.1f}, at the end {os.getloadavg()[0]:.1f}"
            f" on {os.cpu_count()} CPUs: "
            + ("other work shared the machine" if busy else "no other work at the start")
        )
        table = _table(header, rows, notes)
        print(table)
        if args.results:
            _append(args.results, table, " ".join(sys.argv[1:] if argv is None else argv))


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _median(runs: list[dict]) -> dict:
    middle = sorted(runs, key=lambda r: r["pipeline"])[len(runs) // 2]
    return {
        **middle,
        "data": float(np.median([r["data"] for r in runs])),
        "same": all(r["same"] for r in runs),
    }


def _table(header: str, rows: list[dict], notes: list[str]) -> str:
    lines = [
        header,
        "",
        "| images read | data-only img/s | scoring loop img/s | data wait / model / wall s "
        "| scores equal the first way's |",
        "|---|---|---|---|---|",
        *[
            f"| {r['way']} | {_rate(r['data'])} | {_rate(r['pipeline'])} "
            f"| {r['data_s']:.1f} / {r['model_s']:.1f} / {r['wall_s']:.1f} "
            f"| {'yes' if r['same'] else 'NO'} |"
            for r in rows
        ],
        "",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(lines)


def _append(path: Path, table: str, command: str) -> None:
    text = path.read_text() if path.exists() else SCORES_HEADER
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {stamp}\n\n`python benchmarks/bench_scores.py {command}`\n\n{table}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n" + section)


SCORES_HEADER = """# Scoring benchmarks (`benchmarks/bench_scores.py`)

The scorer of `spl pseudo-labels`: per image the whole image and its g x g tiles, each
resized, through an open_clip image tower; cosine with the prompts' text features.
**One decode per image**: a worker decodes the file once and cuts the tiles from the
decoded image (what `spl pseudo-labels` does); **decode per view (naive)**: the file is
decoded again for the whole image and for every tile. **data-only** = the DataLoader
workers alone; **scoring loop** = `run_chunks` with the `ScoreStep` of `spl pseudo-labels`;
rates in images (each with all its views), worker start-up included. Each run appends a
section.
"""


if __name__ == "__main__":
    main()
