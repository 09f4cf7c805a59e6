"""The image splits of a prepared dataset for end-to-end training: datasets, samplers and
loaders, with the paper's transforms (decoded per item, or from the pre-resized cache with
flip and normalisation on the device), shuffled by (seed, epoch) and sharded over the
processes of a torchrun job."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from spl.data.prepared import PreparedDataset
from spl.data.runtime import Processes, default_workers, generator

SPLITS = ("train", "val", "test")


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

    def train_loader(self, batch_size: int, seed: int, epoch: int):
        """The shuffled batches of one epoch (the last partial one dropped), a function of
        (seed, epoch); under torchrun each process takes batch_size / N of each batch."""
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler
        from torch.utils.data.distributed import DistributedSampler

        dataset = self.datasets["train"]
        world = self.procs.world
        if world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=self.procs.rank, shuffle=True, seed=seed,
                drop_last=True,
            )  # fmt: skip
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=generator(seed, epoch, "finetune"))
        batches = BatchSampler(sampler, batch_size // world, drop_last=True)
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
