"""The extraction loop: a model over every image of a prepared dataset, chunked, resumable,
sharded. Backbone features (``spl extract``, :func:`extract_features`) and vision-language
scores (``spl pseudo-labels``, :mod:`spl.extract.scorer`) are both a :class:`ChunkedPass`
run by :func:`run_pass`.

Rows are cut into chunks of ``chunk_size`` rows per source file, and each chunk into
batches the same way whatever the number of processes, so a single process and a torchrun
job compute the same batches and write the same file. A finished chunk is one ``.npz`` in
``<folder>/.<tag>.partial/`` (temporary name, then rename: a killed run leaves only whole
chunks), beside a manifest of the settings; a rerun with the same settings computes only
the missing chunks. When every chunk exists, rank 0 writes the file (``features/<tag>.h5``
through :func:`spl.extract.features.write_features`, ``scores/<tag>.h5`` through
:func:`spl.extract.scores.write_scores`; atomic) and removes the partial folder.

Images travel from the DataLoader workers as uint8 (decoded and resized there with PIL, or
as JPEG bytes for decoding on the GPU with nvJPEG); scaling and normalisation happen on the
compute device. This gives the paper's evaluation transform exactly
(:func:`spl.data.images.build_transform`) at a quarter of the bytes per image. With a tile
grid a worker decodes each image once and sends the whole image and its tiles, each
resized, as one ``[1 + g*g, s, s, 3]`` item.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spl.data import protocol
from spl.data.common import SplError, safe_relative, write_json_atomic
from spl.data.images import load_rgb
from spl.data.prepared import SOURCES, PreparedDataset, load_prepared
from spl.data.runtime import Processes, default_workers
from spl.extract.backbones import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    backbone_tag,
    build_resolved,
    resolve_weights,
)

DECODE_ROUTES = ("pil", "device")
DTYPES = ("float32", "float16")
DEFAULT_CHUNK_SIZE = 512  # a multiple of the default batch sizes; VOC gives 8 GPUs 3 chunks each
PARTIAL_FORMAT = "spl.features.partial"
_JPEG_MAGIC = b"\xff\xd8\xff"
_CHUNK_KEYS = ("bad", "errors")  # what a chunk file holds besides the arrays


# --- reading images ----------------------------------------------------------------------


class ImageFiles(Dataset):
    """Image files by index, as uint8 for the device: never raises, reports errors instead.

    Item: ``(payload, index, error)``. Route ``pil``: payload ``[s, s, 3]`` uint8, decoded
    and resized with PIL exactly as ``transforms.Resize((s, s))`` does. Route ``device``:
    a JPEG's encoded bytes (1-D uint8) for :class:`FeatureStep` to decode; other formats
    are decoded here as with ``pil``. With a tile ``grid`` g > 0 (route ``pil``): payload
    ``[1 + g*g, s, s, 3]``, the whole image, then its tiles (:func:`tile_boxes`), each
    resized to ``s x s``, all from one decode. An unreadable file gives zero pixels and its
    error.
    """

    def __init__(
        self, paths: Sequence[Path], image_size: int, route: str = "pil", grid: int = 0
    ) -> None:
        if route not in DECODE_ROUTES:
            raise ValueError(f"decode route {route!r} not in {DECODE_ROUTES}")
        if grid and route != "pil":
            raise ValueError("tiles are cut in the workers: use the decode route 'pil'")
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.route = route
        self.grid = int(grid)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def views(self) -> int:
        """Images per item: 1, or the whole image and its g*g tiles."""
        return 1 + self.grid * self.grid

    def _pixels(self, image) -> np.ndarray:
        """``transforms.Resize((s, s))`` of a PIL image, as ``[s, s, 3]`` uint8."""
        from PIL import Image

        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        return np.array(image, dtype=np.uint8, copy=True)

    def resized(self, index: int) -> torch.Tensor:
        """Decode and resize with PIL: ``[s, s, 3]`` uint8. Raises SplError naming the file."""
        return torch.from_numpy(self._pixels(load_rgb(self.paths[index])))

    def tiled(self, index: int) -> torch.Tensor:
        """One decode; the whole image and each tile resized: ``[1 + g*g, s, s, 3]`` uint8."""
        image = load_rgb(self.paths[index])
        views = [self._pixels(image)]
        views += [self._pixels(image.crop(box)) for box in tile_boxes(*image.size, self.grid)]
        return torch.from_numpy(np.stack(views))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            if self.grid:
                return self.tiled(index), index, ""
            if self.route == "device":
                data = _read_bytes(self.paths[index])
                if data[:3] == _JPEG_MAGIC:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), index, ""
            return self.resized(index), index, ""
        except SplError as exc:
            shape = (self.image_size, self.image_size, 3)
            if self.grid:
                shape = (self.views, *shape)
            return torch.zeros(shape, dtype=torch.uint8), index, str(exc)


def tile_boxes(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The g x g non-overlapping tiles of a ``width x height`` image as PIL boxes (left,
    upper, right, lower), row by row from the top left, as AEVLP cuts them
    (datasets.py:267-331, with its overlap offsets of 0): ``width // g`` x ``height // g``
    pixels each, so the last ``width % g`` columns and ``height % g`` rows are in no tile.
    An image narrower or lower than g pixels gets 1-pixel tiles, clamped to the image."""
    tile_w, tile_h = max(1, width // grid), max(1, height // grid)
    boxes = []
    for y in range(grid):
        for x in range(grid):
            left, upper = min(x * tile_w, width - 1), min(y * tile_h, height - 1)
            right = min(max(left + 1, (x + 1) * tile_w), width)
            lower = min(max(upper + 1, (y + 1) * tile_h), height)
            boxes.append((left, upper, right, lower))
    return boxes


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise SplError(f"image not found: {path}") from exc
    except OSError as exc:
        raise SplError(f"cannot read image {path}: {exc}") from exc


@dataclass
class Batch:
    """A collated batch: images stacked ``[B, s, s, 3]`` (``[B, 1 + g*g, s, s, 3]`` with
    tiles; a list when some are JPEG bytes)."""

    images: torch.Tensor | list[torch.Tensor]
    index: torch.Tensor
    errors: list[str]

    def pin_memory(self) -> Batch:
        if isinstance(self.images, torch.Tensor):
            images = self.images.pin_memory()
        else:
            images = [image.pin_memory() for image in self.images]
        return Batch(images, self.index, self.errors)


def collate(items: list[tuple[torch.Tensor, int, str]]) -> Batch:
    payloads = [payload for payload, _, _ in items]
    index = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
    errors = [error for _, _, error in items]
    if all(p.dim() >= 3 for p in payloads):  # decoded: an image, or an image and its tiles
        return Batch(torch.stack(payloads), index, errors)
    return Batch(payloads, index, errors)


# --- the model step ----------------------------------------------------------------------


class FeatureStep:
    """Backbone plus on-device preprocessing: a :class:`Batch` in, ``[B, D]`` features out.

    Channels-last everywhere; on CUDA also bf16 autocast (``amp``), non-blocking copies and
    JPEGs decoded by nvJPEG (route ``device``). The input is the paper's transform bit for
    bit (route ``pil``).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        image_size: int,
        device: torch.device,
        *,
        amp: bool = True,
        files: ImageFiles | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.image_size = int(image_size)
        self.files = files
        self.amp_dtype = None
        if amp and self.cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # channels-last: faster on GPUs and, with oneDNN, on CPUs too (1.2-1.8x measured)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)[:, None, None]
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    @property
    def compute(self) -> str:
        """How features were computed (they differ slightly between these)."""
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        return f"{self.device.type} {precision.get(self.amp_dtype, 'float32')}, channels_last"

    def images(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        """uint8 batch -> normalised ``[B, 3, s, s]`` float on the device (and decode errors)."""
        errors = list(batch.errors)
        if isinstance(batch.images, torch.Tensor):
            pixels = batch.images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        else:
            pixels = self._decode(batch.images, batch.index.tolist(), errors)
        # ToTensor then Normalize, in the same float32 operations as build_transform.
        x = pixels.float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last), errors

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images on the device -> float32 features on the device."""
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            return self.model(x).float()

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> tuple[torch.Tensor, list[str]]:
        x, errors = self.images(batch)
        return self.features(x), errors

    def _decode(self, payloads: list[torch.Tensor], index: list[int], errors: list[str]):
        """Decode JPEG bytes on the device (nvJPEG on CUDA) and resize there, antialiased."""
        import warnings

        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as _decode_jpeg
        from torchvision.transforms.v2 import functional as tvf

        def decode_jpeg(data, **kwargs):
            with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; it works
                warnings.simplefilter("ignore", DeprecationWarning)
                return _decode_jpeg(data, **kwargs)

        size = [self.image_size, self.image_size]
        out: list[torch.Tensor | None] = [None] * len(payloads)
        jpegs = [k for k, p in enumerate(payloads) if p.dim() == 1]
        for k, p in enumerate(payloads):
            if p.dim() == 3:
                out[k] = p.to(self.device, non_blocking=True).permute(2, 0, 1)
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(
                decode_jpeg(
                    [payloads[k] for k in jpegs], mode=ImageReadMode.RGB, device=self.device
                )
            )
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            decoded = []
            for k in jpegs:
                try:
                    decoded.append(
                        decode_jpeg(payloads[k], mode=ImageReadMode.RGB, device=self.device)
                    )
                except RuntimeError:
                    decoded.append(None)
        for k, image in zip(jpegs, decoded, strict=True):
            if image is None:  # e.g. CMYK or corrupt: PIL decides (and names the file)
                try:
                    image = self.files.resized(index[k]).to(self.device).permute(2, 0, 1)
                except SplError as exc:
                    errors[k] = str(exc)
                    image = torch.zeros((3, *size), dtype=torch.uint8, device=self.device)
            elif list(image.shape[-2:]) != size:
                image = tvf.resize(image, size, antialias=True)
            out[k] = image
        return torch.stack(out)


def chunk_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    return [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]


@dataclass
class Timing:
    images: int = 0
    data_s: float = 0.0
    model_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        wall = max(self.wall_s, 1e-9)
        return (
            f"{self.images} images in {wall:.1f} s: {self.images / wall:.1f} images/s "
            f"(waiting for data {self.data_s:.1f} s, model {self.model_s:.1f} s)"
        )


def make_loader(
    files: ImageFiles, batches: list[list[int]], workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        files,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


Output = torch.Tensor | dict[str, torch.Tensor]  # what a step gives for a batch


def run_chunks(
    step: Callable[[Batch], tuple[Output, list[str]]],
    files: ImageFiles,
    chunks: list[tuple[object, list[list[int]]]],
    *,
    workers: int,
    on_chunk: Callable[[object, np.ndarray | dict[str, np.ndarray], list[int], list[str]], None],
    timing: Timing | None = None,
    progress: Callable[[int], None] | None = None,
) -> Timing:
    """Run ``step`` (a :class:`FeatureStep` or :class:`spl.extract.scorer.ScoreStep`) over
    ``chunks`` (key, batches of indices) and hand each finished chunk to ``on_chunk(key,
    outputs, bad positions, their errors)``: float32 ``[n, ...]``, one array per name when
    the step gives a dict of tensors.

    ``on_chunk`` runs in a background thread (one chunk at a time, in order) so that
    writing a chunk does not leave the device idle; its errors surface here.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    timing = timing or Timing()
    plan = [(key, len(batches), b) for key, batches in chunks for b in batches]
    if not plan:
        return timing
    loader = make_loader(files, [b for _, _, b in plan], workers, pin_memory=step.cuda)
    outputs: list[Output] = []
    bad: list[int] = []
    errors: list[str] = []
    done_in_chunk, offset = 0, 0
    saving: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as saver:
        batches = iter(loader)
        tick = time.perf_counter()
        for key, n_batches, indices in plan:
            batch = next(batches)
            now = time.perf_counter()
            timing.data_s += now - tick
            output, batch_errors = step(batch)
            outputs.append(output)
            for position, error in enumerate(batch_errors):
                if error:
                    bad.append(offset + position)
                    errors.append(error)
            offset += len(indices)
            done_in_chunk += 1
            if done_in_chunk == n_batches:
                arrays = _concatenate(outputs)  # waits for the device
                if saving is not None:
                    saving.result()  # the previous chunk's error, if any, stops the run here
                saving = saver.submit(on_chunk, key, arrays, bad, errors)
                outputs, bad, errors, done_in_chunk, offset = [], [], [], 0, 0
            timing.model_s += time.perf_counter() - now
            timing.images += len(indices)
            if progress is not None:
                progress(len(indices))
            tick = time.perf_counter()
        if saving is not None:
            saving.result()
    return timing


def _concatenate(outputs: list[Output]) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(outputs[0], dict):
        return {name: torch.cat([o[name] for o in outputs]).cpu().numpy() for name in outputs[0]}
    return torch.cat(outputs).cpu().numpy()


# --- the pass ----------------------------------------------------------------------------


@dataclass
class ExtractResult:
    path: Path
    tag: str
    status: str  # "written" or "exists"
    images: int = 0
    computed_chunks: int = 0
    resumed_chunks: int = 0
    bad: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    timing: Timing | None = None
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Chunk:
    source: str
    number: int
    start: int
    stop: int
    offset: int  # index of row `start` in the flat list of all images

    @property
    def name(self) -> str:
        return f"{self.source}-{self.number:06d}"


def plan_chunks(counts: dict[str, int], chunk_size: int) -> list[_Chunk]:
    chunks, offset = [], 0
    for source in SOURCES:
        for number, start in enumerate(range(0, counts[source], chunk_size)):
            stop = min(start + chunk_size, counts[source])
            chunks.append(_Chunk(source, number, start, stop, offset + start))
        offset += counts[source]
    return chunks


Arrays = dict[str, np.ndarray]


@dataclass
class ChunkedPass:
    """What one chunked, resumable, sharded pass over a prepared dataset's images computes
    and writes; :func:`run_pass` runs it.

    ``step`` turns a :class:`Batch` into float32 outputs (a tensor, stored as ``features``,
    or a dict of named tensors), each ``[B, ...]`` in batch order. A finished chunk's arrays
    are kept in ``dtype``, NaN on its bad rows; NaN or infinite values elsewhere are refused
    with ``invalid`` (who gave them, e.g. 'the backbone gave NaN or infinite features').
    ``write`` gets every stored array by name and source file, in row order, and the bad
    rows of each source file, and writes ``final`` atomically. ``settings``: what a resumed
    run must share with the chunks already written.
    """

    final: Path
    settings: dict
    files: ImageFiles
    step: Callable[[Batch], tuple[Output, list[str]]]
    dtype: str
    invalid: str
    write: Callable[[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]], None]
    done: str = "extracted"  # the verb of the summary line: "extracted 240 images in ..."

    @property
    def partial(self) -> Path:
        return self.final.parent / f".{self.final.stem}.partial"


def run_pass(
    job: ChunkedPass,
    procs: Processes,
    prepared: PreparedDataset,
    *,
    batch_size: int,
    workers: int | None,
    chunk_size: int | None,
    skip_bad: bool,
    force: bool,
    progress: bool,
    say: Callable[[str], None],
    chunk_pause: float = 0.0,
) -> ExtractResult:
    """Compute the chunks of ``job`` this process owns (all of them without torchrun), then,
    on rank 0 once every rank is done, write the file and drop the partial folder.

    Resumes from the chunks an interrupted run with the same settings left (a run with
    other settings is refused); ``force`` starts over. Unreadable images stop the run,
    naming the row, unless ``skip_bad``. ``chunk_pause`` sleeps after each chunk (tests)."""
    final, partial, name = job.final, job.partial, _RowNames(prepared)
    procs.together(lambda: _open_partial(partial, job.settings, chunk_size, force), everyone=False)
    manifest = json.loads((partial / "manifest.json").read_text())
    counts = {src: len(prepared.images[src]) for src in SOURCES}
    chunks = plan_chunks(counts, int(manifest["chunk_size"]))
    done = {p.name.removesuffix(".npz") for p in partial.glob("*.npz")}
    procs.all_ok(True)  # every rank has listed the done chunks before any writes one
    pending = [c for c in chunks if c.name not in done]
    mine = pending[procs.rank :: procs.world]
    if done:
        say(f"resuming {final.name}: {len(chunks) - len(pending)} of {len(chunks)} chunks done")
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    bar = _progress_bar(
        progress and procs.rank == 0, sum(c.stop - c.start for c in mine), final.stem
    )

    def save(chunk: _Chunk, output, bad: list[int], errors: list[str]) -> None:
        if errors and not skip_bad:
            raise SplError(
                f"{name(chunk.offset + bad[0])}: {errors[0]}. Fix or restore the image and "
                "rerun (finished chunks are kept), or pass --skip-bad to record unreadable "
                "images as bad rows and go on"
            )
        arrays = output if isinstance(output, dict) else {"features": output}
        stored = {}
        for key, computed in arrays.items():
            with np.errstate(over="ignore"):  # overflow is reported by check_finite
                stored[key] = computed.astype(job.dtype)
            stored[key][bad] = np.nan
            check_finite(
                computed, stored[key], bad, lambda row: name(chunk.offset + row), job.invalid
            )
        _save_chunk(partial / f"{chunk.name}.npz", stored, np.asarray(bad, np.int64), errors)
        if chunk_pause:
            time.sleep(chunk_pause)

    def work() -> Timing:
        plan = [(c, chunk_batches(c.offset, c.offset + c.stop - c.start, batch_size)) for c in mine]
        try:
            return run_chunks(
                job.step,
                job.files,
                plan,
                workers=workers,
                on_chunk=save,
                progress=bar.update if bar else None,
            )
        except torch.cuda.OutOfMemoryError as exc:
            raise SplError(
                f"out of GPU memory at batch size {batch_size}: pass a smaller --batch-size "
                "(finished chunks are kept; the run resumes)"
            ) from exc
        finally:
            if bar:
                bar.close()

    timing = procs.together(work)
    say(f"{job.done} {timing.summary()}" + (" on rank 0" if procs.world > 1 else ""))
    bad = procs.together(lambda: _assemble(job, chunks, counts, name), everyone=False)
    say(f"wrote {final}")
    return ExtractResult(
        final,
        final.stem,
        "written",
        images=sum(counts.values()),
        computed_chunks=len(pending),
        resumed_chunks=len(chunks) - len(pending),
        bad=bad or {},
        timing=timing,
    )


# --- the feature extractor ---------------------------------------------------------------


def extract_features(
    dataset_dir: Path | str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    weights_path: Path | str | None = None,
    expected_sha256: str | None = None,
    image_size: int = protocol.IMAGE_SIZE,
    batch_size: int | None = None,
    workers: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    decode: str = "auto",
    amp: bool = True,
    chunk_size: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    chunk_pause: float = 0.0,
) -> ExtractResult:
    """Write ``ROOT/NAME/features/<tag>.h5`` for the prepared dataset ``dataset_dir``.

    Resumes an interrupted run with the same settings; does nothing when the file exists
    (``force`` redoes it). Under torchrun every rank extracts its share of the chunks and
    rank 0 writes the file. ``chunk_pause`` sleeps after each chunk (for tests that kill a
    run midway). Returns what happened; ``log`` receives the messages (rank 0 only).
    """
    from spl.extract.features import feature_path, read_attrs, write_features

    if dtype not in DTYPES:
        raise SplError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_run_options(image_size, chunk_size)
    procs = Processes.start(device)
    say = log if procs.rank == 0 else (lambda _: None)
    try:
        prepared = load_prepared(dataset_dir)
        resolved = resolve_weights(backbone, weights, weights_path, True, expected_sha256)
        tag = backbone_tag(backbone, resolved[1], image_size)
        final = feature_path(prepared.path.parent, tag)
        if final.exists() and not force:
            attrs = read_attrs(final)
            check_same_dataset(final, attrs, prepared)
            say(f"{final} is complete; nothing to do (--force extracts again)")
            return ExtractResult(final, tag, "exists", attrs=attrs)
        model, spec = build_resolved(resolved, image_size=image_size)
        route = decode if decode != "auto" else ("device" if procs.device.type == "cuda" else "pil")
        if route not in DECODE_ROUTES:
            raise SplError(f"--decode {decode}: use auto, {' or '.join(DECODE_ROUTES)}")
        files = ImageFiles(image_paths(prepared), image_size, route)
        step = FeatureStep(model, spec, image_size, procs.device, amp=amp, files=files)
        attrs = _attrs(prepared, spec, tag, image_size, route, dtype, step.compute)

        def write(arrays: dict[str, dict[str, np.ndarray]], bad_rows: dict[str, np.ndarray]):
            count = sum(len(rows) for rows in bad_rows.values())
            write_features(
                final,
                arrays["features"],
                {**attrs, "bad_images": count},
                bad_rows=bad_rows,
                force=force,
            )

        settings = {k: attrs[k] for k in _RESUME_KEYS}
        invalid = "the backbone gave NaN or infinite features"
        job = ChunkedPass(final, settings, files, step, dtype, invalid, write)
        result = run_pass(
            job,
            procs,
            prepared,
            batch_size=batch_size or (128 if step.cuda else 32),
            workers=workers,
            chunk_size=chunk_size,
            skip_bad=skip_bad,
            force=force,
            progress=progress,
            say=say,
            chunk_pause=chunk_pause,
        )
        result.attrs = attrs
        return result
    finally:
        procs.close()


def check_run_options(image_size: int, chunk_size: int | None) -> None:
    if image_size < 8:
        raise SplError(f"--image-size {image_size} is too small")
    if chunk_size is not None and chunk_size < 1:
        raise SplError(f"--chunk-size {chunk_size} must be positive")


def check_same_dataset(path: Path, attrs: dict, prepared: PreparedDataset) -> None:
    """Refuse a finished file that was made from another prepared dataset."""
    if attrs.get("dataset_fingerprint") != prepared.fingerprint:
        raise SplError(
            f"{path} exists but was made from another prepared dataset "
            f"(fingerprint {attrs.get('dataset_fingerprint')}, {prepared.path} has "
            f"{prepared.fingerprint}); pass --force to extract again"
        )


# Settings a resumed run must share with the chunks already written.
_RESUME_KEYS = (
    "backbone",
    "weights",
    "weights_sha256",
    "image_size",
    "transform",
    "dtype",
    "compute",
    "dataset_fingerprint",
)


def _attrs(
    prepared: PreparedDataset,
    spec: BackboneSpec,
    tag: str,
    image_size: int,
    route: str,
    dtype: str,
    compute: str,
) -> dict:
    transform = {
        "resize": [image_size, image_size],
        "interpolation": "bilinear",
        "crop": None,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "decode": DECODERS[route],
    }
    return {
        "tag": tag,
        "backbone": spec.name,
        "weights": spec.weights,
        "weights_sha256": spec.sha256 or "",
        "weights_source": spec.source,
        "image_size": int(image_size),
        "transform": transform,
        "dtype": dtype,
        "compute": compute,
        "dataset_name": prepared.name,
        "dataset_fingerprint": prepared.fingerprint,
    }


DECODERS = {
    "pil": "PIL (decode and resize in the workers)",
    "device": "JPEG: torchvision decode_jpeg and antialiased resize on the device; "
    "other formats: PIL",
}


def image_paths(prepared: PreparedDataset) -> list[Path]:
    """Absolute image paths of both source files, in row order (trainval, then test)."""
    paths = []
    for source in SOURCES:
        for row, image in enumerate(prepared.images[source]):
            where = f"{prepared.path} ({source}), row {row}"
            paths.append(prepared.image_root / safe_relative(str(image), where))
    return paths


class _RowNames:
    """Names an image by its index in :func:`image_paths`: 'val split row 3 (trainval row 17)'."""

    def __init__(self, prepared: PreparedDataset) -> None:
        self.prepared = prepared
        self.trainval = len(prepared.images["trainval"])

    def __call__(self, index: int) -> str:
        from spl.extract.features import _split_row

        if index < self.trainval:
            return _split_row(self.prepared, "trainval", index)
        return _split_row(self.prepared, "test", index - self.trainval)


def _open_partial(partial: Path, settings: dict, chunk_size: int | None, force: bool) -> None:
    """Create or check the partial folder's manifest (rank 0, before the others look)."""
    manifest_path = partial / "manifest.json"
    settings = json.loads(json.dumps(settings))  # as the manifest gives them back: tuples as lists
    if force and partial.exists():
        shutil.rmtree(partial)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differ = [k for k in settings if manifest["settings"].get(k) != settings[k]]
        if chunk_size is not None and chunk_size != manifest["chunk_size"]:
            differ.append("chunk_size")
        if differ:
            was = {k: manifest["settings"].get(k, manifest.get(k)) for k in differ}
            raise SplError(
                f"{partial} holds an unfinished extraction with other settings ({was}); "
                "rerun with those settings to resume it, or pass --force to start over"
            )
        for stale in partial.glob(".*.tmp-*"):  # chunks a killed run was writing
            stale.unlink()
        return
    partial.mkdir(parents=True, exist_ok=True)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    manifest = {"format": PARTIAL_FORMAT, "chunk_size": chunk_size, "settings": settings}
    write_json_atomic(manifest_path, manifest)


def _save_chunk(path: Path, arrays: Arrays, bad: np.ndarray, errors: list[str]) -> None:
    """Write one finished chunk under a temporary name, then rename: whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays, bad=bad, errors=np.array(errors, dtype=str))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_finite(
    computed: np.ndarray,
    stored: np.ndarray,
    bad: list[int],
    name: Callable[[int], str],
    what: str,
) -> None:
    """Refuse NaN or infinite rows (rows recorded as bad are NaN on purpose); ``what`` says
    who gave them, e.g. 'the backbone gave NaN or infinite features'."""
    finite = np.isfinite(stored.reshape(len(stored), -1)).all(axis=1)
    finite[bad] = True
    if finite.all():
        return
    rows = np.nonzero(~finite)[0]
    listed = ", ".join(name(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    if np.isfinite(computed[rows]).all():
        hint = f"their values overflow {stored.dtype}; use --dtype float32"
    else:
        hint = "the weights or these images are broken"
    raise SplError(f"{what} for {len(rows)} images ({listed}): {hint}")


def _assemble(
    job: ChunkedPass,
    chunks: list[_Chunk],
    counts: dict[str, int],
    name: Callable[[int], str],
) -> dict[str, list[tuple[int, str]]]:
    """Put the chunks in row order, have ``job.write`` write the file, drop the partial folder."""
    partial = job.partial
    missing = [c.name for c in chunks if not (partial / f"{c.name}.npz").is_file()]
    if missing:
        raise SplError(f"{partial} lacks chunks {missing[:5]}; rerun to compute them")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    bad_rows: dict[str, list[int]] = {src: [] for src in SOURCES}
    bad: dict[str, list[tuple[int, str]]] = {}
    for chunk in chunks:
        path = partial / f"{chunk.name}.npz"
        try:
            with np.load(path) as npz:
                blocks = {k: npz[k] for k in npz.files if k not in _CHUNK_KEYS}
                rows, errors = npz["bad"], npz["errors"]
            if not blocks:
                raise ValueError("no arrays")
            for block in blocks.values():
                if block.shape[0] != chunk.stop - chunk.start:
                    raise ValueError(f"{block.shape[0]} rows, not {chunk.stop - chunk.start}")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            path.unlink()
            raise SplError(f"{path} is damaged ({exc}); removed it: rerun to redo it") from exc
        for key, block in blocks.items():
            per_source = arrays.setdefault(key, {})
            if chunk.source not in per_source:
                shape = (counts[chunk.source], *block.shape[1:])
                per_source[chunk.source] = np.empty(shape, block.dtype)
            per_source[chunk.source][chunk.start : chunk.stop] = block
        for row, error in zip(rows.tolist(), errors.tolist(), strict=True):
            bad_rows[chunk.source].append(chunk.start + row)
            bad.setdefault(chunk.source, []).append(
                (chunk.start + row, f"{name(chunk.offset + row)}: {error}")
            )
    job.write(arrays, {src: np.asarray(rows, np.int64) for src, rows in bad_rows.items()})
    shutil.rmtree(partial)
    return bad


def _progress_bar(enabled: bool, total: int, tag: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, unit="img", desc=tag, mininterval=1.0, dynamic_ncols=True)
