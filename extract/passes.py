"""One pass of a model over every image of a prepared dataset, chunked, resumable and
sharded: backbone features (``spl extract``, :func:`spl.extract.run.extract_features`) and
vision-language scores (``spl pseudo-labels``, :func:`spl.extract.scorer.score_images`) are
both :func:`run_image_pass`; the two commands differ only in the step they run per batch and
the file they write (:class:`ChunkedPass`).

Rows are cut into chunks of ``chunk_size`` rows per source file (:mod:`spl.extract.chunks`),
and each chunk into batches the same way whatever the number of processes, so a single
process and a torchrun job compute the same batches and write the same file. A finished
chunk is one file in ``<folder>/.<tag>.partial/`` beside a manifest of the settings; a rerun
with the same settings computes only the missing chunks. When every chunk exists, rank 0
writes the file (atomic) and removes the partial folder.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spl.data.common import SplError
from spl.data.prepared import SOURCES, PreparedDataset, load_prepared
from spl.data.runtime import Processes, default_workers
from spl.extract.chunks import (
    Assembly,
    Chunk,
    RowNames,
    assemble,
    check_finite,
    finished_chunks,
    open_partial,
    plan_chunks,
    read_chunk_size,
    save_chunk,
)
from spl.extract.images import Batch, ImageFiles, chunk_batches, make_loader

Output = torch.Tensor | dict[str, torch.Tensor]  # what a step gives for a batch
Step = Callable[[Batch], tuple[Output, list[str]]]


# --- the batch loop ----------------------------------------------------------------------


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


def run_chunks(
    step: Step,
    files: ImageFiles,
    chunks: list[tuple[object, list[list[int]]]],
    *,
    workers: int,
    on_chunk: Callable[[object, np.ndarray | dict[str, np.ndarray], list[int], list[str]], None],
    timing: Timing | None = None,
    progress: Callable[[int], None] | None = None,
) -> Timing:
    """Run ``step`` (a :class:`spl.extract.run.FeatureStep` or
    :class:`spl.extract.scorer.ScoreStep`) over ``chunks`` (key, batches of indices) and hand
    each finished chunk to ``on_chunk(key, outputs, bad positions, their errors)``: float32
    ``[n, ...]``, one array per name when the step gives a dict of tensors.

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


# --- what a pass computes and how it runs ------------------------------------------------


@dataclass
class ChunkedPass:
    """What one chunked, resumable, sharded pass over a prepared dataset's images computes
    and writes; :func:`run_pass` runs it.

    ``step`` turns a :class:`Batch` into float32 outputs (a tensor, stored as ``features``,
    or a dict of named tensors), each ``[B, ...]`` in batch order. A finished chunk's arrays
    are kept in ``dtype``, NaN on its bad rows; NaN or infinite values elsewhere are refused
    with ``invalid`` (who gave them, e.g. 'the backbone gave NaN or infinite features').
    ``write`` gets an :class:`~spl.extract.chunks.Assembly` (every stored array's shape
    per source file, the bad rows of each, the chunks' arrays in row order one chunk at a
    time) and writes ``final`` atomically, block by block. ``settings``: what a resumed
    run must share with the chunks already written; ``attrs``: the file's attributes, for
    the result; ``batch_size``: the images per batch unless the user gives another.
    """

    final: Path
    settings: dict
    files: ImageFiles
    step: Step
    dtype: str
    invalid: str
    write: Callable[[Assembly], None]
    batch_size: int
    attrs: dict = field(default_factory=dict)
    done: str = "extracted"  # the verb of the summary line: "extracted 240 images in ..."

    @property
    def partial(self) -> Path:
        return self.final.parent / f".{self.final.stem}.partial"


@dataclass
class PassOptions:
    """How a pass runs, whatever it computes. ``batch_size`` None: the pass's own;
    ``workers`` None: :func:`spl.data.runtime.default_workers`; ``chunk_size`` None: the
    partial folder's, or :data:`spl.extract.chunks.DEFAULT_CHUNK_SIZE`; ``skip_bad``:
    record unreadable images as bad rows instead of stopping; ``force``: start over;
    ``chunk_pause``: seconds to sleep after each chunk (for tests that kill a run midway)."""

    batch_size: int | None = None
    workers: int | None = None
    chunk_size: int | None = None
    skip_bad: bool = False
    force: bool = False
    progress: bool = True
    chunk_pause: float = 0.0


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


@dataclass
class Target:
    """The file a command writes, known before any model is loaded: ``final`` and its
    ``tag``; ``same``, the settings a finished file must have been made with (besides the
    prepared dataset); ``redo``, how to redo a finished file; ``build``, which loads the
    model and gives the pass (called only when there is work)."""

    final: Path
    tag: str
    build: Callable[[], ChunkedPass]
    same: dict = field(default_factory=dict)
    redo: str = "--force extracts again"


# --- the driver --------------------------------------------------------------------------


def run_image_pass(
    dataset_dir: Path | str,
    plan: Callable[[PreparedDataset, Processes], Target],
    *,
    device: str,
    options: PassOptions,
    log: Callable[[str], None],
) -> ExtractResult:
    """Write the file ``plan`` names for the prepared dataset ``dataset_dir``, in every
    process of a torchrun job (or the only one). An existing file is kept (refused when made
    from another dataset or with other settings) unless ``options.force``; otherwise the
    target builds its pass (loads the model) and the pass runs, resuming an interrupted run
    with the same settings. ``log`` receives the messages (rank 0 only)."""
    procs = Processes.start(device)
    say = log if procs.rank == 0 else (lambda _: None)
    try:
        prepared = load_prepared(dataset_dir)
        target = plan(prepared, procs)
        if target.final.exists() and not options.force:
            return _finished(target, prepared, say)
        job = target.build()
        result = run_pass(job, procs, prepared, options, say)
        result.attrs = job.attrs
        return result
    finally:
        procs.close()


def _finished(target: Target, prepared: PreparedDataset, say: Callable[[str], None]):
    """The result of a run whose file exists: refused unless made with these settings."""
    from spl.extract.features import read_attrs

    attrs = read_attrs(target.final)
    check_same_dataset(target.final, attrs, prepared)
    check_same_settings(target.final, attrs, target.same)
    say(f"{target.final} is complete; nothing to do ({target.redo})")
    return ExtractResult(target.final, target.tag, "exists", attrs=attrs)


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


def check_same_settings(path: Path, stored: dict, planned: dict) -> None:
    """Refuse a finished file under this tag that was made with other settings."""
    from spl.extract.features import _attr

    differ = {k: stored.get(k) for k in planned if stored.get(k) != _attr(planned[k])}
    if differ:
        raise SplError(
            f"{path} exists but was made with other settings ({differ}); pass --tag NAME to "
            "write another file, or --force to replace it"
        )


# --- the pass ----------------------------------------------------------------------------


def run_pass(
    job: ChunkedPass,
    procs: Processes,
    prepared: PreparedDataset,
    options: PassOptions,
    say: Callable[[str], None],
) -> ExtractResult:
    """Compute the chunks of ``job`` this process owns (all of them without torchrun), then,
    on rank 0 once every rank is done, write the file and drop the partial folder.

    Resumes from the chunks an interrupted run with the same settings left (a run with
    other settings is refused); ``options.force`` starts over. Unreadable images stop the
    run, naming the row, unless ``options.skip_bad``."""
    name = RowNames(prepared)
    counts = {src: len(prepared.images[src]) for src in SOURCES}
    chunks, pending = _chunks_to_compute(job, procs, counts, options, say)
    mine = pending[procs.rank :: procs.world]
    timing = procs.together(functools.partial(_compute, job, mine, name, options, procs.rank == 0))
    say(f"{job.done} {timing.summary()}" + (" on rank 0" if procs.world > 1 else ""))
    write = functools.partial(assemble, job.partial, chunks, counts, name, job.write)
    bad = procs.together(write, everyone=False)
    say(f"wrote {job.final}")
    return ExtractResult(
        job.final,
        job.final.stem,
        "written",
        images=sum(counts.values()),
        computed_chunks=len(pending),
        resumed_chunks=len(chunks) - len(pending),
        bad=bad or {},
        timing=timing,
    )


def _chunks_to_compute(
    job: ChunkedPass,
    procs: Processes,
    counts: dict[str, int],
    options: PassOptions,
    say: Callable[[str], None],
) -> tuple[list[Chunk], list[Chunk]]:
    """Every chunk of the pass, and those still to compute: rank 0 opens (or checks) the
    partial folder, then every rank lists the chunks done before any writes one."""
    partial = job.partial
    opening = functools.partial(
        open_partial, partial, job.settings, options.chunk_size, options.force
    )
    procs.together(opening, everyone=False)
    chunks = plan_chunks(counts, read_chunk_size(partial))
    done = finished_chunks(partial)
    procs.all_ok(True)  # every rank has listed the done chunks before any writes one
    pending = [c for c in chunks if c.name not in done]
    if done:
        say(f"resuming {job.final.name}: {len(chunks) - len(pending)} of {len(chunks)} chunks done")
    return chunks, pending


def _compute(
    job: ChunkedPass, mine: list[Chunk], name: RowNames, options: PassOptions, show: bool
) -> Timing:
    """Compute and save the chunks ``mine``, a progress bar on rank 0 (``show``)."""
    workers = options.workers
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    batch_size = options.batch_size or job.batch_size
    bar = _progress_bar(options.progress and show, sum(c.rows for c in mine), job.final.stem)
    plan = [(c, chunk_batches(c.offset, c.offset + c.rows, batch_size)) for c in mine]
    saver = _ChunkSaver(job, name, options.skip_bad, options.chunk_pause)
    try:
        return run_chunks(
            job.step,
            job.files,
            plan,
            workers=workers,
            on_chunk=saver,
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


@dataclass
class _ChunkSaver:
    """Keeps a computed chunk in the partial folder: its arrays in the pass's dtype, NaN on
    the bad rows, checked finite elsewhere. An unreadable image stops the run unless
    ``skip_bad``; ``pause`` sleeps after each chunk (tests)."""

    job: ChunkedPass
    name: RowNames
    skip_bad: bool
    pause: float

    def __call__(self, chunk: Chunk, output, bad: list[int], errors: list[str]) -> None:
        if errors and not self.skip_bad:
            raise SplError(
                f"{self.name(chunk.offset + bad[0])}: {errors[0]}. Fix or restore the image "
                "and rerun (finished chunks are kept), or pass --skip-bad to record unreadable "
                "images as bad rows and go on"
            )
        arrays = output if isinstance(output, dict) else {"features": output}
        stored = {}
        for key, computed in arrays.items():
            with np.errstate(over="ignore"):  # overflow is reported by check_finite
                stored[key] = computed.astype(self.job.dtype)
            stored[key][bad] = np.nan
            check_finite(computed, stored[key], bad, self._row_name(chunk), self.job.invalid)
        path = self.job.partial / f"{chunk.name}.npz"
        save_chunk(path, stored, np.asarray(bad, np.int64), errors)
        if self.pause:
            time.sleep(self.pause)

    def _row_name(self, chunk: Chunk) -> Callable[[int], str]:
        return lambda row: self.name(chunk.offset + row)


def _progress_bar(enabled: bool, total: int, tag: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, unit="img", desc=tag, mininterval=1.0, dynamic_ncols=True)
