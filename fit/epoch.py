"""One epoch of a group: its steps (on CUDA, replayed as a CUDA graph where the group
allows), the losses' end-of-epoch hooks, and validation, which keeps each head's best
epoch. Also the scoring of a weight stack on a split, which validation and the
benchmarks share."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spl.evaluate.metrics import mean_average_precision, probability_histogram
from spl.fit.group import HeadGroup
from spl.fit.heads import epoch_batches, stacked_logits
from spl.fit.step import start_epoch, train_step


def train_epoch(
    group: HeadGroup, on_step: Callable[[int], None] | None = None, cuda_graphs: bool = True
) -> dict:
    """Train the group's next epoch; returns ``{"epoch", "train_loss" [H]}`` and where its
    time went (``seconds``: the first step, the other steps, the loss hooks; on a CPU the
    first step of a group compiles). On CUDA a step is recorded once as a graph and
    replayed when ``cuda_graphs`` and the group allow (:attr:`HeadGroup.graphable`)."""
    epoch = group.epochs_done + 1
    X = group.data.X
    started = time.perf_counter()
    start_epoch(group, epoch)
    if group.loss_sum is None:
        group.loss_sum = torch.zeros(len(group.heads), dtype=torch.float64, device=X.device)
    group.loss_sum.zero_()  # in place: a captured CUDA graph accumulates into this buffer
    batches = epoch_batches(X.shape[0], group.batch_size, group.seed, epoch - 1, X.device)
    use_graph = cuda_graphs and X.device.type == "cuda" and group.graphable
    hooks = time.perf_counter() - started
    first = steps_started = time.perf_counter()
    for step, rows in enumerate(batches):
        if step == 1:
            first = time.perf_counter()
        if use_graph and group.graph is None and step == 3:
            capture(group, rows, epoch)
        if group.graph is not None:
            group.rows.copy_(rows)
            group.graph.replay()
        else:
            train_step(group, rows, epoch)
        if on_step is not None:
            on_step(step)
    steps_ended = time.perf_counter()
    group.epochs_done = epoch
    end_epoch(group, epoch)
    loss = (group.loss_sum / max(len(batches), 1)).cpu()
    seconds = {
        "first_step": first - steps_started,
        "steps": steps_ended - first,
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
                logits = stacked_logits(group.data.X, weight.index_select(0, slot.index))
                scores = torch.sigmoid(logits)
        slot.loss.on_epoch_end(
            slot.state, epoch=epoch, num_epochs=group.epochs, seed=group.seed, scores=scores
        )


@torch.no_grad()
def validate(group: HeadGroup, *, chunk_heads: int = 16, histogram_bins: int = 0) -> dict:
    """Val mAP of every head after an epoch (each head keeps its best epoch:
    :meth:`HeadGroup.keep_best`) and, with ``histogram_bins``, the histograms of the heads'
    probabilities, and of the losses' label estimates, on the unobserved positives."""
    data = group.data
    weight = group.weight  # the head layout, once per epoch
    val_map = split_map(data.X_val, weight, data.Y_val, chunk_heads)
    group.keep_best(weight, val_map)
    record: dict[str, Any] = {"val_map": val_map}
    if histogram_bins:
        mask = data.hidden_positives
        record["histogram"] = hidden_positive_histogram(weight, data.X, mask, histogram_bins)
        estimates = {}
        for slot in group.slots.values():
            probabilities = slot.loss.label_estimates(slot.state)
            if probabilities is not None:
                counts = probability_histogram(probabilities, mask, histogram_bins)
                estimates.update(zip(slot.positions, counts, strict=True))
        record["estimator_histogram"] = estimates
    return record


def split_map(
    X: torch.Tensor, weight: torch.Tensor, Y: torch.Tensor, chunk_heads: int = 16
) -> torch.Tensor:
    """mAP (x100, float64, on the CPU) of every head of ``weight [H, L, D + 1]`` on the
    augmented features ``X [N, D + 1]`` and labels ``Y``, ``chunk_heads`` heads at a time."""
    chunk = max(1, chunk_heads)
    out = []
    for lo in range(0, weight.shape[0], chunk):
        logits = stacked_logits(X, weight[lo : lo + chunk])
        out.append(mean_average_precision(logits, Y).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def hidden_positive_histogram(
    weight: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, bins: int
) -> np.ndarray:
    """Histogram ``[H, bins]`` of predicted probabilities on the unobserved positives
    (``mask [N, L]``: y = 1, z = 0), per head of ``weight`` on augmented ``X``.

    Only those entries are scored: per class, the rows where it is a hidden positive.
    """
    counts = torch.zeros(weight.shape[0], bins, dtype=torch.long, device=X.device)
    for cls in range(mask.shape[1]):
        rows = torch.nonzero(mask[:, cls]).flatten()
        if len(rows) == 0:
            continue
        logits = X.index_select(0, rows) @ weight[:, cls].t()  # [rows, H]
        index = (torch.sigmoid(logits) * bins).long().clamp_(0, bins - 1)
        counts += torch.nn.functional.one_hot(index, bins).sum(0)
    return counts.cpu().numpy()
