"""The stacked linear-head engine: every loss x lr x batch size x seed in one pass.

Heads that share a batch size and a seed form a *group*: they see the same batches, so one
matrix product computes all their logits, one product all their weight gradients, and one
fused Adam call per learning rate updates them (on a CPU, one compiled pass forms the
gradient inside the update: fused.py). Features sit on the device once. Val mAP is
computed for every head after every epoch; each head keeps its best-epoch weights; the
test split is scored once, with those weights (paper.md section 5).

The losses are objects (:mod:`spl.fit.losses`); the engine asks each how to get its
gradient: label-only weights (tabled once an epoch, closed form), a fused closed form for
losses with trainable state (ROLE), a loss's own closed form, or autograd on its value.
A loss's state (per row, per head) lives in the group; the loss's hooks update it.

The estimator interface follows scikit-learn: ``StackedHeads(...)`` stores options,
``fit(...)`` trains and returns ``self``, learned state ends in ``_``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from spl.data import protocol
from spl.data.runtime import generator, resolve_device
from spl.evaluate.metrics import mean_average_precision, probability_histogram
from spl.evaluate.scoring import head_scores, recovery_map
from spl.fit import fused
from spl.fit.losses import (
    LOG_EPSILON,
    WITH_NEGATIVES,
    Batch,
    Context,
    Loss,
    Scores,
    get_loss,
    log_neg,
    log_pos,
    make_losses,
)


@dataclass(frozen=True)
class HeadConfig:
    loss: str
    lr: float
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """A head's name says what it is, e.g. ``an_ls_lr0.0001_bs8_s0``."""
        return head_name(self.loss, self.lr, self.batch_size, self.seed)


def head_name(loss: str, lr: float, batch_size: int, seed: int) -> str:
    return f"{loss}_lr{lr:g}_bs{batch_size}_s{seed}"


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a function of (seed, epoch) alone, so a resumed
    run and a head trained alone see exactly the batches of an uninterrupted sweep."""
    return torch.randperm(num_rows, generator=generator(seed, epoch, "batches"))


def epoch_batches(
    num_rows: int, batch_size: int, seed: int, epoch: int, device: torch.device | None = None
) -> list[torch.Tensor]:
    """Batches of one epoch: shuffled, the last partial batch dropped (paper.md section 5).

    The order goes to ``device`` once and each batch is a slice of it: no per-step
    host-to-device copy to stall a GPU's queue.
    """
    order = epoch_permutation(num_rows, seed, epoch)
    if device is not None:
        order = order.to(device)
    count = num_rows // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def initial_head(
    num_features: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (weight [L, D], bias [L]) of every head of a seed: nn.Linear's default
    distribution U(-1/sqrt(D), 1/sqrt(D)) (the reference's head), drawn once per seed so
    that heads differ only by what the sweep varies."""
    draw = generator(seed, 0, "head")
    bound = 1.0 / math.sqrt(num_features)
    weight = torch.rand(num_classes, num_features, generator=draw, dtype=torch.float64) * 2 - 1
    bias = torch.rand(num_classes, generator=draw, dtype=torch.float64) * 2 - 1
    return weight * bound, bias * bound


@dataclass
class _Slot:
    """The heads of one loss in a group (their positions in the group) and its state."""

    loss: Loss
    positions: list[int]
    index: torch.Tensor
    state: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # of trainable state
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # snapshot at best epochs

    @property
    def route(self) -> str:
        return gradient_route(type(self.loss))


def gradient_route(loss: type[Loss]) -> str:
    """How the engine gets a loss's gradient: ``weights`` (label-only weights, tabled per
    epoch), ``fused`` (state-derived weights in the compiled step), ``kernel`` (the loss's
    closed form as a pure function, in the compiled step), ``closed_form`` (the loss's own
    logit gradient, eagerly) or ``autograd`` (on its value)."""
    if loss.fused_step is not Loss.fused_step:
        return "fused"
    if loss.weights is not Loss.weights:
        return "weights"
    if loss.kernel is not Loss.kernel:
        return "kernel"
    if loss.logit_gradient is not Loss.logit_gradient:
        return "closed_form"
    return "autograd"


class _Group:
    """The heads of one (batch size, seed): stacked weights, their Adam, the losses' state.

    Weights live in ``weight_t``, ``[n_lrs, D + 1, heads_per_lr * L]``: each head's bias is
    its last row, matched by a column of ones appended to the features, so one batched
    product gives all logits and one gives the gradient of weights and biases together.
    This layout makes the products with a skinny batch (B = 8 or 16) plain GEMMs (about
    twice as fast on a CPU as the transposed form), and one lr's heads one contiguous block
    for its fused Adam call. ``weight`` is the same in the head layout ``[H, L, D + 1]``.
    """

    def __init__(
        self,
        heads: list[HeadConfig],
        losses: Mapping[str, Loss],
        num_features: int,
        observed_sets: Mapping[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        graphs: bool = False,
        compiled: bool = True,
        update: str = "auto",
    ):
        # Heads sorted by lr: each lr's heads form one contiguous block of the stacked
        # weights, so one fused Adam call (one param group) updates the block in place.
        self.heads = sorted(heads, key=lambda h: (-h.lr, h.loss))
        self.batch_size, self.seed = heads[0].batch_size, heads[0].seed
        n_heads = len(self.heads)
        num_classes = next(iter(observed_sets.values())).shape[1]
        self.num_classes = num_classes
        self.blocks = len({h.lr for h in self.heads})  # the grid gives each lr every loss
        weight, bias = initial_head(num_features, num_classes, self.seed)
        initial = torch.cat([weight, bias[:, None]], dim=1).to(dtype)
        heads_layout = initial.expand(n_heads, *initial.shape)
        self.weight_t = _to_blocks(heads_layout, self.blocks).to(device)
        self.weight_grad_t = torch.zeros_like(self.weight_t)
        self.slots: dict[str, _Slot] = {}
        for key in dict.fromkeys(h.loss for h in self.heads):
            loss = losses[key]
            positions = [i for i, h in enumerate(self.heads) if h.loss == key]
            state = loss.init_state(
                observed_sets[loss.trains_on], heads=len(positions), seed=self.seed
            )
            index = torch.tensor(positions, device=device, dtype=torch.long)
            self.slots[key] = _Slot(loss, positions, index, state)
        self.weighted_types = sorted(k for k, s in self.slots.items() if s.route == "weights")
        weighted = [i for i, h in enumerate(self.heads) if h.loss in self.weighted_types]
        self.weighted_index = torch.tensor(weighted, device=device, dtype=torch.long)
        self.weighted_type = torch.tensor(
            [self.weighted_types.index(self.heads[i].loss) for i in weighted],
            device=device,
            dtype=torch.long,
        )
        self.fused_slots = [s for s in self.slots.values() if s.route == "fused"]
        # What each fused loss needs per step, looked up once: (its pure step function,
        # its head positions, its observed set, its trainable state tensors, k).
        self.fused_parts = [
            (
                type(s.loss).fused_step, s.index, s.loss.trains_on,
                tuple(s.state[name] for name in s.loss.trainable), _expected_positives(s.loss),
            )
            for s in self.fused_slots
        ]  # fmt: skip
        self.kernel_slots = [s for s in self.slots.values() if s.route == "kernel"]
        self.custom_slots = [s for s in self.slots.values() if s.route in ("closed_form", "autograd")]  # fmt: skip
        self.hooked_slots = [s for s in self.slots.values() if s.loss.overrides("after_step")]
        # A CUDA graph replays the kernels it captured with the values they had then. Only
        # the weighted tables and the fused losses' state are device buffers updated in
        # place; a kernel loss's arguments are built in Python every step (this epoch's
        # schedule: GR's k and v, SPLC's switch, the LL rejection count, APL's targets) and
        # custom or hooked losses run Python between kernels, so their groups run unrecorded.
        self.graphable = not (self.kernel_slots or self.custom_slots or self.hooked_slots)
        reg = [float(losses[h.loss].regulariser_weight) for h in self.heads]
        self.reg_weight = torch.tensor(reg, device=device, dtype=dtype)
        self.reg_target = torch.tensor(
            [_expected_positives(losses[h.loss]) for h in self.heads], device=device, dtype=dtype
        )
        for slot in self.slots.values():
            for name in slot.loss.trainable:
                slot.grads[name] = torch.zeros_like(slot.state[name])
            slot.best = {name: slot.state[name].clone() for name in slot.loss.snapshot}
        # CUDA graphs replay optimizer.step(): Adam must keep its step count on the device.
        self.capturable = bool(graphs) and torch.device(device).type == "cuda"
        # What Adam updates, stack by stack: the weights (one lr per block) and each loss's
        # trainable state (one lr per head); one param group per leading index.
        per_block = n_heads // self.blocks
        block_lrs = [self.heads[b * per_block].lr for b in range(self.blocks)]
        self.stacks = [(self.weight_t, self.weight_grad_t, block_lrs)]
        for slot in self.slots.values():
            for name in slot.loss.trainable:
                multiplier = slot.loss.lr_multiplier(name)
                lrs = [self.heads[position].lr * multiplier for position in slot.positions]
                self.stacks.append((slot.state[name], slot.grads[name], lrs))
        self.optimizer = self._make_optimizer(capturable=self.capturable)
        self.compiled = (
            compiled and not self.capturable and bool(self.optimizer.param_groups[0].get("fused"))
        )
        # On a CPU the update runs compiled too (fused.py), on the path fastest here: the
        # gradient formed inside the Adam pass, or a GEMM then one compiled Adam pass.
        self.update_mode = "eager"
        if self.compiled:
            chosen = (
                update if update != "auto" else fused.choose_update(self.stacks, self.batch_size)
            )
            self.update_mode = chosen
            self.compiled = not fused.broken()
            if not self.compiled:
                self.update_mode = "eager"
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.update_mode != "eager":
            self._bind_moments()
        self.best_weight = self.weight
        self.best_val = torch.full((n_heads,), -1.0, dtype=torch.float64)
        self.best_epoch = torch.zeros(n_heads, dtype=torch.long)
        self.epochs_done = 0
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss_sum: torch.Tensor | None = None
        self.graph = None

    def _make_optimizer(self, capturable: bool) -> torch.optim.Optimizer:
        groups = []
        for param_stack, grad_stack, lrs in self.stacks:
            for index, lr in enumerate(lrs):
                param = _view_param(param_stack[index], grad_stack[index])
                groups.append({"params": [param], "lr": lr})
        return _adam(groups, self.weight_t.device, capturable)

    def _bind_moments(self) -> None:
        """Adam's state created up front, with each stack's moments as views of two stacked
        tensors that the compiled update reads and writes in one pass; torch.optim
        (checkpoints, the eager fallback) sees the very same state."""
        optimizer = self.optimizer
        groups = iter(optimizer.param_groups)
        self.moments = []
        for param_stack, _, lrs in self.stacks:
            stacked = (torch.zeros_like(param_stack), torch.zeros_like(param_stack))
            for index in range(len(lrs)):
                param = next(groups)["params"][0]
                state = optimizer.state[param]
                if not state:  # what torch.optim.Adam(fused=True) creates on its first step
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                for key, moment in zip(("exp_avg", "exp_avg_sq"), stacked, strict=True):
                    moment[index].copy_(state[key])
                    state[key] = moment[index]
            self.moments.append(stacked)

    def update(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Adam step of every head from the batch ``x [B, D + 1]`` and the logit gradients
        ``grad_out [blocks, B, per * L]``, the state's gradients already in place."""
        if self.update_mode != "eager":
            optimizer = self.optimizer
            states = [optimizer.state[g["params"][0]] for g in optimizer.param_groups]
            step = int(states[0]["step"].item()) + 1
            (beta1, beta2), eps = (
                optimizer.param_groups[0]["betas"],
                optimizer.param_groups[0]["eps"],
            )
            dtype = self.weight_t.dtype
            # In float64 first, as torch's fused kernel computes them.
            bias_correction2_sqrt = torch.tensor(math.sqrt(1 - beta2**step), dtype=dtype)
            stacks = []
            for (param, grad, lrs), (exp_avg, exp_avg_sq) in zip(
                self.stacks, self.moments, strict=True
            ):
                size = torch.tensor([lr / (1 - beta1**step) for lr in lrs], dtype=dtype)
                size = size.view(-1, *([1] * (param.dim() - 1)))
                stacks.append((param, grad, exp_avg, exp_avg_sq, size))
            constants = (bias_correction2_sqrt, beta1, beta2, eps)
            if self.update_mode == "inpass":
                weight, _, exp_avg, exp_avg_sq, size = stacks[0]
                if fused.attempt(
                    fused.adam_update, x, grad_out, weight, exp_avg, exp_avg_sq, size, *constants
                ):
                    rest = tuple(stacks[1:])
                    if not rest or fused.attempt(fused.adam_apply, rest, *constants):
                        torch._foreach_add_([s["step"] for s in states], 1)
                        return
                    # the weights are updated; the rest eagerly
                    torch._foreach_add_([s["step"] for s in states[: self.blocks]], 1)
                    self._fall_back()
                    self.adam_step(first=self.blocks)
                    return
            else:  # "gemm"
                torch.matmul(x.t(), grad_out, out=self.weight_grad_t)
                if fused.attempt(fused.adam_apply, tuple(stacks), *constants):
                    torch._foreach_add_([s["step"] for s in states], 1)
                    return
                self._fall_back()
                self.adam_step()
                return
            self._fall_back()
        torch.matmul(x.t(), grad_out, out=self.weight_grad_t)
        self.adam_step()

    def _fall_back(self) -> None:
        """Compilation failed (warned once by fused.py): eager from here on."""
        self.update_mode = "eager"
        self.compiled = False

    def adam_step(self, first: int = 0) -> None:
        """``optimizer.step()`` without its per-call Python bookkeeping, which costs about as
        much as the update itself at batch 8 on a CPU: the same fused kernel on the same
        state (so checkpoints and the torch.optim parity test still hold). Param groups
        before ``first`` are skipped (the compiled update did them)."""
        optimizer = self.optimizer
        groups = optimizer.param_groups
        if self.capturable or not groups[0].get("fused") or not optimizer.state:
            optimizer.step()  # CUDA graphs, the foreach fallback, and the state's creation
            return
        groups = groups[first:]
        if not groups:
            return
        states = [optimizer.state[g["params"][0]] for g in groups]
        torch._foreach_add_([s["step"] for s in states], 1)
        for group, state in zip(groups, states, strict=True):
            (param,) = group["params"]
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                [param],
                [param.grad],
                [state["exp_avg"]],
                [state["exp_avg_sq"]],
                [],
                [state["step"]],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    @property
    def weight(self) -> torch.Tensor:
        """The weights in the head layout ``[H, L, D + 1]`` (a copy)."""
        return _to_heads(self.weight_t, self.num_classes)

    def head_state(self, position: int, *, best: bool = True) -> dict[str, torch.Tensor]:
        """The state of the head at ``position``: its slice of its loss's state (the best
        epoch's snapshot for the tensors the loss keeps one of)."""
        slot = self.slots[self.heads[position].loss]
        k = slot.positions.index(position)
        out = {}
        for name, tensor in slot.state.items():
            source = slot.best[name] if best and name in slot.best else tensor
            out[name] = source[k] if _per_head(slot, name) else source
        return out

    def state_dict(self) -> dict:
        """A copy on the CPU (a snapshot: training on does not change it)."""
        optimizer = self.optimizer.state_dict()
        return {
            "weight": _copy(self.weight),
            "loss_state": {k: _copy_dict(s.state) for k, s in self.slots.items()},
            "best_loss_state": {k: _copy_dict(s.best) for k, s in self.slots.items()},
            "adam": {
                "state": {
                    i: {k: _copy(v) for k, v in s.items()} for i, s in optimizer["state"].items()
                },
                "param_groups": optimizer["param_groups"],
            },
            "best_weight": _copy(self.best_weight),
            "best_val": _copy(self.best_val),
            "best_epoch": _copy(self.best_epoch),
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weight_t.copy_(_to_blocks(state["weight"].to(self.weight_t), self.blocks))
        for key, slot in self.slots.items():
            for name, tensor in state["loss_state"][key].items():
                slot.state[name].copy_(tensor)
            for name, tensor in state["best_loss_state"][key].items():
                slot.best[name].copy_(tensor)
        self.optimizer.load_state_dict(state["adam"])  # casts moments to the device
        for group in self.optimizer.param_groups:  # a checkpoint may come from the CPU
            group["capturable"] = self.capturable
        if self.update_mode != "eager":
            self._bind_moments()
        self.best_weight.copy_(state["best_weight"])
        self.best_val.copy_(state["best_val"])
        self.best_epoch.copy_(state["best_epoch"])
        self.epochs_done = int(state["epochs_done"])


def _per_head(slot: _Slot, name: str) -> bool:
    """Whether a state tensor has one entry per head of its slot (leading dimension)."""
    tensor = slot.state[name]
    return (
        name in slot.loss.trainable
        or name in slot.loss.snapshot
        or (tensor.dim() > 2 and tensor.shape[0] == len(slot.positions))
    )


def _expected_positives(loss: Loss) -> float:
    """k of a loss with R_k (its option, else the dataset's); 0 for the others."""
    if not loss.regulariser_weight:
        return float(loss.context.expected_positives or 0.0)
    return loss.expected_positives()


def _to_blocks(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """Head layout ``[H, L, D + 1]`` to block layout ``[blocks, D + 1, H / blocks * L]``."""
    n_heads, num_classes, width = weight.shape
    per = n_heads // blocks
    grouped = weight.reshape(blocks, per, num_classes, width).permute(0, 3, 1, 2)
    return grouped.reshape(blocks, width, per * num_classes).contiguous()


def _to_heads(weight_t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Block layout back to the head layout ``[H, L, D + 1]``, always as a new tensor (a
    reshape would alias the live weights when there is a single block)."""
    blocks, width, columns = weight_t.shape
    per = columns // num_classes
    out = weight_t.new_empty(blocks * per, num_classes, width)
    out.view(blocks, per, num_classes, width).copy_(
        weight_t.view(blocks, width, per, num_classes).permute(0, 2, 3, 1)
    )
    return out


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)


def _copy_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: _copy(tensor) for name, tensor in tensors.items()}


def _view_param(view: torch.Tensor, grad_view: torch.Tensor) -> torch.Tensor:
    """A leaf sharing storage with a block of the stacked tensor, with its gradient a view
    of the stacked gradient: Adam's in-place update lands in the stacked weights."""
    param = view.detach().requires_grad_(True)
    param.grad = grad_view
    return param


def _adam(groups: list[dict], device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    options = {"betas": protocol.ADAM_BETAS, "eps": protocol.ADAM_EPS, "weight_decay": 0.0}
    try:
        return torch.optim.Adam(groups, fused=True, capturable=capturable, **options)
    except (RuntimeError, TypeError):  # fused kernel missing for this device or dtype
        return torch.optim.Adam(groups, foreach=True, **options)


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


class StackedHeads:
    """Train many linear heads on cached features at once (one per loss x lr x bs x seed).

    >>> model = StackedHeads(losses=["an", "role"], lrs=[1e-3], batch_sizes=[8]).fit(
    ...     X, observed, labels=Y, X_val=Xv, Y_val=Yv, X_test=Xt, Y_test=Yt)
    >>> model.best_val_map_, model.results_, model.decision_function(X_test)

    ``loss_options`` maps a loss key to its option overrides (``{"role":
    {"estimator_lr_multiplier": 5}}``); ``expected_positives`` and ``dataset`` are what the
    losses know of the data (k, and the name that picks per-dataset defaults). On a CPU,
    ``update`` picks the compiled Adam path (``auto``: the fastest on this machine, see
    :func:`spl.fit.fused.choose_update`; ``inpass``, ``gemm``; ``eager`` never compiles it)
    and ``flush_denormals`` treats denormal floats as zero while training (fused.py).
    """

    def __init__(
        self,
        losses: Sequence[str] = ("an",),
        lrs: Sequence[float] = protocol.LRS,
        batch_sizes: Sequence[int] = protocol.BATCH_SIZES,
        seeds: Sequence[int] = (0,),
        epochs: int = protocol.LINEAR_EPOCHS,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
        expected_positives: float | None = None,
        dataset: str | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        histogram_bins: int = protocol.HISTOGRAM_BINS,
        eval_chunk_heads: int = 16,
        cuda_graphs: bool = True,
        flush_denormals: bool = True,
        update: str = "auto",
    ) -> None:
        self.losses = list(losses)
        self.lrs = list(lrs)
        self.batch_sizes = list(batch_sizes)
        self.seeds = list(seeds)
        self.epochs = epochs
        self.loss_options = loss_options
        self.expected_positives = expected_positives
        self.dataset = dataset
        self.device = device
        self.dtype = dtype
        self.histogram_bins = histogram_bins
        self.eval_chunk_heads = eval_chunk_heads
        self.cuda_graphs = cuda_graphs
        self.flush_denormals = flush_denormals
        self.update = update

    # ------------------------------------------------------------------ public API

    def fit(
        self,
        X: np.ndarray | torch.Tensor,
        observed: np.ndarray | torch.Tensor,
        *,
        labels: np.ndarray | torch.Tensor,
        X_val: np.ndarray | torch.Tensor,
        Y_val: np.ndarray | torch.Tensor,
        observed_iu: np.ndarray | torch.Tensor | None = None,
        X_test: np.ndarray | torch.Tensor | None = None,
        Y_test: np.ndarray | torch.Tensor | None = None,
        state: dict | None = None,
        on_epoch: Callable[[StackedHeads, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        scores: Scores | np.ndarray | torch.Tensor | None = None,
    ) -> StackedHeads:
        """Train every head; ``state`` (from :meth:`state_dict`) resumes an interrupted sweep.

        ``labels`` are the full training labels: read only by the losses that read them
        (the full-label baselines, IUN's true negatives) and for the recovery analysis.
        ``observed_iu`` is the observed set with negatives (1 positive + 1 negative per
        image) that losses training on observed negatives (IU) see. With ``X_test`` and
        ``Y_test`` the test split is scored once with every head's best weights:
        :attr:`results_`, :attr:`per_class_ap_`. ``scores`` are a vision-language model's
        scores of the training rows, for the losses that train on pseudo-labels from them
        (VLPL, AEVLP): a :class:`~spl.fit.losses.Scores`, or the whole-image cosines ``[N, L]``.
        """
        self._setup(X, observed, labels, X_val, Y_val, observed_iu, state, scores=scores)
        self.train_seconds_ = 0.0
        with fused.denormals_flushed(self.device_.type == "cpu" and self.flush_denormals):
            for group in self.groups_:
                while group.epochs_done < self.epochs:
                    start = time.perf_counter()
                    record = self._train_epoch(group, on_step)
                    record.update(self._validate(group))
                    record["seconds"] = time.perf_counter() - start
                    self.train_seconds_ += record["seconds"]
                    self.history_.extend(_split_record(group, record))
                    if on_epoch is not None:
                        on_epoch(self, {"group": group, **record})
                group.graph = None
            self._collect()
            if X_test is not None and Y_test is not None:
                self._score(X_test, Y_test)
        self._data = None
        return self

    def decision_function(self, X: np.ndarray | torch.Tensor, *, best: bool = True) -> torch.Tensor:
        """Logits ``[H, N, L]`` of every head (best-epoch weights by default), on the CPU."""
        X = _augment(_tensor(X, self.dtype, self.device_))
        return torch.cat(
            [_logits(X, g.best_weight if best else g.weight).cpu() for g in self.groups_]
        )

    def score(self, X, Y, *, best: bool = True) -> np.ndarray:
        """mAP (x100) of every head on (X, Y), in :attr:`heads_` order."""
        X = _augment(_tensor(X, self.dtype, self.device_))
        Y = _tensor(Y, self.dtype, self.device_)
        return torch.cat(
            [self._map(X, g.best_weight if best else g.weight, Y) for g in self.groups_]
        ).numpy()

    def head_state(self, head: HeadConfig, *, best: bool = True) -> dict[str, torch.Tensor]:
        """The loss state of one head (e.g. ROLE's ``theta`` ``[N_train, L]``), at its best
        epoch by default."""
        for group in self.groups_:
            if head in group.heads:
                return group.head_state(group.heads.index(head), best=best)
        raise KeyError(f"no head {head.name}")

    def estimator_probabilities(self, head: HeadConfig, *, best: bool = True) -> torch.Tensor:
        """The label estimates of one head's loss (ROLE: sigmoid(theta)) ``[N_train, L]``."""
        estimates = self.losses_[head.loss].label_estimates(self.head_state(head, best=best))
        if estimates is None:
            raise KeyError(f"{head.loss} keeps no label estimates")
        return estimates.cpu()

    def state_dict(self) -> dict:
        """Everything needed to resume after the last finished epoch of each group."""
        return {
            "heads": [asdict(h) for g in self.groups_ for h in g.heads],
            "groups": [g.state_dict() for g in self.groups_],
            "history": [dict(row) for row in self.history_],
        }

    # ------------------------------------------------------------------ internals

    def _setup(self, X, observed, labels, X_val, Y_val, observed_iu, state, scores=None) -> None:
        """Check the inputs, put the data on the device and build the groups."""
        for key in self.losses:
            get_loss(key)
        device = resolve_device(self.device)
        self.device_ = device
        dtype = self.dtype
        X = _augment(_tensor(X, dtype, device))
        observed = _tensor(observed, dtype, device)
        labels = _tensor(labels, dtype, device)
        num_rows, num_features = X.shape[0], X.shape[1] - 1
        num_classes = observed.shape[1]
        if scores is not None and not isinstance(scores, Scores):
            scores = Scores(
                torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores)
            )
        context = Context(num_classes, self.expected_positives, self.dataset, scores)
        self.losses_ = make_losses(self.losses, self.loss_options, context)
        for loss in self.losses_.values():
            loss.check_epochs(self.epochs)
        observed_sets = {loss.trains_on: observed for loss in self.losses_.values()}
        needs_negatives = [k for k, v in self.losses_.items() if v.trains_on == WITH_NEGATIVES]
        if needs_negatives:
            if observed_iu is None:
                raise ValueError(
                    f"{needs_negatives[0]} trains on observed negatives: pass observed_iu, an "
                    "observed set with 1 positive + 1 negative per image"
                )
            observed_sets[WITH_NEGATIVES] = _tensor(observed_iu, dtype, device)
        small = [b for b in self.batch_sizes if b > num_rows]
        if small:
            raise ValueError(
                f"the training split has {num_rows} rows, fewer than batch size {small[0]}"
            )
        self._data = {
            "X": X,
            "X_val": _augment(_tensor(X_val, dtype, device)),
            "Y_val": _tensor(Y_val, dtype, device),
            "observed": observed_sets,
            "labels": labels,
        }
        # Entries whose probabilities the paper's figure follows: unobserved positives.
        self.hidden_positive_mask_ = (labels == 1) & (observed == 0)
        self.heads_: list[HeadConfig] = []
        self.groups_: list[_Group] = []
        for seed in self.seeds:
            for bs in self.batch_sizes:
                heads = [HeadConfig(loss, lr, bs, seed) for lr in self.lrs for loss in self.losses]
                # Weight entries times steps: compiling pays off only for large sweeps.
                work = (num_features + 1) * num_classes * len(heads)
                work *= (num_rows // bs) * self.epochs
                group = _Group(
                    heads, self.losses_, num_features, observed_sets, device, dtype,
                    graphs=self.cuda_graphs, compiled=fused.enabled(device, work),
                    update=self.update,
                )  # fmt: skip
                self.groups_.append(group)
                self.heads_.extend(group.heads)
        self.history_: list[dict] = []
        if state is not None:
            self._load_state(state)

    def _load_state(self, state: dict) -> None:
        saved = [HeadConfig(**h) for h in state["heads"]]
        if saved != [h for g in self.groups_ for h in g.heads]:
            raise ValueError("the saved sweep has other heads than this one")
        for group, group_state in zip(self.groups_, state["groups"], strict=True):
            group.load_state_dict(group_state)
        self.history_ = list(state["history"])

    def _batch(
        self, slot: _Slot, rows: torch.Tensor | None, epoch: int, cache: dict | None = None
    ) -> Batch:
        """What ``slot``'s loss sees of the batch ``rows`` (None: every training row);
        ``cache`` shares the batch's rows of the label matrices between the losses of a step."""
        data = self._data
        kind = slot.loss.trains_on
        if cache is not None and kind in cache:
            observed, labels = cache[kind]
        else:
            observed, labels = data["observed"][kind], data["labels"]
            if rows is not None:
                observed, labels = observed.index_select(0, rows), labels.index_select(0, rows)
            if cache is not None:
                cache[kind] = (observed, labels)
        return Batch(observed, labels, epoch, self.epochs, slot.loss.batch_state(slot.state, rows))

    def _epoch_tables(self, group: _Group, epoch: int) -> None:
        """Per-row loss weights (A for l+, B for l-) of every loss with label-only weights,
        for one epoch: ``[N, T, L]``."""
        pos_tables, neg_tables = [], []
        for key in group.weighted_types:
            slot = group.slots[key]
            pos, neg = slot.loss.weights(self._batch(slot, None, epoch))
            pos_tables.append(pos.expand_as(self._data["labels"]))
            neg_tables.append(neg.expand_as(self._data["labels"]))
        if pos_tables:
            pos, neg = torch.stack(pos_tables, 1), torch.stack(neg_tables, 1)
            if group.tables is None:
                group.tables = (pos, neg)
            else:  # in place: a captured CUDA graph reads these buffers
                group.tables[0].copy_(pos)
                group.tables[1].copy_(neg)

    def _train_epoch(self, group: _Group, on_step) -> dict:
        epoch = group.epochs_done + 1
        X = self._data["X"]
        for slot in group.slots.values():
            slot.loss.on_epoch_start(
                slot.state, epoch=epoch, num_epochs=self.epochs, seed=group.seed
            )
        self._epoch_tables(group, epoch)
        if group.loss_sum is None:
            group.loss_sum = torch.zeros(len(group.heads), dtype=torch.float64, device=X.device)
        group.loss_sum.zero_()  # in place: a captured CUDA graph accumulates into this buffer
        batches = epoch_batches(X.shape[0], group.batch_size, group.seed, epoch - 1, X.device)
        use_graph = self.cuda_graphs and X.device.type == "cuda" and group.graphable
        for step, rows in enumerate(batches):
            if use_graph and group.graph is None and step == 3:
                self._capture(group, rows, epoch)
            if group.graph is not None:
                group.rows.copy_(rows)
                group.graph.replay()
            else:
                self._step(group, rows, epoch)
            if on_step is not None:
                on_step(step)
        group.epochs_done = epoch
        self._end_epoch(group, epoch)
        loss = (group.loss_sum / max(len(batches), 1)).cpu()
        return {"epoch": epoch, "train_loss": loss}

    def _end_epoch(self, group: _Group, epoch: int) -> None:
        """The losses' end-of-epoch hooks, with a scoring pass over the training rows for
        those that ask for one."""
        weight = None
        for slot in group.slots.values():
            scores = None
            if slot.loss.wants_scores(epoch=epoch, num_epochs=self.epochs):
                if weight is None:
                    weight = group.weight
                with torch.no_grad():
                    logits = _logits(self._data["X"], weight.index_select(0, slot.index))
                    scores = torch.sigmoid(logits)
            slot.loss.on_epoch_end(
                slot.state, epoch=epoch, num_epochs=self.epochs, seed=group.seed, scores=scores
            )

    def _capture(self, group: _Group, rows: torch.Tensor, epoch: int) -> None:
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
                self._step(group, group.rows, epoch)
            group.graph = graph
        except RuntimeError as exc:  # pragma: no cover - depends on the CUDA build
            import warnings

            warnings.warn(f"CUDA graph capture failed ({exc}); training eagerly", stacklevel=2)
            group.graph = None

    def step_gradients(
        self, group: _Group, rows: torch.Tensor, epoch: int, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[_Slot, tuple]]]:
        """One batch of a group, without the update: logits ``[B, H, L]``, per-head losses,
        the logit gradients ``[B, H, L]`` on every head's route, and each trainable state's
        gradients on the batch rows (in the loss's ``trainable`` order)."""
        data = self._data
        if x is None:
            x = data["X"].index_select(0, rows)  # [B, D + 1], ones column last
        tables = None
        if group.tables is not None:
            tables = tuple(
                t.index_select(0, rows).index_select(1, group.weighted_type) for t in group.tables
            )
        observed = data["observed"]
        fused_parts = tuple(
            (step, index, observed[kind].index_select(0, rows),
             tuple(t.index_select(1, rows) for t in state), k)
            for step, index, kind, state, k in group.fused_parts
        )  # fmt: skip
        rows_cache: dict = {}
        kernel_parts = tuple(
            (type(slot.loss).kernel, slot.index,
             slot.loss.kernel_args(self._batch(slot, rows, epoch, rows_cache)))
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
            loss, slot_grad = self._custom_grad(slot, logits, rows, epoch)
            grad.index_copy_(1, slot.index, slot_grad)
            per_head.index_copy_(0, slot.index, loss)
        return logits, per_head, grad, list(zip(group.fused_slots, state_grads, strict=True))

    def _step(self, group: _Group, rows: torch.Tensor, epoch: int) -> None:
        """One Adam step of every head in the group."""
        x = self._data["X"].index_select(0, rows)  # [B, D + 1], ones column last
        blocks, _, columns = group.weight_t.shape
        logits, per_head, grad, state_grads = self.step_gradients(group, rows, epoch, x)
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
                slot.state, rows=rows, logits=slot_logits, batch=self._batch(slot, rows, epoch)
            )
        group.loss_sum += per_head.detach()

    def _custom_grad(self, slot: _Slot, logits, rows, epoch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [h], grad [B, h, L]) of a loss without label-only weights: its own closed
        form, else autograd on its value."""
        sub = logits.index_select(1, slot.index).transpose(0, 1).detach()
        batch = self._batch(slot, rows, epoch)
        closed = slot.loss.logit_gradient(sub, batch)
        if closed is not None:
            loss, grad = closed
            return loss.detach(), grad.transpose(0, 1)
        sub.requires_grad_(True)
        loss = slot.loss.batch_loss(sub, batch)
        loss.sum().backward()
        return loss.detach(), sub.grad.transpose(0, 1)

    def _map(self, X, weight, Y) -> torch.Tensor:
        chunk = max(1, self.eval_chunk_heads)
        out = []
        for lo in range(0, weight.shape[0], chunk):
            logits = _logits(X, weight[lo : lo + chunk])
            out.append(mean_average_precision(logits, Y).double().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _validate(self, group: _Group) -> dict:
        weight = group.weight  # the head layout, once per epoch
        val_map = self._map(self._data["X_val"], weight, self._data["Y_val"])
        improved = val_map > group.best_val  # ties keep the earlier epoch
        if improved.any():
            index = torch.nonzero(improved).flatten().to(group.weight_t.device)
            group.best_weight[index] = weight[index]
            group.best_val[improved] = val_map[improved]
            group.best_epoch[improved] = group.epochs_done
            for slot in group.slots.values():
                for k, position in enumerate(slot.positions):
                    if improved[position]:
                        for name, best in slot.best.items():
                            best[k] = slot.state[name][k]
        record: dict[str, Any] = {"val_map": val_map}
        if self.histogram_bins:
            record["histogram"] = self._hidden_positive_histogram(weight, self._data["X"])
            estimates = {}
            for slot in group.slots.values():
                probabilities = slot.loss.label_estimates(slot.state)
                if probabilities is not None:
                    counts = probability_histogram(
                        probabilities, self.hidden_positive_mask_, self.histogram_bins
                    )
                    estimates.update(zip(slot.positions, counts, strict=True))
            record["estimator_histogram"] = estimates
        return record

    @torch.no_grad()
    def _hidden_positive_histogram(self, weight: torch.Tensor, X) -> np.ndarray:
        """Histogram of predicted probabilities on unobserved positives (y=1, z=0), per head.

        Only those entries are scored: per class, the rows where it is a hidden positive.
        """
        bins = self.histogram_bins
        counts = torch.zeros(weight.shape[0], bins, dtype=torch.long, device=X.device)
        mask = self.hidden_positive_mask_
        for cls in range(mask.shape[1]):
            rows = torch.nonzero(mask[:, cls]).flatten()
            if len(rows) == 0:
                continue
            logits = X.index_select(0, rows) @ weight[:, cls].t()  # [rows, H]
            index = (torch.sigmoid(logits) * bins).long().clamp_(0, bins - 1)
            counts += torch.nn.functional.one_hot(index, bins).sum(0)
        return counts.cpu().numpy()

    def _collect(self) -> None:
        self.best_val_map_ = np.concatenate([g.best_val.numpy() for g in self.groups_])
        self.best_epoch_ = np.concatenate([g.best_epoch.numpy() for g in self.groups_])
        weight = torch.cat([g.best_weight.cpu() for g in self.groups_])
        self.coef_ = weight[..., :-1]
        self.intercept_ = weight[..., -1]

    @torch.no_grad()
    def _score(self, X_test, Y_test) -> None:
        """The test split scored once with every head's best weights (paper.md section 5),
        and the training-set recovery of the hidden labels (paper Table 2): by the heads
        and by the label estimates of losses that keep them (ROLE's estimator)."""
        X_test = _augment(_tensor(X_test, self.dtype, self.device_))
        test_labels = torch.as_tensor(np.asarray(Y_test), dtype=torch.float32)
        train_labels = self._data["labels"].float().cpu()
        self.results_: list[dict] = []
        self.per_class_ap_: list[list[float]] = []
        self.exported_state_: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for group in self.groups_:
            test_logits = _logits(X_test, group.best_weight).float().cpu()
            train_logits = _logits(self._data["X"], group.best_weight).float().cpu()
            scores = head_scores(test_logits, test_labels, train_logits, train_labels)
            for i, head in enumerate(group.heads):
                row = {
                    "head": head.name, "loss": head.loss, "lr": head.lr,
                    "batch_size": head.batch_size, "seed": head.seed,
                    "best_epoch": int(self.best_epoch_[offset + i]),
                    "val_map": float(self.best_val_map_[offset + i]),
                }  # fmt: skip
                per_class = scores[i].pop("test_per_class_ap")
                row.update(scores[i])
                loss = self.losses_[head.loss]
                state = group.head_state(i)
                estimates = loss.label_estimates(state)
                if estimates is not None:
                    row["estimator_recovery_map"] = recovery_map(estimates.cpu(), train_labels)
                exported = loss.export_state(state)
                if exported:
                    self.exported_state_[head.name] = exported
                self.results_.append(row)
                self.per_class_ap_.append(per_class)
            offset += len(group.heads)


def _split_record(group: _Group, record: dict) -> list[dict]:
    """One history row per head of a group's epoch record."""
    rows = []
    estimates = record.get("estimator_histogram", {})
    for i, head in enumerate(group.heads):
        row = {
            "head": head.name,
            "epoch": record["epoch"],
            "val_map": float(record["val_map"][i]),
            "train_loss": float(record["train_loss"][i]),
        }
        if "histogram" in record:
            row["hidden_positive_histogram"] = record["histogram"][i].tolist()
        if i in estimates:
            row["estimator_histogram"] = estimates[i].tolist()
        rows.append(row)
    return rows


def _augment(X: torch.Tensor) -> torch.Tensor:
    """Features with a column of ones appended (the bias's input)."""
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def _logits(X: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[H, N, L] logits of stacked heads ``weight [H, L, D + 1]`` on augmented ``X``."""
    n_heads, num_classes, _ = weight.shape
    flat = X @ weight.reshape(n_heads * num_classes, -1).t()
    return flat.view(X.shape[0], n_heads, num_classes).permute(1, 0, 2)


def _tensor(value, dtype, device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    return tensor.to(device=device, dtype=dtype)
