"""End-to-end fine-tuning pieces: the classifier, ROLE's label estimator, one training epoch
and evaluation gathered by row index (paper.md sections 3-5).

The orchestration (grid, selection, checkpoints, torchrun) lives in ``spl.finetune``; this
module takes a backbone module and data loaders and does the training arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spl.evaluate.metrics import mean_average_precision
from spl.fit.losses import LOSSES, LossBatch, LossOptions, batch_loss


class Classifier(nn.Module):
    """Backbone (images -> pooled features) followed by one linear layer with bias."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class LabelEstimator(nn.Module):
    """ROLE's estimator g: one trainable logit per training image and class."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.detach().clone().float())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.theta[index]


class Trainable(nn.Module):
    """Classifier and (for ROLE) estimator behind one forward, so that DDP wraps both and
    averages the estimator's gradients across processes like the network's."""

    def __init__(self, classifier: Classifier, estimator: LabelEstimator | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.estimator = estimator

    def forward(self, images: torch.Tensor, index: torch.Tensor):
        estimates = self.estimator(index) if self.estimator is not None else None
        return self.classifier(images), estimates


@dataclass
class TrainSettings:
    loss: str
    lr: float
    options: LossOptions
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    freeze_batchnorm: bool = False  # the paper trains BatchNorm (statistics updated)


def make_optimizer(
    model: nn.Module, estimator: LabelEstimator | None, lr: float, estimator_multiplier: float
) -> torch.optim.Adam:
    """One Adam over the network (lr) and, for ROLE, the estimator (lr x multiplier).

    The estimator's Adam is dense (the reference's): rows keep moving between their batches.
    """
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    if estimator is not None:
        groups.append({"params": [estimator.theta], "lr": lr * estimator_multiplier})
    return torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # pre-resized cache: [B, H, W, 3] uint8, normalised later
        images = images.permute(0, 3, 1, 2).float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_epoch(
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    settings: TrainSettings,
    device: torch.device,
    *,
    pseudo_negatives: torch.Tensor | None = None,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> dict:
    """One pass over the training loader; BatchNorm in train mode (paper.md section 3).

    ``prepare`` turns a device batch into normalised, augmented images when the loader
    yields raw cached pixels. ``on_step(step, wait_seconds, step_seconds)`` reports timing.
    """
    import time

    trainable.train()
    if settings.freeze_batchnorm:
        # Normalise with the pretrained statistics (affine weights still learn): for data
        # whose statistics are far from ImageNet's, where train-mode BatchNorm first undoes
        # what the pretrained (and LinearInit) head expects.
        for module in trainable.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total, steps = 0.0, 0
    wait_start = time.perf_counter()
    for step, (images, labels, observed, index) in enumerate(loader):
        waited = time.perf_counter() - wait_start
        start = time.perf_counter()
        images = to_device(images, device, settings.channels_last)
        if prepare is not None:
            images = prepare(images)
        labels = labels.to(device, non_blocking=True)
        observed = observed.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        with _autocast(device, settings.amp):
            logits, estimates = trainable(images, index)
        batch = LossBatch(
            labels=labels,
            observed=observed,
            estimates=estimates,
            pseudo_negatives=None if pseudo_negatives is None else pseudo_negatives[index],
        )
        loss = batch_loss(settings.loss, logits.float(), batch, settings.options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        if on_step is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_step(step, waited, time.perf_counter() - start)
        wait_start = time.perf_counter()
    return {"train_loss": total / max(steps, 1), "steps": steps}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, logits) of every item the loader yields, in eval mode, on the CPU."""
    model.eval()
    indices, outputs = [], []
    for images, _labels, _observed, index in loader:
        images = to_device(images, device, channels_last)
        if prepare is not None:
            images = prepare(images)
        with _autocast(device, amp):
            logits = model(images)
        indices.append(index.cpu())
        outputs.append(logits.float().cpu())
    if not outputs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(indices), torch.cat(outputs)


def gather_by_index(
    indices: torch.Tensor, logits: torch.Tensor, size: int, world: int = 1
) -> torch.Tensor:
    """Place predictions at their rows, across processes: padding a sampler added repeats
    rows, and writing by index makes a repeat land on its own row instead of counting twice.
    """
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (indices, logits))
        indices = torch.cat([p[0] for p in parts])
        logits = torch.cat([p[1] for p in parts])
    out = torch.full((size, logits.shape[-1]), float("nan"))
    out[indices] = logits
    missing = torch.isnan(out).any(dim=1)
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} rows were not scored")
    return out


def evaluate_map(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    return float(mean_average_precision(logits, torch.as_tensor(labels, dtype=torch.float32)))


def check_loss(key: str) -> None:
    if key not in LOSSES:
        from spl.data.common import SplError

        raise SplError(f"unknown loss {key!r}; available: {', '.join(LOSSES)}")
