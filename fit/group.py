"""A group of the linear engine: the heads of one (batch size, seed), which see the same
batches. It holds their stacked weights and Adam, each loss's per-row state (one
:class:`LossSlot` per loss), and each head's best epoch: its weights, its val mAP and its
exported loss state, kept whenever its val mAP improves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from spl.fit.adam import StackedAdam
from spl.fit.data import Features, HiddenPositives, LabelRows
from spl.fit.heads import HeadConfig, initial_head, to_blocks, to_heads
from spl.fit.losses import Loss


@dataclass
class TrainingData:
    """A sweep's data as its groups read it (:mod:`.data`): the training features (with the
    ones column, ``[N, D + 1]``), each observed set the losses train on and the full
    training labels (``[N, L]``), the val split (with ``val_known``, the verified entries of
    a partially labelled val split, or None), and the entries whose probabilities the
    paper's figure follows (unobserved positives). Each is resident on the device or read a
    block of rows at a time."""

    X: Features
    observed: dict[str, LabelRows]
    labels: LabelRows
    X_val: Features
    Y_val: LabelRows
    hidden_positives: HiddenPositives | None
    val_known: LabelRows | None = None

    @property
    def labels_resident(self) -> bool:
        return self.labels.resident and all(m.resident for m in self.observed.values())

    @property
    def streams(self) -> bool:
        """Whether a step reads something that is not on the device (its batch is then read
        ahead and staged: :class:`StagedBatch`)."""
        return not self.X.resident or not self.labels_resident

    def read_batch(self, rows: np.ndarray, with_labels: bool) -> dict:
        """The host blocks a step needs of ``rows`` that are not resident: ``x`` and, with
        labels read per batch, each observed set and (``with_labels``) the full labels."""
        out: dict = {}
        if not self.X.resident:
            out["x"] = self.X.read(rows)
        if not self.labels_resident:
            out["observed"] = {kind: m.read(rows) for kind, m in self.observed.items()}
            if with_labels:
                out["labels"] = self.labels.read(rows)
        return out


@dataclass
class StagedBatch:
    """A step's batch read ahead and moved to the device (features, observed sets, labels,
    the label-only weights of the batch); None fields are read from the resident data."""

    x: torch.Tensor | None = None
    observed: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    tables: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class LossSlot:
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

    def per_head(self, name: str) -> bool:
        """Whether a state tensor has one entry per head of the slot (leading dimension)."""
        tensor = self.state[name]
        return (
            name in self.loss.trainable
            or name in self.loss.snapshot
            or (tensor.dim() > 2 and tensor.shape[0] == len(self.positions))
        )


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


class HeadGroup:
    """The heads of one (batch size, seed): stacked weights, their Adam, the losses' state.

    Weights live in ``weight_t``, ``[n_lrs, D + 1, heads_per_lr * L]``: each head's bias is
    its last row, matched by a column of ones appended to the features, so one batched
    product gives all logits and one gives the gradient of weights and biases together.
    This layout makes the products with a skinny batch (B = 8 or 16) plain GEMMs (about
    twice as fast on a CPU as the transposed form), and one lr's heads one contiguous block
    for its fused Adam call. ``weight`` is the same in the head layout ``[H, L, D + 1]``.
    ``data`` is what the group trains on (released once the sweep is done), ``epochs``
    how many epochs it trains.
    """

    def __init__(
        self,
        heads: list[HeadConfig],
        losses: Mapping[str, Loss],
        data: TrainingData,
        epochs: int,
        *,
        dtype: torch.dtype,
        graphs: bool = False,
        compiled: bool = True,
        update: str = "auto",
    ):
        # Heads sorted by lr: each lr's heads form one contiguous block of the stacked
        # weights, so one fused Adam call (one param group) updates the block in place.
        self.heads = sorted(heads, key=lambda h: (-h.lr, h.loss))
        self.batch_size, self.seed = heads[0].batch_size, heads[0].seed
        self.data, self.epochs = data, epochs
        device = data.X.device
        self.num_classes = next(iter(data.observed.values())).shape[1]
        self.blocks = len({h.lr for h in self.heads})  # the grid gives each lr every loss
        weight, bias = initial_head(data.X.shape[1] - 1, self.num_classes, self.seed)
        initial = torch.cat([weight, bias[:, None]], dim=1).to(dtype)
        heads_layout = initial.expand(len(self.heads), *initial.shape)
        self.weight_t = to_blocks(heads_layout, self.blocks).to(device)
        self.weight_grad_t = torch.zeros_like(self.weight_t)
        self.slots = self._make_slots(losses, device)
        self._sort_routes(device)
        reg = [float(losses[h.loss].regulariser_weight) for h in self.heads]
        self.reg_weight = torch.tensor(reg, device=device, dtype=dtype)
        self.reg_target = torch.tensor(
            [expected_positives(losses[h.loss]) for h in self.heads], device=device, dtype=dtype
        )
        # CUDA graphs replay optimizer.step(): Adam must keep its step count on the device.
        self.capturable = bool(graphs) and torch.device(device).type == "cuda"
        self.adam = StackedAdam(self._adam_stacks(), capturable=self.capturable)
        # On a CPU the update runs compiled too (fused.py), on the path fastest here: the
        # gradient formed inside the Adam pass, or a GEMM then one compiled Adam pass.
        self.compiled = compiled and not self.capturable and self.adam.fused
        if self.compiled:
            self.compiled = self.adam.compile_update(update, self.batch_size)
        self.best_weight = self.weight
        self.best_val = torch.full((len(self.heads),), -1.0, dtype=torch.float64)
        self.best_epoch = torch.zeros(len(self.heads), dtype=torch.long)
        # Each head's exported loss state (Loss.export_state), on the CPU, as it was at the
        # head's best epoch so far: heads.pt hands it to fine-tuning (LinearInit).
        self.best_exported: dict[int, dict[str, torch.Tensor]] = {}
        self.epochs_done = 0
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.staged: StagedBatch | None = None  # the batch read ahead, when data.streams
        self.loss_sum: torch.Tensor | None = None
        self.graph = None

    def _make_slots(self, losses: Mapping[str, Loss], device) -> dict[str, LossSlot]:
        """One slot per loss: its heads' positions and its initial state (with the
        gradients of its trainable tensors and the snapshot it keeps at best epochs)."""
        slots = {}
        for key in dict.fromkeys(h.loss for h in self.heads):
            loss = losses[key]
            positions = [i for i, h in enumerate(self.heads) if h.loss == key]
            state = {}
            if loss.overrides("init_state"):  # (a dense [N, L] copy for the call alone)
                observed = self.data.observed[loss.trains_on].dense()
                state = loss.init_state(observed, heads=len(positions), seed=self.seed)
            index = torch.tensor(positions, device=device, dtype=torch.long)
            slot = slots[key] = LossSlot(loss, positions, index, state)
            for name in loss.trainable:
                slot.grads[name] = torch.zeros_like(state[name])
            slot.best = {name: state[name].clone() for name in loss.snapshot}
        return slots

    def _sort_routes(self, device) -> None:
        """The slots by gradient route, with what each route reads every step."""
        slots = self.slots.values()
        self.weighted_types = sorted(k for k, s in self.slots.items() if s.route == "weights")
        weighted = [i for i, h in enumerate(self.heads) if h.loss in self.weighted_types]
        self.weighted_index = torch.tensor(weighted, device=device, dtype=torch.long)
        self.weighted_type = torch.tensor(
            [self.weighted_types.index(self.heads[i].loss) for i in weighted],
            device=device,
            dtype=torch.long,
        )
        self.fused_slots = [s for s in slots if s.route == "fused"]
        # What each fused loss needs per step, looked up once: (its pure step function,
        # its head positions, its observed set, its trainable state tensors, k).
        self.fused_parts = [
            (
                type(s.loss).fused_step, s.index, s.loss.trains_on,
                tuple(s.state[name] for name in s.loss.trainable), expected_positives(s.loss),
            )
            for s in self.fused_slots
        ]  # fmt: skip
        self.kernel_slots = [s for s in slots if s.route == "kernel"]
        self.custom_slots = [s for s in slots if s.route in ("closed_form", "autograd")]
        self.hooked_slots = [s for s in slots if s.loss.overrides("after_step")]
        # A CUDA graph replays the kernels it captured with the values they had then. Only
        # the weighted tables and the fused losses' state are device buffers updated in
        # place; a kernel loss's arguments are built in Python every step (this epoch's
        # schedule: GR's k and v, SPLC's switch, the LL rejection count, APL's targets) and
        # custom or hooked losses run Python between kernels, so their groups run unrecorded.
        self.graphable = not (self.kernel_slots or self.custom_slots or self.hooked_slots)
        # A streamed batch is read and staged in Python before each step (left for a GPU
        # check: recorded into static buffers), so such a group runs unrecorded too.
        self.graphable = self.graphable and not self.data.streams

    def _adam_stacks(self) -> list:
        """What Adam updates, stack by stack: the weights (one lr per block) and each loss's
        trainable state (one lr per head); one param group per leading index."""
        per_block = len(self.heads) // self.blocks
        block_lrs = [self.heads[b * per_block].lr for b in range(self.blocks)]
        stacks = [(self.weight_t, self.weight_grad_t, block_lrs)]
        for slot in self.slots.values():
            for name in slot.loss.trainable:
                multiplier = slot.loss.lr_multiplier(name)
                lrs = [self.heads[position].lr * multiplier for position in slot.positions]
                stacks.append((slot.state[name], slot.grads[name], lrs))
        return stacks

    # ------------------------------------------------------------------ training

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.adam.optimizer

    @property
    def update_mode(self) -> str:
        """The Adam update path: ``eager`` or a compiled one (fused.UPDATE_MODES)."""
        return self.adam.mode

    def update(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Adam step of every head from the batch ``x [B, D + 1]`` and the logit gradients
        ``grad_out [blocks, B, per * L]``, the state's gradients already in place."""
        if not self.adam.update(x, grad_out):
            self.compiled = False  # compilation failed (warned once by fused.py): eager

    # What a step reads of its batch: the staged batch when the data streams, else the rows
    # of the resident data (index_select, as the engine always read them).

    @property
    def reads_labels(self) -> bool:
        """Whether a loss of the group reads the full labels (staged with each batch)."""
        return any(slot.loss.reads_labels for slot in self.slots.values())

    def batch_features(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, D + 1]``, the ones column last."""
        if self.staged is not None and self.staged.x is not None:
            return self.staged.x
        return self.data.X.take(rows)

    def batch_observed(self, kind: str, rows: torch.Tensor) -> torch.Tensor:
        if self.staged is not None and self.staged.observed is not None:
            return self.staged.observed[kind]
        return self.data.observed[kind].take(rows)

    def batch_labels(self, rows: torch.Tensor) -> torch.Tensor | None:
        if self.staged is not None and self.staged.observed is not None:
            return self.staged.labels
        return self.data.labels.take(rows)

    @property
    def weight(self) -> torch.Tensor:
        """The weights in the head layout ``[H, L, D + 1]`` (a copy)."""
        return to_heads(self.weight_t, self.num_classes)

    # ------------------------------------------------------------------ best epochs

    def keep_best(self, weight: torch.Tensor, val_map: torch.Tensor) -> None:
        """After an epoch: each head whose val mAP improved keeps ``weight`` (this epoch's,
        head layout), its mAP, the epoch, its loss's snapshot tensors and its exported
        state. Ties keep the earlier epoch."""
        improved = val_map > self.best_val
        if not improved.any():
            return
        index = torch.nonzero(improved).flatten().to(self.weight_t.device)
        self.best_weight[index] = weight[index]
        self.best_val[improved] = val_map[improved]
        self.best_epoch[improved] = self.epochs_done
        for slot in self.slots.values():
            for k, position in enumerate(slot.positions):
                if improved[position]:
                    for name, best in slot.best.items():
                        best[k] = slot.state[name][k]
                    self._keep_export(position)

    def _keep_export(self, position: int) -> None:
        slot = self.slots[self.heads[position].loss]
        exported = slot.loss.export_state(self.head_state(position, best=False))
        if exported:  # a copy: an export may be a view of the live state
            self.best_exported[position] = _copy_dict(exported)

    def exported_state(self, position: int) -> dict[str, torch.Tensor]:
        """The head's exported loss state at its best epoch (empty for a loss that exports
        none). A head without a kept one (no epoch trained, or resumed from a checkpoint
        written before they were kept) exports its state as it is."""
        if position in self.best_exported:
            return self.best_exported[position]
        loss = self.slots[self.heads[position].loss].loss
        return _copy_dict(loss.export_state(self.head_state(position)))

    def head_state(self, position: int, *, best: bool = True) -> dict[str, torch.Tensor]:
        """The state of the head at ``position``: its slice of its loss's state (the best
        epoch's snapshot for the tensors the loss keeps one of)."""
        slot = self.slots[self.heads[position].loss]
        k = slot.positions.index(position)
        out = {}
        for name, tensor in slot.state.items():
            source = slot.best[name] if best and name in slot.best else tensor
            out[name] = source[k] if slot.per_head(name) else source
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """A copy on the CPU (a snapshot: training on does not change it)."""
        return {
            "weight": _copy(self.weight),
            "loss_state": {k: _copy_dict(s.state) for k, s in self.slots.items()},
            "best_loss_state": {k: _copy_dict(s.best) for k, s in self.slots.items()},
            "best_exported": {p: dict(e) for p, e in self.best_exported.items()},
            "adam": self.adam.state_dict(),
            "best_weight": _copy(self.best_weight),
            "best_val": _copy(self.best_val),
            "best_epoch": _copy(self.best_epoch),
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weight_t.copy_(to_blocks(state["weight"].to(self.weight_t), self.blocks))
        for key, slot in self.slots.items():
            for name, tensor in state["loss_state"][key].items():
                slot.state[name].copy_(tensor)
            for name, tensor in state["best_loss_state"][key].items():
                slot.best[name].copy_(tensor)
        self.best_exported = {
            int(p): _copy_dict(e) for p, e in state.get("best_exported", {}).items()
        }
        self.adam.load_state_dict(state["adam"])
        self.best_weight.copy_(state["best_weight"])
        self.best_val.copy_(state["best_val"])
        self.best_epoch.copy_(state["best_epoch"])
        self.epochs_done = int(state["epochs_done"])


def expected_positives(loss: Loss) -> float:
    """k of a loss with R_k (its option, else the dataset's); 0 for the others."""
    if not loss.regulariser_weight:
        return float(loss.context.expected_positives or 0.0)
    return loss.expected_positives()


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)


def _copy_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: _copy(tensor) for name, tensor in tensors.items()}
