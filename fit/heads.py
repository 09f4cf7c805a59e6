"""What the linear engine's heads are and see: a head's configuration and name, the batches
of an epoch (a function of the seed and the epoch alone), a seed's initial head, and the
two layouts of stacked weights (heads ``[H, L, D + 1]``, blocks ``[blocks, D + 1, C]``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from spl.data.runtime import generator


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
    """Batches of one epoch: shuffled, the last partial batch dropped (docs/protocol.md section 5).

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


def as_tensor(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An array or tensor as a tensor of ``dtype`` on ``device``."""
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    return tensor.to(device=device, dtype=dtype)


def augment(X: torch.Tensor) -> torch.Tensor:
    """Features with a column of ones appended (the bias's input)."""
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def stacked_logits(X: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[H, N, L] logits of stacked heads ``weight [H, L, D + 1]`` on augmented ``X``."""
    n_heads, num_classes, _ = weight.shape
    flat = X @ weight.reshape(n_heads * num_classes, -1).t()
    return flat.view(X.shape[0], n_heads, num_classes).permute(1, 0, 2)


def to_blocks(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """Head layout ``[H, L, D + 1]`` to block layout ``[blocks, D + 1, H / blocks * L]``."""
    n_heads, num_classes, width = weight.shape
    per = n_heads // blocks
    grouped = weight.reshape(blocks, per, num_classes, width).permute(0, 3, 1, 2)
    return grouped.reshape(blocks, width, per * num_classes).contiguous()


def to_heads(weight_t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Block layout back to the head layout ``[H, L, D + 1]``, always as a new tensor (a
    reshape would alias the live weights when there is a single block)."""
    blocks, width, columns = weight_t.shape
    per = columns // num_classes
    out = weight_t.new_empty(blocks * per, num_classes, width)
    out.view(blocks, per, num_classes, width).copy_(
        weight_t.view(blocks, width, per, num_classes).permute(0, 2, 3, 1)
    )
    return out
