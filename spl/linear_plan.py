"""What a linear run reads and holds: each split's features, resident or streamed from the
feature file, and the memory plan of the sweep (:mod:`spl.memory_plan`) from the run's
inputs, with what the plan tells the engine and the scoring."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from spl.data.common import SplError
from spl.data.labels import CSR, SparseRows
from spl.data.prepared import PreparedDataset, load_prepared
from spl.data.runtime import resolve_device
from spl.evaluate.blocks import SCORE_BYTES
from spl.extract.features import (
    FORMAT,
    feature_path,
    load_features,
    open_stage_file,
    split_row_name,
    unreadable_rows,
)
from spl.fit.data import SCORE_ROWS, StreamedFeatures
from spl.fit.group import gradient_route
from spl.fit.losses import SINGLE_POSITIVE, WITH_NEGATIVES
from spl.memory_plan import LossState, MemoryPlan, SweepShape, machine_budget, plan_linear
from spl.settings import LinearSettings
from spl.training import TrainingInputs, training_inputs

FEATURE_ATTRS = ("backbone", "weights", "weights_source", "image_size", "dtype")  # recorded


def split_features(
    prepared: PreparedDataset, tag: str, rows: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The feature file's rows of each split (``rows``: of the source file), and its
    attributes (its provenance); the file is checked against the dataset."""
    feature_set = load_features(prepared, tag)
    features = {}
    for split, split_rows in rows.items():
        source = prepared.rows(split)[0]
        features[split] = torch.from_numpy(
            np.ascontiguousarray(feature_set.features[source][split_rows], dtype=np.float32)
        )
    return features, feature_set.attrs


def streamed_split_features(
    prepared: PreparedDataset, tag: str, rows: dict[str, np.ndarray]
) -> tuple[dict[str, StreamedFeatures], dict]:
    """The feature file's rows of each split read as the engine asks for them
    (:class:`~spl.fit.data.StreamedFeatures`: a memory map of a contiguous dataset), and
    its attributes; the file is checked as :func:`split_features` checks it (the dataset's
    fingerprint, the row counts, no NaN in a row the run reads), a block at a time."""
    dataset_dir = prepared.path.parent
    path = feature_path(dataset_dir, tag)
    rebuild = f"spl extract {dataset_dir} --backbone ... (or spl import-features)"
    h5, attrs = open_stage_file(path, prepared, fmt=FORMAT, kind="feature", rebuild=rebuild)
    with h5:
        for src in ("trainval", "test"):
            held, expected = h5[src].shape[0], len(prepared.images[src])
            if held != expected:
                raise SplError(
                    f"{path}: {src} holds {held} rows, {prepared.path} has {expected}; "
                    f"rebuild it: `{rebuild} --force`"
                )
            bad = h5[f"bad/{src}"][()] if f"bad/{src}" in h5 else np.zeros(0, np.int64)
            found = [
                start + np.flatnonzero(~np.isfinite(h5[src][start : start + SCORE_ROWS]).all(1))
                for start in range(0, held, SCORE_ROWS)
            ]
            nonfinite = np.setdiff1d(np.concatenate(found or [np.zeros(0, np.int64)]), bad)
            if len(nonfinite):  # refuse_non_finite's message (rows recorded bad are NaN)
                named = ", ".join(split_row_name(prepared, src, r) for r in nonfinite[:5])
                raise SplError(
                    f"{path}: NaN or infinite features in {len(nonfinite)} {src} rows "
                    f"({named}); re-extract them: `{rebuild} --force`"
                )
    features = {}
    for split, split_rows in rows.items():
        source = prepared.rows(split)[0]
        features[split] = StreamedFeatures(path, source, split_rows)
    return features, attrs


def memory_plan(
    inputs: TrainingInputs, tag: str, device: torch.device, *, sharing: int | None = None
) -> MemoryPlan:
    """The sweep's memory plan (:mod:`spl.memory_plan`) within ``--memory-budget`` (default:
    the machine's), streaming the features when ``--stream-features`` asks; refused before
    a run exists when it cannot fit. ``sharing``: the processes of a torchrun job on this
    machine (default: torchrun's ``LOCAL_WORLD_SIZE``), which share a CPU's budget."""
    settings = inputs.settings
    budget = settings.memory_budget or machine_budget(str(device))
    if sharing is None:
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    shape = sweep_shape(inputs, tag)
    return plan_linear(shape, budget, str(device), stream_features=settings.stream_features,
                       sharing=sharing)  # fmt: skip


def sweep_shape(inputs: TrainingInputs, tag: str) -> SweepShape:
    """What the memory plan counts of a run: the splits' rows, the feature file's width
    and dtype (read from the file, not its values), the label matrices as held, the grid,
    each loss's per-row state (measured on a few training rows) and the histograms'
    unobserved positives."""
    import h5py

    prepared, settings = inputs.prepared, inputs.settings
    path = feature_path(prepared.path.parent, tag)
    rebuild = f"spl extract {prepared.path.parent} --backbone ... (or spl import-features)"
    h5, _ = open_stage_file(path, prepared, fmt=FORMAT, kind="feature", rebuild=rebuild)
    with h5:
        dataset: h5py.Dataset = h5["trainval"]
        num_features, feature_itemsize = int(dataset.shape[1]), dataset.dtype.itemsize
    num_classes = prepared.num_classes
    rows = {split: len(inputs.rows[split]) for split in inputs.rows}
    held = [*inputs.observed.values(), inputs.selection_labels]
    host = sum(_held_bytes(m) for m in held)
    for split in ("train", "test"):  # what the engine and the scoring are given
        host += _stored_bytes(prepared.labels[prepared.rows(split)[0]], inputs.rows[split])
        if prepared.states is not None:  # the known masks
            host += _stored_bytes(prepared.states[prepared.rows(split)[0]], inputs.rows[split])
    per_group = len(inputs.losses) * len(settings.lrs)
    groups = len(settings.seeds) * len(settings.batch_sizes)
    kinds = {loss.trains_on for loss in inputs.losses.values()}
    hidden = 0
    if settings.histogram_bins:
        labels = inputs.label_matrix("train")
        hidden = max(0, _positives(labels) - _positives(inputs.observed[SINGLE_POSITIVE]))
    return SweepShape(
        train_rows=rows["train"],
        val_rows=rows["val"],
        test_rows=rows["test"],
        features=num_features,
        classes=num_classes,
        group_heads=[per_group] * groups,
        batch_sizes=list(settings.batch_sizes),
        feature_itemsize=feature_itemsize,
        host_labels=host,
        observed_sets=1 + (WITH_NEGATIVES in kinds),
        weight_tables=sum(gradient_route(type(v)) == "weights" for v in inputs.losses.values()),
        loss_states=loss_states(inputs, heads=groups * len(settings.lrs), groups=groups),
        hidden_positives=hidden,
        dense_init=any(loss.overrides("init_state") for loss in inputs.losses.values()),
    )


# Training rows a loss's initial state is measured on (its per-row bytes, then x N).
PROBE_ROWS = 8


def loss_states(inputs: TrainingInputs, heads: int, groups: int) -> list[LossState]:
    """Each loss's per-row state (ROLE's estimator, a score reader's pseudo-labels) in
    bytes per training row, per head or shared by a group's heads, with every copy the
    engine keeps: the state, for trainable tensors their gradient and Adam's two moments,
    the snapshot at the best epoch, and each head's copy exported for heads.pt; measured
    by initialising the loss on a few training rows (``heads`` in all, ``groups``)."""
    out = []
    for key, loss in inputs.losses.items():
        if not loss.overrides("init_state"):
            continue
        observed = inputs.observed[loss.trains_on]
        n = min(PROBE_ROWS, observed.shape[0])
        probe = np.arange(n)
        block = observed.block(probe) if isinstance(observed, CSR) else observed[probe]
        block = torch.from_numpy(np.asarray(block, dtype=np.float32))
        scores = loss.context.scores
        if scores is not None:  # a score reader checks its scores against the rows
            tiles = None if scores.tiles is None else scores.tiles[:n]
            context = dataclasses.replace(
                loss.context,
                scores=dataclasses.replace(scores, image=scores.image[:n], tiles=tiles),
            )
            loss = type(loss)(loss.options, context)
        probe_heads = n + 1  # a per-head tensor [h, n, ...] then never looks like [n, ...]
        state = loss.init_state(block, heads=probe_heads, seed=0)
        per_head = shared = fixed = 0
        for name, tensor in state.items():
            copies = 1 + 3 * (name in loss.trainable) + (name in loss.snapshot)
            size = tensor.numel() * tensor.element_size() * copies
            if tensor.dim() >= 3 and tensor.shape[0] == probe_heads:
                per_head += size // (probe_heads * n)
            elif tensor.dim() >= 2 and tensor.shape[0] == n:
                shared += size // n
            else:
                fixed += size
        exported = loss.export_state(state) if loss.overrides("export_state") else {}
        for tensor in exported.values():
            size = tensor.numel() * tensor.element_size()
            per_head += size // ((probe_heads if tensor.shape[0] == probe_heads else 1) * n)
        out.append(LossState(key, heads, groups, per_head, shared, fixed))
    return out


def _positives(matrix: np.ndarray | CSR) -> int:
    if isinstance(matrix, CSR):
        return int((matrix.values == 1).sum())
    return int((np.asarray(matrix) == 1).sum())


def _held_bytes(matrix: np.ndarray | CSR) -> int:
    if isinstance(matrix, CSR):
        return matrix.indptr.nbytes + matrix.indices.nbytes + matrix.values.nbytes
    return int(np.asarray(matrix).nbytes)


def _stored_bytes(matrix, rows: np.ndarray) -> int:
    """Bytes of ``rows`` of a stored matrix held as the run holds them: dense, or a CSR
    (8 bytes a row, 5 an entry)."""
    if isinstance(matrix, SparseRows):
        entries = int((matrix.indptr[rows + 1] - matrix.indptr[rows]).sum())
        return 8 * (len(rows) + 1) + 5 * entries
    return len(rows) * matrix.shape[1] * matrix.dtype.itemsize


def plan_of_run(dataset_dir: Path, tag: str, settings: LinearSettings) -> MemoryPlan:
    """``spl fit-linear --dry-run``: the plan a run of ``settings`` would follow (refused as
    the run would be), without a run."""
    prepared = load_prepared(dataset_dir)
    inputs = training_inputs(prepared, settings, settings.losses, unreadable_rows(prepared, tag))
    return memory_plan(inputs, tag, resolve_device(settings.device))


def engine_options(plan: MemoryPlan | None) -> dict:
    """What the plan tells the engine: labels resident or read per batch, the scoring
    blocks' bytes (features stream by being given as streamed features)."""
    if plan is None:
        return {}
    return {"resident_labels": plan.resident_labels, "score_bytes": plan.score_bytes}


def scoring_options(inputs: TrainingInputs, plan: MemoryPlan | None) -> dict:
    """What the test scoring and the recovery read besides the labels: a partially
    labelled dataset's verified entries, and the plan's scoring bytes."""
    return {
        "test_known": inputs.known("test"),
        "train_known": inputs.known("train"),
        "score_bytes": SCORE_BYTES if plan is None else plan.score_bytes,
    }


def val_known(inputs: TrainingInputs):
    """The verified val entries that select epochs on a partially labelled dataset (with
    ``--val full``; None otherwise: every entry counts, or the observed positives do)."""
    if inputs.settings.val != "full":
        return None
    return inputs.known("val")
