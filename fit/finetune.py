"""End-to-end fine-tuning of one network with one loss at one (lr, batch size, seed)
(docs/protocol.md sections 3-5), shaped like the linear engine: ``FineTuner(...)`` stores options,
``fit(...)`` trains and returns ``self``, learned state ends in ``_``.

The grid, the run directory and the files belong to ``spl.finetune``; this module computes:
it builds the optimiser, trains epoch by epoch (BatchNorm in train mode, the epoch's
augmentation seeded by (seed, epoch)), keeps the best-val weights and scores the test
split once with them. The loss's state (ROLE's label estimator) trains beside the network;
under torchrun, DDP averages both, and every process applies every process's after-step
update (LL-Cp's flips) and labels from the same gathered scores (APL), so that the state
is the same on all of them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from spl.data import protocol
from spl.data.loaders import ImageSplits, steps_per_epoch
from spl.data.runtime import stream_seed
from spl.evaluate.metrics import mean_average_precision
from spl.evaluate.scoring import head_scores, recovery_map
from spl.fit.losses import Batch, Loss
from spl.fit.recipes import PAPER_RECIPE, Recipe


class Classifier(nn.Module):
    """Backbone (images -> pooled features) followed by one linear layer with bias."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class Trainable(nn.Module):
    """The classifier and the loss's per-row state behind one forward, so that DDP wraps
    both and averages the trainable state's gradients (ROLE's estimator) like the
    network's. Trainable state tensors are parameters of ``estimator``; the rest buffers."""

    def __init__(self, classifier: Classifier, loss: Loss, state: dict[str, torch.Tensor]):
        super().__init__()
        self.classifier = classifier
        self.loss = loss
        self.estimator = nn.ParameterDict(
            {n: nn.Parameter(t.detach().clone().float()) for n, t in state.items() if n in loss.trainable}
        )  # fmt: skip
        self.buffer_names = [n for n in state if n not in loss.trainable]
        for name in self.buffer_names:
            self.register_buffer(f"state_{name}", state[name].clone())

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self.estimator.items())
        out.update({name: getattr(self, f"state_{name}") for name in self.buffer_names})
        return out

    def forward(self, images: torch.Tensor, index: torch.Tensor):
        return self.classifier(images), self.loss.batch_state(self.state(), index)


def make_optimizer(
    trainable: Trainable, lr: float, recipe: Recipe | None = None
) -> torch.optim.Optimizer:
    """The optimiser over the network and the loss's trainable state (lr x its multiplier).

    The paper's: one Adam at one lr, no weight decay. A method's recipe may give the head
    its own lr multiplier, weight decay (on weights; not on biases and norms unless the
    recipe decays everything) and SGD with momentum. Adam on the loss's state is dense (the
    reference's): rows keep moving between their batches.
    """
    recipe = recipe or PAPER_RECIPE
    network = [p for p in trainable.classifier.parameters() if p.requires_grad]
    if recipe.head_lr_multiplier == 1 and not recipe.weight_decay:
        groups = [{"params": network, "lr": lr}]
    else:
        head = {id(p) for p in trainable.classifier.head.parameters()}
        groups = []
        for in_head, multiplier in ((False, 1.0), (True, recipe.head_lr_multiplier)):
            params = [p for p in network if (id(p) in head) == in_head]
            decayed = [p for p in params if recipe.decay_all or p.dim() > 1]
            plain = [p for p in params if not (recipe.decay_all or p.dim() > 1)]
            for chosen, decay in ((decayed, recipe.weight_decay), (plain, 0.0)):
                if chosen:
                    groups.append({"params": chosen, "lr": lr * multiplier, "weight_decay": decay})
    for name, param in trainable.estimator.items():
        groups.append(
            {"params": [param], "lr": lr * trainable.loss.lr_multiplier(name), "weight_decay": 0.0}
        )
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, weight_decay=0.0)
    return torch.optim.Adam(
        groups, betas=protocol.ADAM_BETAS, eps=protocol.ADAM_EPS, weight_decay=0.0
    )


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
        # Each repeat keeps its first score in rank order: the ranks may score a repeated
        # row differently (the training rows are read with a random flip of each rank's
        # own), and an indexed write of repeated rows keeps any one of them, while every
        # rank must place the same.
        order = torch.argsort(indices, stable=True)
        ordered = indices[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        indices, logits = ordered[first], logits[order[first]]
    out = torch.full((size, logits.shape[-1]), float("nan"))
    out[indices] = logits
    missing = torch.isnan(out).any(dim=1)
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} rows were not scored")
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers on every process. Each rank's BatchNorm statistics move with its own
    last batches (DDP broadcasts rank 0's only at the next forward), so without this every
    rank would score its share of val and train with a slightly different model than the
    one rank 0 saves."""
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, 0)


def split_logits(
    classifier: nn.Module, data: ImageSplits, split: str, batch_size: int, *, amp: bool,
    channels_last: bool,
) -> torch.Tensor:  # fmt: skip
    """Logits of every row of a split, in loader index order, gathered across processes."""
    device = data.procs.device
    cuda = device.type == "cuda"
    index, logits = predict(
        classifier, data.eval_loader(split, batch_size), device, amp=amp and cuda,
        channels_last=channels_last and cuda, prepare=data.prepare(train=False),
    )  # fmt: skip
    return gather_by_index(index, logits, len(data.datasets[split]), data.procs.world)


def split_map(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(mean_average_precision(logits, torch.from_numpy(labels.astype(np.float32))))


def _to(value: Any, device: torch.device | str) -> Any:
    """``value`` (tensors in dicts, or None) with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {name: _to(item, device) for name, item in value.items()}
    return value


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class FineTuner:
    """Fine-tune a classifier with one loss at one (lr, batch size, seed).

    >>> tuner = FineTuner(loss, lr=1e-4, batch_size=16, epochs=10, seed=0).fit(
    ...     make_classifier, data)
    >>> tuner.best_epoch_, tuner.best_val_map_, tuner.scores_["test_map"]

    ``make_classifier()`` builds the network after the run's head-initialisation seed is
    set (so a fresh head is a function of the seed). ``initial_state`` is the loss's state
    to start from (LinearInit: the linear head's exported state, aligned to the training
    rows); ``head`` (weight, bias) the LinearInit head.
    """

    def __init__(
        self,
        loss: Loss,
        *,
        lr: float,
        batch_size: int,
        epochs: int = protocol.FINETUNE_EPOCHS,
        seed: int = 0,
        amp: bool = False,
        channels_last: bool = False,
        freeze_batchnorm: bool = False,
        sync_batchnorm: bool = False,
        recipe: Recipe | None = None,
    ) -> None:
        self.loss = loss
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.amp = amp
        self.channels_last = channels_last
        self.freeze_batchnorm = freeze_batchnorm
        self.sync_batchnorm = sync_batchnorm
        self.recipe = recipe

    def fit(
        self,
        make_classifier: Callable[[], Classifier],
        data: ImageSplits,
        *,
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
        initial_state: dict[str, torch.Tensor] | None = None,
        checkpoint: dict | None = None,
        best: dict | None = None,
        val_labels: np.ndarray | None = None,
        on_epoch: Callable[[FineTuner, dict], None] | None = None,
        on_step: Callable[[int, float, float], None] | None = None,
    ) -> FineTuner:
        """Train; ``checkpoint`` (from :meth:`checkpoint`) and ``best`` (the best epoch's
        checkpoint) resume an interrupted run. ``on_epoch(self, record)`` sees each epoch's
        record (epoch, val mAP, whether it improved); ``on_step(step, waited, seconds)``
        reports timing. ``val_labels`` select the best epoch (the val split's full labels by
        default). Afterwards the best weights are loaded and the test split scored."""
        recipe = self.recipe or PAPER_RECIPE
        trainable = self._build(make_classifier, data, head, initial_state)
        self.model_ = trainable
        self.optimizer_ = make_optimizer(trainable, self.lr, recipe)
        self.scheduler_ = self._scheduler(recipe, data)
        progress = self._restore(checkpoint, best)
        self.history_: list[dict] = []
        model = self._distributed(trainable, data.procs)
        if val_labels is None:
            val_labels = data.labels("val")
        if progress["epoch"] == 0 and head is not None:
            # Epoch 0: the untouched LinearInit model, to show where fine-tuning starts.
            val0 = split_map(self._logits(data, "val"), val_labels)
            self._record({"epoch": 0, "val_map": val0, "improved": False}, on_epoch)
        while progress["epoch"] < self.epochs and not progress.get("stopped"):
            epoch = progress["epoch"] + 1
            stats = self._train_one_epoch(model, data, epoch, recipe, on_step)
            val_map = split_map(self._logits(data, "val"), val_labels)
            progress, improved = self._advance(progress, epoch, val_map, recipe)
            if improved:
                self.best_state_ = _copy_state(trainable)
            self.progress_ = progress
            record = {"epoch": epoch, "val_map": val_map, "improved": improved, **stats}
            self._record(record, on_epoch)
        self.progress_ = progress
        self.best_epoch_ = int(progress["best_epoch"])
        self.best_val_map_ = float(progress["best_val"])
        if self.best_state_ is not None:
            trainable.load_state_dict(self.best_state_)
        self._score(data)
        return self

    def checkpoint(self) -> dict:
        """What resumes training after the last finished epoch (tensors and plain values)."""
        saved = {
            "model": self.model_.state_dict(),
            "optimizer": self.optimizer_.state_dict(),
            "state": dict(self.progress_),
        }
        if self.scheduler_ is not None:
            saved["scheduler"] = self.scheduler_.state_dict()
        return saved

    # ------------------------------------------------------------------ internals

    def _build(
        self,
        make_classifier: Callable[[], Classifier],
        data: ImageSplits,
        head: tuple[torch.Tensor, torch.Tensor] | None,
        initial_state: dict[str, torch.Tensor] | None,
    ) -> Trainable:
        """The network (a fresh head is a function of the seed, or LinearInit's) and the
        loss's per-row state for the training rows, on the device."""
        procs = data.procs
        device = procs.device
        torch.manual_seed(stream_seed(self.seed, 0, "finetune"))
        classifier = make_classifier()
        if head is not None:
            with torch.no_grad():
                classifier.head.weight.copy_(head[0])
                classifier.head.bias.copy_(head[1])
        observed = torch.from_numpy(data.observed().astype(np.float32))
        state = self.loss.init_state(observed, heads=1, seed=self.seed)
        state = {name: tensor[0] if tensor.dim() == 3 else tensor for name, tensor in state.items()}
        if initial_state:
            state = self.loss.state_from_linear(initial_state, state)
        trainable = Trainable(classifier, self.loss, state).to(device)
        if self.channels_last and device.type == "cuda":
            trainable = trainable.to(memory_format=torch.channels_last)
        if self.sync_batchnorm and procs.world > 1:
            trainable = nn.SyncBatchNorm.convert_sync_batchnorm(trainable)
        return trainable

    def _scheduler(self, recipe: Recipe, data: ImageSplits):
        """The recipe's lr schedule over the optimiser (None: a constant lr). OneCycleLR is
        laid out for the recipe's epochs of this run's steps per epoch (ceil(N / B) where
        the recipe keeps the last partial batch, as the release's len(train_loader))."""
        if recipe.schedule != "onecycle":
            return None
        steps = steps_per_epoch(
            len(data.datasets["train"]), self.batch_size, world=data.procs.world,
            drop_last=recipe.drop_last,
        )  # fmt: skip
        return torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer_, max_lr=[g["lr"] for g in self.optimizer_.param_groups],
            total_steps=(recipe.schedule_epochs or self.epochs) * steps,
            pct_start=recipe.pct_start,
        )  # fmt: skip

    def _restore(self, checkpoint: dict | None, best: dict | None) -> dict:
        """The progress to continue from: a fresh run's, or the checkpoint's (its model,
        optimiser and schedule loaded, the best epoch's weights kept aside)."""
        self.best_state_ = None
        if checkpoint is None:
            return {"epoch": 0, "best_val": -1.0, "best_epoch": 0}
        self.model_.load_state_dict(checkpoint["model"])
        self.optimizer_.load_state_dict(checkpoint["optimizer"])
        if self.scheduler_ is not None:
            self.scheduler_.load_state_dict(checkpoint["scheduler"])
        self.best_state_ = None if best is None else best["model"]
        return dict(checkpoint["state"])

    @staticmethod
    def _distributed(trainable: Trainable, procs) -> nn.Module:
        """What the steps run: DDP over the trainable under torchrun, else itself."""
        if procs.world == 1:
            return trainable
        from torch.nn.parallel import DistributedDataParallel

        device = procs.device
        return DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None
        )

    def _train_one_epoch(
        self, model: nn.Module, data: ImageSplits, epoch: int, recipe: Recipe, on_step
    ) -> dict:
        """Epoch ``epoch``: its seeded draws, the loss's epoch hooks around one pass over the
        recipe's batches (the last partial one dropped or kept), the ranks' BatchNorm
        statistics made rank 0's."""
        procs, trainable = data.procs, self.model_
        torch.manual_seed(stream_seed(self.seed, epoch, "finetune"))  # this epoch's draws
        self.loss.on_epoch_start(
            trainable.state(), epoch=epoch, num_epochs=self.epochs, seed=self.seed
        )
        generator = None
        if data.cache_images:
            generator = torch.Generator(device=procs.device)
            generator.manual_seed(stream_seed(self.seed, epoch, "finetune"))
        loader = data.train_loader(self.batch_size, self.seed, epoch, drop_last=recipe.drop_last)
        stats = self.train_epoch(
            model, self.optimizer_, loader, procs.device, epoch, scheduler=self.scheduler_,
            prepare=data.prepare(train=True, generator=generator), on_step=on_step,
            world=procs.world,
        )  # fmt: skip
        if procs.world > 1:
            broadcast_buffers(trainable)
        self._end_epoch(trainable, data, epoch)
        return stats

    @staticmethod
    def _advance(progress: dict, epoch: int, val_map: float, recipe: Recipe) -> tuple[dict, bool]:
        """(the progress after ``epoch``, whether its val mAP improved on the best): the best
        epoch so far and, under a release's recipe, its early-stopping rule."""
        improved = val_map > progress["best_val"]
        history = [*progress.get("val_history", []), val_map]
        advanced = {
            "epoch": epoch,
            "best_val": max(val_map, progress["best_val"]),
            "best_epoch": epoch if improved else progress["best_epoch"],
        }
        if recipe is not PAPER_RECIPE:  # the paper trains every epoch
            advanced["val_history"] = history
            advanced["stopped"] = recipe.early_stop.stop(history)
        return advanced, improved

    def _record(self, record: dict, on_epoch: Callable[[FineTuner, dict], None] | None) -> None:
        self.history_.append(record)
        if on_epoch is not None:
            on_epoch(self, record)

    def _logits(self, data: ImageSplits, split: str) -> torch.Tensor:
        return split_logits(
            self.model_.classifier, data, split, self.batch_size, amp=self.amp,
            channels_last=self.channels_last,
        )  # fmt: skip

    def train_epoch(
        self, model, optimizer, loader, device, epoch, *, scheduler=None, prepare, on_step,
        world: int = 1,
    ) -> dict:  # fmt: skip
        """One pass over the training loader; BatchNorm in train mode (docs/protocol.md section 3).
        Public for the fine-tune benchmark, which times the steps of a model it builds."""
        model.train()
        if self.freeze_batchnorm:
            # Normalise with the pretrained statistics (affine weights still learn): for data
            # whose statistics are far from ImageNet's, where train-mode BatchNorm first undoes
            # what the pretrained (and LinearInit) head expects.
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        amp = self.amp and device.type == "cuda"
        channels_last = self.channels_last and device.type == "cuda"
        hooked = self.loss.overrides("after_step")
        total, steps = 0.0, 0
        wait_start = time.perf_counter()
        for step, (images, labels, observed, index) in enumerate(loader):
            waited = time.perf_counter() - wait_start
            start = time.perf_counter()
            images = to_device(images, device, channels_last)
            if prepare is not None:
                images = prepare(images)
            labels = labels.to(device, non_blocking=True)
            observed = observed.to(device, non_blocking=True)
            index = index.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits, batch_state = model(images, index)
            batch = Batch(observed, labels, epoch, self.epochs, batch_state)
            loss = self.loss.batch_loss(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if hooked and world > 1:
                self.after_every_step(index, logits.detach().float()[None], batch, world)
            elif hooked:
                self.loss.after_step(
                    self.model_.state(), rows=index, logits=logits.detach().float()[None],
                    batch=batch,
                )  # fmt: skip
            total += float(loss.detach())
            steps += 1
            if on_step is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                on_step(step, waited, time.perf_counter() - start)
            wait_start = time.perf_counter()
        return {"train_loss": total / max(steps, 1), "steps": steps}

    def after_every_step(
        self, rows: torch.Tensor, logits: torch.Tensor, batch: Batch, world: int
    ) -> None:
        """The loss's after-step update (LL-Cp's permanent flips) of every process's batch, on
        every process, so that the loss's state stays the same on all of them: each rank's
        part in rank order, as one process applying those batches in turn would. A part is
        the batch its rank's loss saw (rows, logits, observed, labels, state rows), whatever
        its size and even where parts repeat a row."""
        import torch.distributed as dist

        state = self.model_.state()
        device = rows.device
        mine = {
            "rows": rows, "logits": logits, "observed": batch.observed, "labels": batch.labels,
            "state": {name: t.detach() for name, t in batch.state.items()},
        }  # fmt: skip
        parts: list = [None] * world
        dist.all_gather_object(parts, _to(mine, "cpu"))
        for part in parts:
            part = _to(part, device)
            self.loss.after_step(
                state, rows=part["rows"], logits=part["logits"],
                batch=Batch(part["observed"], part["labels"], batch.epoch, batch.num_epochs,
                            part["state"]),
            )  # fmt: skip

    def _end_epoch(self, trainable: Trainable, data: ImageSplits, epoch: int) -> None:
        scores = None
        if self.loss.wants_scores(epoch=epoch, num_epochs=self.epochs):
            logits = self._logits(data, "train")  # the training rows, in eval mode
            scores = torch.sigmoid(logits)[None].to(data.procs.device)
        self.loss.on_epoch_end(
            trainable.state(), epoch=epoch, num_epochs=self.epochs, seed=self.seed, scores=scores
        )

    @torch.no_grad()
    def _score(self, data: ImageSplits) -> None:
        """The test split scored once with the best weights; the loss's label estimates'
        recovery of the hidden training labels (ROLE's estimator)."""
        logits = self._logits(data, "test")
        test_labels = torch.from_numpy(data.labels("test").astype(np.float32))
        self.scores_: dict[str, Any] = head_scores(logits[None], test_labels)[0]
        estimates = self.loss.label_estimates(self.model_.state())
        if estimates is not None:
            train_labels = torch.from_numpy(data.labels("train").astype(np.float32))
            self.scores_["estimator_recovery_map"] = recovery_map(
                estimates.detach().cpu(), train_labels
            )
