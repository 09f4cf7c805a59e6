"""One training step of a group: what each loss sees of the batch, the logit gradients of
every head on its loss's route (label-only weights tabled once an epoch, a fused closed form
for trainable state, a loss's kernel, its own closed form, or autograd on its value), and
the Adam update.

:func:`batch_gradients` is a pure function of tensors: on a CPU it runs compiled
(:mod:`.fused`) as one or two loops instead of ~80 small kernels.
"""

from __future__ import annotations

import torch

from spl.fit import fused
from spl.fit.group import HeadGroup, LossSlot, StagedBatch
from spl.fit.losses import LOG_EPSILON, Batch, log_neg, log_pos


def batch_gradients(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
    weighted_index: torch.Tensor,
    fused_parts: tuple,
    reg_weight: torch.Tensor,
    reg_target: torch.Tensor,
    num_classes: int,
    kernel_parts: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Logits, per-head losses and closed-form logit gradients of one batch for a group.

    For a weighted loss M = A l+(p) + B l-(p), dM/dx = -A s/(p + eps) + B s/(1 - p + eps)
    with s = p(1 - p); R_k adds 2 (c - k) / (L^2 B) * s per entry (c: mean positive count).
    ``tables`` holds the batch's A and B for the heads with label-only weights;
    ``fused_parts`` is one ``(fused_step, index, observed [B, L], state rows, k)`` per loss
    whose weights come from its trainable state (ROLE): its :meth:`~Loss.fused_step` gives
    its weights and its state's gradient. Returns logits and grad as ``[B, H, L]`` and the
    state gradients (one tuple per fused part). A pure function of tensors, so that on a
    CPU it runs compiled as one or two loops instead of ~80 small kernels.
    """
    blocks, _, columns = weight_t.shape
    batch = x.shape[0]
    n_heads = blocks * columns // num_classes
    scale = 1.0 / (batch * num_classes)
    logits = torch.matmul(x, weight_t)  # [blocks, B, per * L]
    logits = logits.view(blocks, batch, -1, num_classes).transpose(0, 1)
    logits = logits.reshape(batch, n_heads, num_classes)
    p = torch.sigmoid(logits)
    pos_w = torch.zeros_like(p)
    neg_w = torch.zeros_like(p)
    if tables is not None:
        pos_w.index_copy_(1, weighted_index, tables[0])
        neg_w.index_copy_(1, weighted_index, tables[1])
    steps = []
    for fused_step, index, observed, state_rows, k in fused_parts:
        step = fused_step(p.index_select(1, index).detach(), observed, state_rows, k)
        # The loss's classifier side is weighted: targets from its (stopped) state.
        pos_w.index_copy_(1, index, step.pos_weight)
        neg_w.index_copy_(1, index, step.neg_weight)
        steps.append(step)
    per_head = (pos_w * log_pos(p) + neg_w * log_neg(p)).sum(dim=(0, 2)) * scale
    s = p * (1 - p)
    grad = (neg_w * (s / (1 - p + LOG_EPSILON)) - pos_w * (s / (p + LOG_EPSILON))) * scale
    count = p.sum(dim=2).mean(dim=0)  # [H] mean predicted positives per image
    per_head = per_head + reg_weight * (count - reg_target) ** 2 / num_classes**2
    grad = grad + (reg_weight * 2 * (count - reg_target) / (num_classes**2 * batch))[:, None] * s
    for (_, index, _, _, _), step in zip(fused_parts, steps, strict=True):
        per_head = per_head.index_add(0, index, step.extra_loss)
    for kernel, index, args in kernel_parts:
        loss, part = kernel(logits.index_select(1, index).transpose(0, 1), *args)
        grad.index_copy_(1, index, part.transpose(0, 1))
        per_head = per_head.index_copy(0, index, loss.to(per_head.dtype))
    return logits, per_head, grad, tuple(step.state_grads for step in steps)


def loss_batch(
    group: HeadGroup,
    slot: LossSlot,
    rows: torch.Tensor | None,
    epoch: int,
    cache: dict | None = None,
) -> Batch:
    """What ``slot``'s loss sees of the batch ``rows`` (None: every training row) at
    ``epoch`` (1-based); ``cache`` shares the batch's rows of the label matrices between the
    losses of a step."""
    data = group.data
    kind = slot.loss.trains_on
    if cache is not None and kind in cache:
        observed, labels = cache[kind]
    else:
        if rows is None:
            observed, labels = data.observed[kind].dense(), data.labels.dense()
        else:
            observed, labels = group.batch_observed(kind, rows), group.batch_labels(rows)
        if cache is not None:
            cache[kind] = (observed, labels)
    state = slot.loss.batch_state(slot.state, rows)
    return Batch(observed, labels, epoch, group.epochs, state)


def weight_tables(
    group: HeadGroup, rows: torch.Tensor | None, epoch: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Loss weights (A for l+, B for l-) of every loss with label-only weights on ``rows``
    (None: every training row), ``[rows, T, L]`` each; None when the group has none. The
    weights depend on the labels and the epoch only, so a batch's rows of the whole table
    and the table of the batch's rows are the same numbers."""
    pos_tables, neg_tables = [], []
    for key in group.weighted_types:
        slot = group.slots[key]
        batch = loss_batch(group, slot, rows, epoch)
        pos, neg = slot.loss.weights(batch)
        pos_tables.append(pos.expand_as(batch.observed))
        neg_tables.append(neg.expand_as(batch.observed))
    if not pos_tables:
        return None
    return torch.stack(pos_tables, 1), torch.stack(neg_tables, 1)


def epoch_tables(group: HeadGroup, epoch: int) -> None:
    """Per-row loss weights of every loss with label-only weights, for one epoch:
    ``group.tables``, each ``[N, T, L]``. With labels read per batch, no table: each
    staged batch carries its rows' weights (:func:`stage_batch`)."""
    if not group.data.labels_resident:
        group.tables = None
        return
    tables = weight_tables(group, None, epoch)
    if tables is not None:
        pos, neg = tables
        if group.tables is None:
            group.tables = (pos, neg)
        else:  # in place: a captured CUDA graph reads these buffers
            group.tables[0].copy_(pos)
            group.tables[1].copy_(neg)


def start_epoch(group: HeadGroup, epoch: int) -> None:
    """Before epoch ``epoch`` (1-based) of a group: the losses' ``on_epoch_start`` hooks,
    then the epoch's tables of label-only weights."""
    for slot in group.slots.values():
        slot.loss.on_epoch_start(slot.state, epoch=epoch, num_epochs=group.epochs, seed=group.seed)
    epoch_tables(group, epoch)


def stage_batch(group: HeadGroup, rows: torch.Tensor, host: dict, epoch: int) -> None:
    """Put a batch read ahead (:meth:`TrainingData.read_batch`) on the device for the next
    step, with its rows' label-only weights when the labels are read per batch."""
    device = group.weight_t.device

    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, non_blocking=True)

    observed = host.get("observed")
    group.staged = StagedBatch(
        x=moved(host.get("x")),
        observed=None if observed is None else {k: moved(v) for k, v in observed.items()},
        labels=moved(host.get("labels")),
    )
    if observed is not None:
        group.staged.tables = weight_tables(group, rows, epoch)


def batch_tables(group: HeadGroup, rows: torch.Tensor) -> tuple | None:
    """The batch's label-only weights, one column per weighted head ``[B, Hw, L]``."""
    if group.staged is not None and group.staged.tables is not None:
        return tuple(t.index_select(1, group.weighted_type) for t in group.staged.tables)
    if group.tables is None:
        return None
    return tuple(t.index_select(0, rows).index_select(1, group.weighted_type) for t in group.tables)


def step_gradients(
    group: HeadGroup, rows: torch.Tensor, epoch: int, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[LossSlot, tuple]]]:
    """One batch of a group, without the update: logits ``[B, H, L]``, per-head losses,
    the logit gradients ``[B, H, L]`` on every head's route, and each fused loss's slot
    with its trainable state's gradients on the batch rows (in ``trainable`` order)."""
    if x is None:
        x = group.batch_features(rows)  # [B, D + 1], ones column last
    tables = batch_tables(group, rows)
    fused_parts = tuple(
        (step, index, group.batch_observed(kind, rows),
         tuple(t.index_select(1, rows) for t in state), k)
        for step, index, kind, state, k in group.fused_parts
    )  # fmt: skip
    rows_cache: dict = {}
    kernel_parts = tuple(
        (type(slot.loss).kernel, slot.index,
         slot.loss.kernel_args(loss_batch(group, slot, rows, epoch, rows_cache)))
        for slot in group.kernel_slots
    )  # fmt: skip
    args = (
        x, group.weight_t, tables, group.weighted_index, fused_parts, group.reg_weight,
        group.reg_target, group.num_classes, kernel_parts,
    )  # fmt: skip
    if group.compiled:
        logits, per_head, grad, state_grads = fused.run(batch_gradients, *args)
        group.compiled = not fused.broken()  # a failed compilation: eager from here on
    else:
        logits, per_head, grad, state_grads = batch_gradients(*args)
    for slot in group.custom_slots:
        loss, slot_grad = custom_gradient(slot, logits, loss_batch(group, slot, rows, epoch))
        grad.index_copy_(1, slot.index, slot_grad)
        per_head.index_copy_(0, slot.index, loss)
    return logits, per_head, grad, list(zip(group.fused_slots, state_grads, strict=True))


def custom_gradient(
    slot: LossSlot, logits: torch.Tensor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [h], grad [B, h, L]) of a loss without label-only weights: its own closed
    form, else autograd on its value; ``logits [B, H, L]`` of the whole group."""
    sub = logits.index_select(1, slot.index).transpose(0, 1).detach()
    closed = slot.loss.logit_gradient(sub, batch)
    if closed is not None:
        loss, grad = closed
        return loss.detach(), grad.transpose(0, 1)
    sub.requires_grad_(True)
    loss = slot.loss.batch_loss(sub, batch)
    loss.sum().backward()
    return loss.detach(), sub.grad.transpose(0, 1)


def train_step(group: HeadGroup, rows: torch.Tensor, epoch: int) -> None:
    """One Adam step of every head in the group, then the losses' ``after_step`` hooks."""
    x = group.batch_features(rows)  # [B, D + 1], ones column last
    blocks, _, columns = group.weight_t.shape
    logits, per_head, grad, state_grads = step_gradients(group, rows, epoch, x)
    for slot, grads in state_grads:
        for name, value in zip(slot.loss.trainable, grads, strict=True):
            slot.grads[name].index_copy_(1, rows, value)
    grad_t = grad.reshape(x.shape[0], blocks, columns).transpose(0, 1)  # [blocks, B, per*L]
    group.update(x, grad_t)
    for slot, _ in state_grads:
        for name in slot.loss.trainable:  # the state's gradient lives on the batch rows
            slot.grads[name].index_fill_(1, rows, 0)
    for slot in group.hooked_slots:
        slot_logits = logits.index_select(1, slot.index).transpose(0, 1)
        slot.loss.after_step(
            slot.state, rows=rows, logits=slot_logits, batch=loss_batch(group, slot, rows, epoch)
        )
    group.loss_sum += per_head.detach()
