"""The stacked linear-head engine: every loss x lr x batch size x seed in one pass.

Heads that share a batch size and a seed form a *group*: they see the same batches, so one
matrix product computes all their logits, one product all their weight gradients, and one
fused Adam call per learning rate updates them (on a CPU, one compiled pass forms the
gradient inside the update: fused.py). Features sit on the device once. Val mAP
is computed for every head after every epoch; each head keeps its best-epoch weights; the
test split is scored once, with those weights (paper.md section 5).

The estimator interface follows scikit-learn: ``StackedHeads(...)`` stores options,
``fit(...)`` trains and returns ``self``, learned state ends in ``_``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from spl.evaluate.metrics import mean_average_precision, probability_histogram
from spl.fit import fused
from spl.fit.losses import (
    LOG_EPSILON,
    LOSSES,
    LossBatch,
    LossOptions,
    batch_loss,
    estimator_init,
    log_neg,
    log_pos,
)

PAPER_LRS = (1e-2, 1e-3, 1e-4, 1e-5)
PAPER_BATCH_SIZES = (8, 16)
PAPER_LINEAR_EPOCHS = 25
HISTOGRAM_BINS = 20
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class HeadConfig:
    loss: str
    lr: float
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """A head's name says what it is, e.g. ``an_ls_lr0.0001_bs8_s0``."""
        return f"{self.loss}_lr{self.lr:g}_bs{self.batch_size}_s{self.seed}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a function of (seed, epoch) alone, so a resumed
    run and a head trained alone see exactly the batches of an uninterrupted sweep."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch, 0))
    return torch.randperm(num_rows, generator=generator)


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


def pseudo_negative_mask(shape: tuple[int, int], fraction: float, seed: int, epoch: int):
    """The pseudo-negative sampling mask of one epoch (kept entries = 1)."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch, 1))
    return (torch.rand(shape, generator=generator) < fraction).float()


def estimator_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, 0, 2))


def initial_head(
    num_features: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (weight [L, D], bias [L]) of every head of a seed: nn.Linear's default
    distribution U(-1/sqrt(D), 1/sqrt(D)) (the reference's head), drawn once per seed so
    that heads differ only by what the sweep varies."""
    generator = torch.Generator().manual_seed(_mix(seed, 0, 3))
    bound = 1.0 / math.sqrt(num_features)
    weight = torch.rand(num_classes, num_features, generator=generator, dtype=torch.float64) * 2 - 1
    bias = torch.rand(num_classes, generator=generator, dtype=torch.float64) * 2 - 1
    return weight * bound, bias * bound


def _mix(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63 - 1)


class _Group:
    """The heads of one (batch size, seed): stacked weights, their Adam, ROLE estimators.

    Weights live in ``weight_t``, ``[n_lrs, D + 1, heads_per_lr * L]``: each head's bias is
    its last row, matched by a column of ones appended to the features, so one batched
    product gives all logits and one gives the gradient of weights and biases together.
    This layout makes the products with a skinny batch (B = 8 or 16) plain GEMMs (about
    twice as fast on a CPU as the transposed form), and one lr's heads one contiguous block
    for its fused Adam call. ``weight`` is the same in the head layout ``[H, L, D + 1]``.
    """

    def __init__(
        self,
        heads,
        num_features,
        num_classes,
        observed,
        options,
        device,
        dtype,
        graphs=False,
        compiled=True,
    ):
        # Heads sorted by lr: each lr's heads form one contiguous block of the stacked
        # weights, so one fused Adam call (one param group) updates the block in place.
        self.heads = sorted(heads, key=lambda h: (-h.lr, h.loss))
        self.batch_size, self.seed = heads[0].batch_size, heads[0].seed
        n_heads = len(self.heads)
        self.num_classes = num_classes
        self.blocks = len({h.lr for h in self.heads})  # the grid gives each lr every loss
        weight, bias = initial_head(num_features, num_classes, self.seed)
        initial = torch.cat([weight, bias[:, None]], dim=1).to(dtype)
        heads_layout = initial.expand(n_heads, *initial.shape)
        self.weight_t = _to_blocks(heads_layout, self.blocks).to(device)
        self.weight_grad_t = torch.zeros_like(self.weight_t)
        specs = [LOSSES[h.loss] for h in self.heads]
        self.weighted_types = sorted(
            {h.loss for h, s in zip(self.heads, specs, strict=True) if s.weights}
        )
        weighted = [i for i, s in enumerate(specs) if s.weights is not None]
        self.weighted_index = torch.tensor(weighted, device=device, dtype=torch.long)
        self.weighted_type = torch.tensor(
            [self.weighted_types.index(self.heads[i].loss) for i in weighted],
            device=device,
            dtype=torch.long,
        )
        self.role = [i for i, h in enumerate(self.heads) if h.loss == "role"]
        self.role_index = torch.tensor(self.role, device=device, dtype=torch.long)
        custom = [i for i, s in enumerate(specs) if s.custom is not None and s.key != "role"]
        self.custom = {
            key: torch.tensor([i for i in custom if self.heads[i].loss == key], device=device)
            for key in sorted({self.heads[i].loss for i in custom})
        }
        reg = [s.expected_positive_weight or (0.5 if s.key == "role" else 0.0) for s in specs]
        self.reg_weight = torch.tensor(reg, device=device, dtype=dtype)
        if self.role:
            theta = estimator_init(observed.cpu(), estimator_generator(self.seed)).to(dtype)
            self.theta = theta.expand(len(self.role), *theta.shape).contiguous().to(device)
            self.theta_grad = torch.zeros_like(self.theta)
        else:
            self.theta = self.theta_grad = None
        # CUDA graphs replay optimizer.step(): Adam must keep its step count on the device.
        self.capturable = bool(graphs) and torch.device(device).type == "cuda"
        self.optimizer = self._make_optimizer(options, capturable=self.capturable)
        # On a CPU, one compiled pass forms the weight gradient and applies Adam (fused.py).
        self.compiled = (
            compiled and not self.capturable and bool(self.optimizer.param_groups[0].get("fused"))
        )
        if self.compiled:
            self.exp_avg_t = torch.zeros_like(self.weight_t)
            self.exp_avg_sq_t = torch.zeros_like(self.weight_t)
            self._bind_moments()
        self.best_weight = self.weight
        self.best_theta = self.theta.clone() if self.theta is not None else None
        self.best_val = torch.full((n_heads,), -1.0, dtype=torch.float64)
        self.best_epoch = torch.zeros(n_heads, dtype=torch.long)
        self.epochs_done = 0
        self.graph = None

    def _make_optimizer(self, options: LossOptions, capturable: bool) -> torch.optim.Optimizer:
        groups = []
        per_block = len(self.heads) // self.blocks
        for block in range(self.blocks):
            param = _view_param(self.weight_t[block], self.weight_grad_t[block])
            groups.append({"params": [param], "lr": self.heads[block * per_block].lr})
        for slot, head_index in enumerate(self.role):
            # ROLE's estimator learns at lr x multiplier (10 in the paper). Adam on theta is
            # dense: once a row has a gradient its moments keep moving it on every step,
            # not only when the row is in the batch (parity with the reference).
            lr = self.heads[head_index].lr * options.estimator_lr_multiplier
            param = _view_param(self.theta[slot], self.theta_grad[slot])
            groups.append({"params": [param], "lr": lr})
        return _adam(groups, self.weight_t.device, capturable)

    def _bind_moments(self) -> None:
        """Adam's state created up front, with the weight blocks' moments as views of two
        stacked tensors that the compiled update reads and writes in one pass; torch.optim
        (checkpoints, the eager fallback) sees the very same state."""
        optimizer = self.optimizer
        for block, group in enumerate(optimizer.param_groups):
            param = group["params"][0]
            state = optimizer.state[param]
            if not state:  # what torch.optim.Adam(fused=True) creates on its first step
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            if block < self.blocks:
                for key, stacked in (
                    ("exp_avg", self.exp_avg_t),
                    ("exp_avg_sq", self.exp_avg_sq_t),
                ):
                    stacked[block].copy_(state[key])
                    state[key] = stacked[block]

    def update(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Adam step of every head from the batch ``x [B, D + 1]`` and the logit gradients
        ``grad_out [blocks, B, per * L]``, the estimators' gradients already in place."""
        if self.compiled:
            groups = self.optimizer.param_groups[: self.blocks]
            states = [self.optimizer.state[g["params"][0]] for g in groups]
            step = int(states[0]["step"].item()) + 1
            (beta1, beta2), eps = groups[0]["betas"], groups[0]["eps"]
            # In float64 first, as torch's fused kernel computes them.
            step_size = [g["lr"] / (1 - beta1**step) for g in groups]
            dtype = self.weight_t.dtype
            done = fused.attempt(
                fused.adam_update, x, grad_out, self.weight_t, self.exp_avg_t, self.exp_avg_sq_t,
                torch.tensor(step_size, dtype=dtype).view(-1, 1, 1),
                torch.tensor(math.sqrt(1 - beta2**step), dtype=dtype), beta1, beta2, eps,
            )  # fmt: skip
            if done:
                torch._foreach_add_([s["step"] for s in states], 1)
                self.adam_step(first=self.blocks)  # ROLE's estimators
                return
            self.compiled = False
        torch.matmul(x.t(), grad_out, out=self.weight_grad_t)
        self.adam_step()

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

    def state_dict(self) -> dict:
        """A copy on the CPU (a snapshot: training on does not change it)."""
        optimizer = self.optimizer.state_dict()
        return {
            "weight": _copy(self.weight),
            "theta": _copy(self.theta),
            "adam": {
                "state": {
                    i: {k: _copy(v) for k, v in s.items()} for i, s in optimizer["state"].items()
                },
                "param_groups": optimizer["param_groups"],
            },
            "best_weight": _copy(self.best_weight),
            "best_theta": _copy(self.best_theta),
            "best_val": _copy(self.best_val),
            "best_epoch": _copy(self.best_epoch),
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weight_t.copy_(_to_blocks(state["weight"].to(self.weight_t), self.blocks))
        if self.theta is not None:
            self.theta.copy_(state["theta"])
            self.best_theta.copy_(state["best_theta"])
        self.optimizer.load_state_dict(state["adam"])  # casts moments to the device
        for group in self.optimizer.param_groups:  # a checkpoint may come from the CPU
            group["capturable"] = self.capturable
        if self.compiled:
            self._bind_moments()
        self.best_weight.copy_(state["best_weight"])
        self.best_val.copy_(state["best_val"])
        self.best_epoch.copy_(state["best_epoch"])
        self.epochs_done = int(state["epochs_done"])


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


def _view_param(view: torch.Tensor, grad_view: torch.Tensor) -> torch.Tensor:
    """A leaf sharing storage with a block of the stacked tensor, with its gradient a view
    of the stacked gradient: Adam's in-place update lands in the stacked weights."""
    param = view.detach().requires_grad_(True)
    param.grad = grad_view
    return param


def _adam(groups: list[dict], device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    options = {"betas": ADAM_BETAS, "eps": ADAM_EPS, "weight_decay": 0.0}
    try:
        return torch.optim.Adam(groups, fused=True, capturable=capturable, **options)
    except (RuntimeError, TypeError):  # fused kernel missing for this device or dtype
        return torch.optim.Adam(groups, foreach=True, **options)


def batch_gradients(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
    weighted_index: torch.Tensor,
    observed_pos: torch.Tensor | None,
    theta: torch.Tensor | None,
    role_index: torch.Tensor,
    reg_weight: torch.Tensor,
    k: float,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, per-head losses and closed-form logit gradients of one batch for a group.

    For a weighted loss M = A l+(p) + B l-(p), dM/dx = -A s/(p + eps) + B s/(1 - p + eps)
    with s = p(1 - p); R_k adds 2 (c - k) / (L^2 B) * s per entry (c: mean positive count).
    ``tables`` holds the batch's A and B for the weighted heads, ``theta`` ROLE's estimator
    logits on the batch rows ``[R, B, L]``. Returns logits and grad as ``[B, H, L]`` and
    the estimators' gradient ``[R, B, L]`` (None without ROLE). A pure function of tensors,
    so that on a CPU it runs compiled as one or two loops instead of ~80 small kernels.
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
    estimate = None
    if theta is not None:
        estimate = torch.sigmoid(theta).transpose(0, 1)  # [B, R, L]
        # ROLE's classifier side is weighted: targets are the (stopped) estimates.
        pos_w.index_copy_(1, role_index, 0.5 * (observed_pos[:, None] + estimate))
        neg_w.index_copy_(1, role_index, 0.5 * (1 - estimate))
    per_head = (pos_w * log_pos(p) + neg_w * log_neg(p)).sum(dim=(0, 2)) * scale
    s = p * (1 - p)
    grad = (neg_w * (s / (1 - p + LOG_EPSILON)) - pos_w * (s / (p + LOG_EPSILON))) * scale
    count = p.sum(dim=2).mean(dim=0)  # [H] mean predicted positives per image
    per_head = per_head + reg_weight * (count - k) ** 2 / num_classes**2
    grad = grad + (reg_weight * 2 * (count - k) / (num_classes**2 * batch))[:, None] * s
    e_grad = None
    if estimate is not None:
        p_role = p.index_select(1, role_index).detach()  # [B, R, L]
        e_s = estimate * (1 - estimate)
        e_pos = 0.5 * (observed_pos[:, None] + p_role)
        e_neg = 0.5 * (1 - p_role)
        e_count = estimate.sum(dim=2).mean(dim=0)  # [R]
        e_loss = (e_pos * log_pos(estimate) + e_neg * log_neg(estimate)).sum(dim=(0, 2))
        e_loss = e_loss * scale + 0.5 * (e_count - k) ** 2 / num_classes**2
        per_head = per_head.index_add(0, role_index, e_loss)
        e_grad = (e_neg * (e_s / (1 - estimate + LOG_EPSILON))) - e_pos * (
            e_s / (estimate + LOG_EPSILON)
        )
        e_grad = (
            e_grad * scale + (2 * 0.5 * (e_count - k) / (num_classes**2 * batch))[:, None] * e_s
        )
        e_grad = e_grad.transpose(0, 1)
    return logits, per_head, grad, e_grad


class StackedHeads:
    """Train many linear heads on cached features at once (one per loss x lr x bs x seed).

    >>> model = StackedHeads(losses=["an", "role"], lrs=[1e-3], batch_sizes=[8]).fit(
    ...     X, observed, labels=Y, X_val=Xv, Y_val=Yv)
    >>> model.best_val_map_, model.decision_function(X_test)
    """

    def __init__(
        self,
        losses: Sequence[str] = ("an",),
        lrs: Sequence[float] = PAPER_LRS,
        batch_sizes: Sequence[int] = PAPER_BATCH_SIZES,
        seeds: Sequence[int] = (0,),
        epochs: int = PAPER_LINEAR_EPOCHS,
        options: LossOptions | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        histogram_bins: int = HISTOGRAM_BINS,
        eval_chunk_heads: int = 16,
        cuda_graphs: bool = True,
    ) -> None:
        self.losses = list(losses)
        self.lrs = list(lrs)
        self.batch_sizes = list(batch_sizes)
        self.seeds = list(seeds)
        self.epochs = epochs
        self.options = options or LossOptions()
        self.device = device
        self.dtype = dtype
        self.histogram_bins = histogram_bins
        self.eval_chunk_heads = eval_chunk_heads
        self.cuda_graphs = cuda_graphs

    # ------------------------------------------------------------------ public API

    def head_configs(self) -> list[HeadConfig]:
        return [
            HeadConfig(loss, lr, bs, seed)
            for seed in self.seeds
            for bs in self.batch_sizes
            for lr in self.lrs
            for loss in self.losses
        ]

    def fit(
        self,
        X: np.ndarray | torch.Tensor,
        observed: np.ndarray | torch.Tensor,
        *,
        labels: np.ndarray | torch.Tensor,
        X_val: np.ndarray | torch.Tensor,
        Y_val: np.ndarray | torch.Tensor,
        observed_iu: np.ndarray | torch.Tensor | None = None,
        state: dict | None = None,
        on_epoch: Callable[[StackedHeads, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> StackedHeads:
        """Train every head; ``state`` (from :meth:`state_dict`) resumes an interrupted sweep.

        ``labels`` are the full training labels: read only by the full-label baselines and
        IUN's true negatives, and for the recovery analysis. ``observed_iu`` is IU's
        observed set (1 positive + 1 negative per image).
        """
        for key in self.losses:
            if key not in LOSSES:
                raise KeyError(f"unknown loss {key!r}; available: {', '.join(LOSSES)}")
        device = resolve_device(self.device)
        self.device_ = device
        dtype = self.dtype
        X = _augment(_tensor(X, dtype, device))
        X_val = _augment(_tensor(X_val, dtype, device))
        observed = _tensor(observed, dtype, device)
        labels = _tensor(labels, dtype, device)
        Y_val = _tensor(Y_val, dtype, device)
        observed_iu = None if observed_iu is None else _tensor(observed_iu, dtype, device)
        num_rows, num_features = X.shape[0], X.shape[1] - 1
        num_classes = observed.shape[1]
        if "iu" in self.losses and observed_iu is None:
            raise ValueError("iu needs observed_iu: an observed set with 1 positive + 1 negative")
        small = [b for b in self.batch_sizes if b > num_rows]
        if small:
            raise ValueError(
                f"the training split has {num_rows} rows, fewer than batch size {small[0]}"
            )
        self._data = {"X": X, "observed": observed, "labels": labels, "observed_iu": observed_iu}
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
                    heads, num_features, num_classes, observed, self.options, device, dtype,
                    graphs=self.cuda_graphs, compiled=fused.enabled(device, work),
                )  # fmt: skip
                self.groups_.append(group)
                self.heads_.extend(group.heads)
        self.history_: list[dict] = []
        if state is not None:
            self._load_state(state)
        self.train_seconds_ = 0.0
        for group in self.groups_:
            while group.epochs_done < self.epochs:
                start = time.perf_counter()
                record = self._train_epoch(group, on_step)
                record.update(self._validate(group, X, X_val, Y_val))
                record["seconds"] = time.perf_counter() - start
                self.train_seconds_ += record["seconds"]
                self.history_.extend(_split_record(group, record))
                if on_epoch is not None:
                    on_epoch(self, {"group": group, **record})
            group.graph = None
        self._data = None
        self._collect()
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

    def estimator_probabilities(self, head: HeadConfig, *, best: bool = True) -> torch.Tensor:
        """ROLE: the label estimates sigmoid(theta) ``[N_train, L]`` of one head."""
        for group in self.groups_:
            if head in group.heads:
                slot = group.role.index(group.heads.index(head))
                theta = group.best_theta if best else group.theta
                return torch.sigmoid(theta[slot].float()).cpu()
        raise KeyError(f"no head {head.name}")

    def state_dict(self) -> dict:
        """Everything needed to resume after the last finished epoch of each group."""
        return {
            "heads": [asdict(h) for g in self.groups_ for h in g.heads],
            "groups": [g.state_dict() for g in self.groups_],
            "history": [dict(row) for row in self.history_],
        }

    # ------------------------------------------------------------------ internals

    def _load_state(self, state: dict) -> None:
        saved = [HeadConfig(**h) for h in state["heads"]]
        if saved != [h for g in self.groups_ for h in g.heads]:
            raise ValueError("the saved sweep has other heads than this one")
        for group, group_state in zip(self.groups_, state["groups"], strict=True):
            group.load_state_dict(group_state)
        self.history_ = list(state["history"])

    def _epoch_tables(self, group: _Group, epoch: int) -> None:
        """Per-row loss weights (A for l+, B for l-) of every weighted loss, for one epoch:
        ``[N, T, L]``; only pseudo-negative sampling changes them between epochs."""
        data = self._data
        observed, labels = data["observed"], data["labels"]
        pseudo = None
        if "pseudo_neg" in group.weighted_types:
            fraction = self.options.pseudo_negative_fraction
            pseudo = pseudo_negative_mask(tuple(observed.shape), fraction, group.seed, epoch)
            pseudo = pseudo.to(observed.device, observed.dtype)
        pos_tables, neg_tables = [], []
        for key in group.weighted_types:
            seen = data["observed_iu"] if key == "iu" else observed
            batch = LossBatch(labels=labels, observed=seen, pseudo_negatives=pseudo)
            pos, neg = LOSSES[key].weights(batch, self.options, observed.shape[1])
            pos_tables.append(pos)
            neg_tables.append(neg)
        tables = getattr(group, "tables", None)
        if pos_tables:
            pos, neg = torch.stack(pos_tables, 1), torch.stack(neg_tables, 1)
            if tables is None:
                group.tables = (pos, neg)
            else:  # in place: a captured CUDA graph reads these buffers
                tables[0].copy_(pos)
                tables[1].copy_(neg)
        else:
            group.tables = None

    def _train_epoch(self, group: _Group, on_step) -> dict:
        epoch = group.epochs_done + 1
        X = self._data["X"]
        self._epoch_tables(group, epoch)
        if getattr(group, "loss_sum", None) is None:
            group.loss_sum = torch.zeros(len(group.heads), dtype=torch.float64, device=X.device)
        group.loss_sum.zero_()  # in place: a captured CUDA graph accumulates into this buffer
        batches = epoch_batches(X.shape[0], group.batch_size, group.seed, epoch - 1, X.device)
        use_graph = self.cuda_graphs and X.device.type == "cuda" and not group.custom
        for step, rows in enumerate(batches):
            if use_graph and group.graph is None and step == 3:
                self._capture(group, rows)
            if group.graph is not None:
                group.rows.copy_(rows)
                group.graph.replay()
            else:
                self._step(group, rows)
            if on_step is not None:
                on_step(step)
        group.epochs_done = epoch
        loss = (group.loss_sum / max(len(batches), 1)).cpu()
        return {"epoch": epoch, "train_loss": loss}

    def _capture(self, group: _Group, rows: torch.Tensor) -> None:
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
                self._step(group, group.rows)
            group.graph = graph
        except RuntimeError as exc:  # pragma: no cover - depends on the CUDA build
            import warnings

            warnings.warn(f"CUDA graph capture failed ({exc}); training eagerly", stacklevel=2)
            group.graph = None

    def _step(self, group: _Group, rows: torch.Tensor) -> None:
        """One Adam step of every head in the group (gradients: :func:`batch_gradients`)."""
        data = self._data
        x = data["X"].index_select(0, rows)  # [B, D + 1], ones column last
        blocks, _, columns = group.weight_t.shape
        batch = x.shape[0]
        tables = observed_pos = theta = None
        if group.tables is not None:
            tables = tuple(
                t.index_select(0, rows).index_select(1, group.weighted_type) for t in group.tables
            )
        if group.role:
            observed_pos = (data["observed"].index_select(0, rows) == 1).to(x.dtype)
            theta = group.theta.index_select(1, rows)  # [R, B, L]
        args = (
            x, group.weight_t, tables, group.weighted_index, observed_pos, theta,
            group.role_index, group.reg_weight, float(self.options.expected_positives),
            group.num_classes,
        )  # fmt: skip
        if group.compiled:
            logits, per_head, grad, e_grad = fused.run(batch_gradients, *args)
        else:
            logits, per_head, grad, e_grad = batch_gradients(*args)
        for key, index in group.custom.items():
            grad.index_copy_(1, index, self._custom_grad(key, logits, index, rows, per_head))
        if group.role:
            group.theta_grad.index_copy_(1, rows, e_grad)
        grad_t = grad.reshape(batch, blocks, columns).transpose(0, 1)  # [blocks, B, per * L]
        group.update(x, grad_t)
        if group.role:
            group.theta_grad.index_fill_(1, rows, 0)  # the estimator's gradient lives on batch rows
        group.loss_sum += per_head.detach()

    def _custom_grad(self, key, logits, index, rows, per_head) -> torch.Tensor:
        """Heads of a loss without closed form (PR): autograd on their logits."""
        data = self._data
        sub = logits.index_select(1, index).transpose(0, 1).detach().requires_grad_(True)
        batch = LossBatch(
            data["labels"].index_select(0, rows), data["observed"].index_select(0, rows)
        )
        loss = batch_loss(key, sub, batch, self.options)
        loss.sum().backward()
        per_head.index_copy_(0, index, loss.detach())
        return sub.grad.transpose(0, 1)

    def _map(self, X, weight, Y) -> torch.Tensor:
        chunk = max(1, self.eval_chunk_heads)
        out = []
        for lo in range(0, weight.shape[0], chunk):
            logits = _logits(X, weight[lo : lo + chunk])
            out.append(mean_average_precision(logits, Y).double().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _validate(self, group: _Group, X, X_val, Y_val) -> dict:
        weight = group.weight  # the head layout, once per epoch
        val_map = self._map(X_val, weight, Y_val)
        improved = val_map > group.best_val  # ties keep the earlier epoch
        if improved.any():
            index = torch.nonzero(improved).flatten().to(group.weight_t.device)
            group.best_weight[index] = weight[index]
            group.best_val[improved] = val_map[improved]
            group.best_epoch[improved] = group.epochs_done
            if group.theta is not None:
                for slot, head_index in enumerate(group.role):
                    if improved[head_index]:
                        group.best_theta[slot] = group.theta[slot]
        record = {"val_map": val_map}
        if self.histogram_bins:
            record["histogram"] = self._hidden_positive_histogram(weight, X)
            if group.theta is not None:
                probs = torch.sigmoid(group.theta)
                record["estimator_histogram"] = probability_histogram(
                    probs, self.hidden_positive_mask_, self.histogram_bins
                )
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


def _split_record(group: _Group, record: dict) -> list[dict]:
    """One history row per head of a group's epoch record."""
    rows = []
    role_slot = {h: s for s, h in enumerate(group.role)}
    for i, head in enumerate(group.heads):
        row = {
            "head": head.name,
            "epoch": record["epoch"],
            "val_map": float(record["val_map"][i]),
            "train_loss": float(record["train_loss"][i]),
        }
        if "histogram" in record:
            row["hidden_positive_histogram"] = record["histogram"][i].tolist()
        if i in role_slot and "estimator_histogram" in record:
            row["estimator_histogram"] = record["estimator_histogram"][role_slot[i]].tolist()
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
