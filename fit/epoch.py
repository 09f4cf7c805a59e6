"""One epoch of a group: its steps (on CUDA, replayed as a CUDA graph where the group
allows; with the batches read ahead when its data streams), the losses' end-of-epoch hooks,
and validation, which keeps each head's best epoch. Also the scoring of a weight stack on a
split, which validation and the benchmarks share."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spl.evaluate.blocks import (
    SCORE_BYTES,
    block_shape,
    columns_ap,
    evaluated_classes,
    mean_ap,
)
from spl.evaluate.metrics import probability_histogram
from spl.fit.data import (
    LABEL_BLOCK_ENTRIES,
    Features,
    HiddenPositives,
    LabelRows,
    ReadAhead,
    ResidentFeatures,
    split_logits,
)
from spl.fit.group import HeadGroup
from spl.fit.heads import epoch_batches
from spl.fit.losses import Loss
from spl.fit.step import stage_batch, start_epoch, train_step


def train_epoch(
    group: HeadGroup, on_step: Callable[[int], None] | None = None, cuda_graphs: bool = True
) -> dict:
    """Train the group's next epoch; returns ``{"epoch", "train_loss" [H]}`` and where its
    time went (``seconds``: the first step, the other steps, the time the steps waited for
    a batch read ahead, the loss hooks; on a CPU the first step of a group compiles). On
    CUDA a step is recorded once as a graph and replayed when ``cuda_graphs`` and the group
    allow (:attr:`HeadGroup.graphable`). When the group's data streams, a background thread
    reads the epoch's batches ahead of the steps (:class:`~spl.fit.data.ReadAhead`)."""
    epoch = group.epochs_done + 1
    X = group.data.X
    device = group.weight_t.device
    started = time.perf_counter()
    start_epoch(group, epoch)
    if group.loss_sum is None:
        group.loss_sum = torch.zeros(len(group.heads), dtype=torch.float64, device=device)
    group.loss_sum.zero_()  # in place: a captured CUDA graph accumulates into this buffer
    batches = epoch_batches(X.num_rows, group.batch_size, group.seed, epoch - 1, device)
    use_graph = cuda_graphs and device.type == "cuda" and group.graphable
    reader = None
    if group.data.streams:
        # the same order, on the host: what the thread reads
        host = epoch_batches(X.num_rows, group.batch_size, group.seed, epoch - 1)
        reader = ReadAhead(
            lambda rows: group.data.read_batch(rows, group.reads_labels),
            [b.numpy() for b in host],
            pin=device.type == "cuda",
        )
    hooks = time.perf_counter() - started
    first = steps_started = time.perf_counter()
    first_waited = 0.0  # of the first step
    try:
        for step, rows in enumerate(batches):
            if step == 1:
                first = time.perf_counter()
                first_waited = 0.0 if reader is None else reader.waited
            if reader is not None:
                stage_batch(group, rows, next(reader), epoch)
            if use_graph and group.graph is None and step == 3:
                capture(group, rows, epoch)
            if group.graph is not None:
                group.rows.copy_(rows)
                group.graph.replay()
            else:
                train_step(group, rows, epoch)
            if on_step is not None:
                on_step(step)
    finally:
        if reader is not None:
            reader.close()
        group.staged = None
    steps_ended = time.perf_counter()
    waited = 0.0 if reader is None else reader.waited
    group.epochs_done = epoch
    end_epoch(group, epoch)
    loss = (group.loss_sum / max(len(batches), 1)).cpu()
    seconds = {
        # the steps' own time: what they waited for a batch read ahead is counted apart
        "first_step": first - steps_started - first_waited,
        "steps": steps_ended - first - (waited - first_waited),
        "feature_wait": waited,
        "loss_hooks": hooks + time.perf_counter() - steps_ended,
    }
    return {"epoch": epoch, "train_loss": loss, "seconds": seconds}


def capture(group: HeadGroup, rows: torch.Tensor, epoch: int) -> None:
    """Record one training step as a CUDA graph: a step is ~100 small kernels, and
    replaying them as one graph removes the launch overhead that dominates on a GPU."""
    try:
        group.rows = rows.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Capture records the kernels without running them: weights stay untouched.
        with torch.cuda.graph(graph, stream=stream):
            train_step(group, group.rows, epoch)
        group.graph = graph
    except RuntimeError as exc:  # pragma: no cover - depends on the CUDA build
        warnings.warn(f"CUDA graph capture failed ({exc}); training eagerly", stacklevel=2)
        group.graph = None


def end_epoch(group: HeadGroup, epoch: int) -> None:
    """The losses' end-of-epoch hooks, with a scoring pass over the training rows for
    those that ask for one."""
    weight = None
    for slot in group.slots.values():
        scores = None
        if slot.loss.wants_scores(epoch=epoch, num_epochs=group.epochs):
            if weight is None:
                weight = group.weight
            with torch.no_grad():
                logits = split_logits(group.data.X, weight.index_select(0, slot.index))
                scores = torch.sigmoid(logits)
        slot.loss.on_epoch_end(
            slot.state, epoch=epoch, num_epochs=group.epochs, seed=group.seed, scores=scores
        )


@torch.no_grad()
def validate(
    group: HeadGroup,
    *,
    chunk_heads: int = 16,
    histogram_bins: int = 0,
    score_bytes: int = SCORE_BYTES,
) -> dict:
    """Val mAP of every head after an epoch (each head keeps its best epoch:
    :meth:`HeadGroup.keep_best`) and, with ``histogram_bins``, the histograms of the heads'
    probabilities, and of the losses' label estimates, on the unobserved positives. A
    partially labelled val split (``data.val_known``) is scored as OpenImages is: each
    class's AP over its verified entries, the classes with a verified positive in the
    mean. ``score_bytes`` bounds the scoring's blocks of heads x classes."""
    data = group.data
    weight = group.weight  # the head layout, once per epoch
    val_map = split_map(
        data.X_val, weight, data.Y_val, chunk_heads, known=data.val_known, score_bytes=score_bytes
    )
    group.keep_best(weight, val_map)
    record: dict[str, Any] = {"val_map": val_map}
    if histogram_bins and data.hidden_positives is not None:
        hidden = data.hidden_positives
        record["histogram"] = hidden_positive_histogram(weight, data.X, hidden, histogram_bins)
        estimates = {}
        for slot in group.slots.values():
            counts = estimator_histogram(slot.loss, slot.state, hidden, histogram_bins)
            if counts is not None:
                estimates.update(zip(slot.positions, counts, strict=True))
        record["estimator_histogram"] = estimates
    return record


def split_map(
    X: torch.Tensor | Features,
    weight: torch.Tensor,
    Y: torch.Tensor | LabelRows,
    chunk_heads: int = 16,
    *,
    known: torch.Tensor | LabelRows | None = None,
    score_bytes: int = SCORE_BYTES,
) -> torch.Tensor:
    """mAP (x100, float64, on the CPU) of every head of ``weight [H, L, D + 1]`` on the
    augmented features ``X [N, D + 1]`` and labels ``Y``, ``chunk_heads`` heads at a time
    (fewer heads and blocks of classes when their logits would pass ``score_bytes``).
    With ``known`` (the verified entries of a partially labelled split), each class's AP
    over its verified entries, the mean over the classes with a verified positive."""
    X = X if isinstance(X, Features) else ResidentFeatures(X)
    Y = _label_rows(Y, X.device)
    known = None if known is None else _label_rows(known, X.device)
    num_heads, num_classes = weight.shape[:2]
    chunk = max(1, chunk_heads)
    heads, classes = block_shape(
        num_heads, X.num_rows, num_classes, head_block=chunk, ap_chunk=chunk,
        budget=score_bytes, itemsize=weight.element_size(),
    )  # fmt: skip
    out = []
    for lo in range(0, num_heads, heads):
        head_weight = weight[lo : lo + heads]
        aps, evaluated = [], []
        for start in range(0, num_classes, classes):
            stop = min(start + classes, num_classes)
            part = head_weight if classes == num_classes else head_weight[:, start:stop]
            labels = Y.columns(start, stop)
            verified = None if known is None else known.columns(start, stop)
            aps.append(columns_ap(split_logits(X, part), labels, verified))
            evaluated.append(evaluated_classes(labels, verified))
        ap = aps[0] if len(aps) == 1 else torch.cat(aps, dim=-1)
        mask = None if known is None else torch.cat(evaluated)
        out.append(mean_ap(ap, mask).double().cpu())
    return torch.cat(out)


def _label_rows(matrix, device: torch.device) -> LabelRows:
    if isinstance(matrix, LabelRows):
        return matrix
    tensor = torch.as_tensor(np.asarray(matrix) if not torch.is_tensor(matrix) else matrix)
    return LabelRows(tensor, dtype=tensor.dtype, device=device)


@torch.no_grad()
def hidden_positive_histogram(
    weight: torch.Tensor,
    X: torch.Tensor | Features,
    mask: torch.Tensor | HiddenPositives,
    bins: int,
) -> np.ndarray:
    """Histogram ``[H, bins]`` of predicted probabilities on the unobserved positives
    (``mask``: a :class:`~spl.fit.data.HiddenPositives`, or ``[N, L]`` bool: y = 1,
    z = 0), per head of ``weight`` on augmented ``X``.

    Only those entries are scored: per class, the rows where it is a hidden positive.
    """
    hidden = mask if isinstance(mask, HiddenPositives) else HiddenPositives.from_mask(mask)
    X = X if isinstance(X, Features) else ResidentFeatures(X)
    counts = torch.zeros(weight.shape[0], bins, dtype=torch.long, device=X.device)
    for start, stop, block in X.blocks():
        for cls in range(hidden.num_classes):
            rows = hidden.class_rows(cls, start, stop)
            if rows is None:
                continue
            logits = block.index_select(0, rows) @ weight[:, cls].t()  # [rows, H]
            index = (torch.sigmoid(logits) * bins).long().clamp_(0, bins - 1)
            counts += torch.nn.functional.one_hot(index, bins).sum(0)
    return counts.cpu().numpy()


def estimator_histogram(
    loss: Loss, state: dict[str, torch.Tensor], hidden: HiddenPositives, bins: int
) -> np.ndarray | None:
    """Histogram ``[h, bins]`` of a loss's label estimates (ROLE's estimator) on the
    unobserved positives, a block of training rows at a time (the estimates of all rows
    would be another N x L per head); None for a loss that keeps none."""
    if type(loss).label_estimates is Loss.label_estimates:
        return None
    num_rows = hidden.num_rows
    per_row = {n for n, t in state.items() if t.dim() >= 2 and t.shape[-2] == num_rows}
    width = max(
        (t.shape[-1] * (t.numel() // (t.shape[-1] * t.shape[-2])) for n, t in state.items()
         if n in per_row),
        default=1,
    )  # fmt: skip
    step = max(1, LABEL_BLOCK_ENTRIES // max(1, width))
    counts = None
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        block = {n: t[..., start:stop, :] if n in per_row else t for n, t in state.items()}
        probabilities = loss.label_estimates(block)
        if probabilities is None:
            return None
        if probabilities.dim() == 2:
            probabilities = probabilities[None]
        rows, classes = hidden.entries(start, stop)
        index = (torch.from_numpy(rows).to(probabilities.device),
                 torch.from_numpy(classes).to(probabilities.device))  # fmt: skip
        selected = probabilities[:, index[0], index[1]][:, None]  # [h, 1, E]
        everything = torch.ones(selected.shape[1:], dtype=torch.bool, device=selected.device)
        part = probability_histogram(selected, everything, bins)
        counts = part if counts is None else counts + part
    return counts
