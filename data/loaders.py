"""The image splits of a prepared dataset for end-to-end training: datasets, samplers and
loaders, with the paper's transforms (decoded per item, or from the pre-resized cache with
flip and normalisation on the device), shuffled by (seed, epoch) and sharded over the
processes of a torchrun job."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from spl.data.prepared import PreparedDataset
from spl.data.runtime import Processes, default_workers, generator

SPLITS = ("train", "val", "test")


def train_batches(
    rows: int, batch_size: int, *, seed: int, epoch: int, world: int = 1, rank: int = 0,
    drop_last: bool = True,
):  # fmt: skip
    """The batches of row indices one process trains on in an epoch: the rows shuffled by
    (seed, epoch), in batches of ``batch_size`` (the global batch: each of ``world``
    processes takes ``batch_size / world`` of each, which must divide).

    ``drop_last``: the paper's code drops the last partial batch (floor(rows / B) steps);
    the releases since keep it (ceil(rows / B) steps). Kept under torchrun, the last global
    batch is split evenly: PyTorch's DistributedSampler pads the epoch with up to
    ``world - 1`` rows repeated from its start, so that every process takes the same number
    of rows in every step (no process waits for a step the others never take) and DDP's
    average of the processes' gradients is the mean over the global batch."""
    from torch.utils.data import BatchSampler, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if world > 1:
        sampler = DistributedSampler(
            range(rows), num_replicas=world, rank=rank, shuffle=True, seed=seed,
            drop_last=drop_last,
        )  # fmt: skip
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(range(rows), generator=generator(seed, epoch, "finetune"))
    return BatchSampler(sampler, batch_size // world, drop_last=drop_last)


def steps_per_epoch(rows: int, batch_size: int, *, world: int = 1, drop_last: bool = True) -> int:
    """The optimiser steps of an epoch (the same on every process): floor(rows / B) when the
    last partial batch is dropped, ceil(rows / B) when it is kept, B the global batch."""
    share = batch_size // world
    if drop_last:
        return (rows // world) // share
    return math.ceil(math.ceil(rows / world) / share)


class ImageSplits:
    """Train, val and test of one prepared dataset, without the ``excluded`` rows (rows of
    unreadable images); the train split carries the ``observed`` set's labels."""

    def __init__(
        self,
        prepared: PreparedDataset,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        observed: str,
        excluded: dict[str, np.ndarray],
        procs: Processes | None = None,
        workers: int | None = None,
        cache_images: bool = False,
    ) -> None:
        from spl.data.images import ImageDataset, build_transform

        self.prepared = prepared
        self.procs = procs or Processes()
        self.workers = default_workers(self.procs.world) if workers is None else workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.cache_images = cache_images
        if cache_images:
            from spl.data.cache import CachedImageDataset, build_cache, cache_bad_rows

            self.procs.together(
                lambda: build_cache(
                    prepared, image_size, workers=self.workers, skip_bad=True,
                    progress=self.procs.rank == 0,
                ),
                everyone=False,
            )  # fmt: skip
            cached_bad = cache_bad_rows(prepared, image_size)
            excluded = {
                source: np.union1d(excluded[source], cached_bad[source]) for source in excluded
            }
        self.excluded = excluded
        self.datasets = {}
        for split in SPLITS:
            source = prepared.rows(split)[0]
            observed_set = observed if split == "train" else None
            if cache_images:
                self.datasets[split] = CachedImageDataset(
                    prepared, split, image_size, observed_set=observed_set,
                    exclude_rows=excluded[source],
                )  # fmt: skip
            else:
                transform = build_transform(image_size, train=split == "train", mean=mean, std=std)
                self.datasets[split] = ImageDataset(
                    prepared, split, transform, observed_set=observed_set,
                    exclude_rows=excluded[source],
                )  # fmt: skip
        self.rows = {split: ds.rows for split, ds in self.datasets.items()}

    def labels(self, split: str) -> np.ndarray:
        """The full labels of a split's rows, in loader index order."""
        source = self.prepared.rows(split)[0]
        return self.prepared.labels[source][self.rows[split]]

    def observed(self) -> np.ndarray:
        """The training split's observed labels, in loader index order."""
        return self.datasets["train"].observed.numpy()

    def prepare(self, train: bool, generator: torch.Generator | None = None) -> Callable | None:
        """What turns a device batch of cached pixels into the model's input (None when the
        loader already yields transformed images)."""
        if not self.cache_images:
            return None
        from spl.data.cache import device_transform

        return lambda images: device_transform(
            images, train=train, mean=self.mean, std=self.std, generator=generator
        )

    def train_loader(self, batch_size: int, seed: int, epoch: int, *, drop_last: bool = True):
        """The shuffled batches of one epoch, a function of (seed, epoch), the last partial
        one dropped (the paper's) or kept (``drop_last=False``, the releases since); under
        torchrun each process takes batch_size / N of each batch (:func:`train_batches`)."""
        from torch.utils.data import DataLoader

        dataset = self.datasets["train"]
        batches = train_batches(
            len(dataset), batch_size, seed=seed, epoch=epoch, world=self.procs.world,
            rank=self.procs.rank, drop_last=drop_last,
        )  # fmt: skip
        return DataLoader(
            dataset, batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.procs.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip

    def eval_loader(self, split: str, batch_size: int):
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        dataset = self.datasets[split]
        sampler = None
        if self.procs.world > 1:
            # pads with repeated rows to equal shares; gathering by index puts each on its row
            sampler = DistributedSampler(
                dataset, num_replicas=self.procs.world, rank=self.procs.rank, shuffle=False
            )
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
            pin_memory=self.procs.device.type == "cuda",
        )  # fmt: skip
