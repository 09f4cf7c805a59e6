"""A pre-resized image cache: every image of a prepared dataset decoded and resized once to
``size x size`` RGB uint8, in one flat file read through a memory map.

Decoding JPEGs is what starves a GPU during fine-tuning; with the cache a training batch
is a slice of memory. The pixels equal the paper's pipeline: ``Resize((s, s))`` is the
first step of both transforms and a horizontal flip commutes with it, so flip and
normalisation run on the device (:func:`device_transform`). Disk cost: 3 * s^2 bytes per
image (602 KB at 448: 7 GB for VOC, 74 GB for COCO).

Files, under ``ROOT/<name>/cache/``: ``<source>-<size>.npy`` ([N, s, s, 3] uint8) and
``<source>-<size>.json`` (fingerprint, shape, bad rows), both written under temporary
names and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spl.data.common import SplError, atomic_path, safe_relative, write_json_atomic
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD, load_rgb, split_arrays
from spl.data.prepared import SOURCES, PreparedDataset


def cache_paths(prepared: PreparedDataset, source: str, size: int) -> tuple[Path, Path]:
    folder = prepared.path.parent / "cache"
    return folder / f"{source}-{size}.npy", folder / f"{source}-{size}.json"


class _Resize(Dataset):
    def __init__(self, paths: list[Path], size: int, skip_bad: bool) -> None:
        self.paths, self.size, self.skip_bad = paths, size, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            image = load_rgb(self.paths[index])
        except SplError as exc:
            if not self.skip_bad:
                raise SplError(f"row {index}: {exc}") from exc
            return np.zeros((self.size, self.size, 3), np.uint8), index, False
        # torchvision's Resize on a PIL image is PIL's bilinear resize (antialiased)
        resized = image.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(resized, dtype=np.uint8), index, True


def _as_list(items: list) -> list:
    return items


def build_cache(
    prepared: PreparedDataset,
    size: int,
    *,
    workers: int = 4,
    skip_bad: bool = False,
    force: bool = False,
    image_root: Path | None = None,
    progress: bool = True,
) -> None:
    """Write the cache of both source files (skips a complete one unless ``force``)."""
    root = Path(image_root) if image_root else prepared.image_root
    for source in SOURCES:
        data_path, meta_path = cache_paths(prepared, source, size)
        if meta_path.exists() and not force:
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == prepared.fingerprint:
                continue
        paths = [
            root / safe_relative(str(p), f"{prepared.path} ({source}), row {r}")
            for r, p in enumerate(prepared.images[source])
        ]
        count = len(paths)
        loader = DataLoader(
            _Resize(paths, size, skip_bad),
            batch_size=64,
            num_workers=workers,
            collate_fn=_as_list,
        )
        bad: list[int] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=count, unit="img", desc=f"cache {source} {size}px", leave=False)
        with atomic_path(data_path, force=True) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                              shape=(count, size, size, 3))  # fmt: skip
            for items in loader:
                for pixels, index, ok in items:
                    array[index] = pixels
                    if not ok:
                        bad.append(index)
                if bar is not None:
                    bar.update(len(items))
            array.flush()
            del array
        if bar is not None:
            bar.close()
        write_json_atomic(
            meta_path,
            {"fingerprint": prepared.fingerprint, "size": size, "count": count,
             "bad_rows": sorted(bad), "format": "npy uint8 [N, size, size, 3]"},
        )  # fmt: skip


def open_cache(prepared: PreparedDataset, source: str, size: int) -> tuple[np.ndarray, list[int]]:
    """The memory-mapped pixels of one source file, checked against the dataset."""
    data_path, meta_path = cache_paths(prepared, source, size)
    if not meta_path.exists() or not data_path.exists():
        raise SplError(
            f"no {size}px image cache for {prepared.path.parent} ({data_path} missing); "
            f"build it with --cache-images"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != prepared.fingerprint:
        raise SplError(f"{data_path} was built from another image list; rebuild it (--force)")
    array = np.load(data_path, mmap_mode="r")
    if array.shape != (len(prepared.images[source]), size, size, 3):
        raise SplError(f"{data_path} has shape {array.shape}; rebuild it (--force)")
    return array, list(meta.get("bad_rows", []))


class CachedImageDataset(Dataset):
    """Like :class:`spl.data.images.ImageDataset`, but items are cached uint8 pixels
    ``[s, s, 3]``; :func:`device_transform` finishes them on the device."""

    def __init__(
        self,
        prepared: PreparedDataset,
        split: str,
        size: int,
        *,
        observed_set: str | None = None,
        exclude_rows: Sequence[int] = (),
    ) -> None:
        self.source, self.rows, self.labels, self.observed = split_arrays(
            prepared, split, observed_set, exclude_rows
        )
        self.pixels, _ = open_cache(prepared, self.source, size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        pixels = torch.from_numpy(np.array(self.pixels[self.rows[index]]))
        return pixels, self.labels[index], self.observed[index], index


def device_transform(
    images: torch.Tensor,
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flip (p=0.5, training only) and normalise a ``[B, 3, s, s]`` batch in [0, 1]."""
    if train:
        flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - mean_t) / std_t


def cache_bad_rows(prepared: PreparedDataset, size: int) -> dict[str, np.ndarray]:
    """Rows whose image the cache could not read (their pixels are zeros), per source."""
    out = {}
    for source in SOURCES:
        _, bad = open_cache(prepared, source, size)
        out[source] = np.array(sorted(bad), dtype=np.int64)
    return out
