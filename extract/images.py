"""Images for the device: the image files of a prepared dataset by index, decoded and
resized in the DataLoader workers (or sent as JPEG bytes for decoding on the device), their
tiles, and the batches and loader of a pass over them.

Images travel from the workers as uint8 (decoded and resized there with PIL, or as JPEG
bytes for decoding on the GPU with nvJPEG); scaling and normalisation happen on the compute
device (:class:`spl.extract.run.FeatureStep`). This gives the paper's evaluation transform
exactly (:func:`spl.data.images.build_transform`) at a quarter of the bytes per image. With
a tile grid a worker decodes each image once and sends the whole image and its tiles, each
resized, as one ``[1 + g*g, s, s, 3]`` item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spl.data.common import SplError, safe_relative
from spl.data.images import load_rgb
from spl.data.prepared import SOURCES, PreparedDataset

DECODE_ROUTES = ("pil", "device")
_JPEG_MAGIC = b"\xff\xd8\xff"

DECODERS = {
    "pil": "PIL (decode and resize in the workers)",
    "device": "JPEG: torchvision decode_jpeg and antialiased resize on the device; "
    "other formats: PIL",
}


class ImageFiles(Dataset):
    """Image files by index, as uint8 for the device: never raises, reports errors instead.

    Item: ``(payload, index, error)``. Route ``pil``: payload ``[s, s, 3]`` uint8, decoded
    and resized with PIL exactly as ``transforms.Resize((s, s))`` does. Route ``device``:
    a JPEG's encoded bytes (1-D uint8) for :class:`FeatureStep` to decode; other formats
    are decoded here as with ``pil``. With a tile ``grid`` g > 0 (route ``pil``): payload
    ``[1 + g*g, s, s, 3]``, the whole image, then its tiles (:func:`tile_boxes`), each
    resized to ``s x s``, all from one decode. An unreadable file gives zero pixels and its
    error.
    """

    def __init__(
        self, paths: Sequence[Path], image_size: int, route: str = "pil", grid: int = 0
    ) -> None:
        if route not in DECODE_ROUTES:
            raise ValueError(f"decode route {route!r} not in {DECODE_ROUTES}")
        if grid and route != "pil":
            raise ValueError("tiles are cut in the workers: use the decode route 'pil'")
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.route = route
        self.grid = int(grid)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def views(self) -> int:
        """Images per item: 1, or the whole image and its g*g tiles."""
        return 1 + self.grid * self.grid

    def _pixels(self, image) -> np.ndarray:
        """``transforms.Resize((s, s))`` of a PIL image, as ``[s, s, 3]`` uint8."""
        from PIL import Image

        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        return np.array(image, dtype=np.uint8, copy=True)

    def resized(self, index: int) -> torch.Tensor:
        """Decode and resize with PIL: ``[s, s, 3]`` uint8. Raises SplError naming the file."""
        return torch.from_numpy(self._pixels(load_rgb(self.paths[index])))

    def tiled(self, index: int) -> torch.Tensor:
        """One decode; the whole image and each tile resized: ``[1 + g*g, s, s, 3]`` uint8."""
        image = load_rgb(self.paths[index])
        views = [self._pixels(image)]
        views += [self._pixels(image.crop(box)) for box in tile_boxes(*image.size, self.grid)]
        return torch.from_numpy(np.stack(views))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            if self.grid:
                return self.tiled(index), index, ""
            if self.route == "device":
                data = _read_bytes(self.paths[index])
                if data[:3] == _JPEG_MAGIC:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), index, ""
            return self.resized(index), index, ""
        except SplError as exc:
            shape = (self.image_size, self.image_size, 3)
            if self.grid:
                shape = (self.views, *shape)
            return torch.zeros(shape, dtype=torch.uint8), index, str(exc)


def tile_boxes(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The g x g non-overlapping tiles of a ``width x height`` image as PIL boxes (left,
    upper, right, lower), row by row from the top left, as AEVLP cuts them
    (datasets.py:267-331, with its overlap offsets of 0): ``width // g`` x ``height // g``
    pixels each, so the last ``width % g`` columns and ``height % g`` rows are in no tile.
    An image narrower or lower than g pixels gets 1-pixel tiles, clamped to the image."""
    tile_w, tile_h = max(1, width // grid), max(1, height // grid)
    boxes = []
    for y in range(grid):
        for x in range(grid):
            left, upper = min(x * tile_w, width - 1), min(y * tile_h, height - 1)
            right = min(max(left + 1, (x + 1) * tile_w), width)
            lower = min(max(upper + 1, (y + 1) * tile_h), height)
            boxes.append((left, upper, right, lower))
    return boxes


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise SplError(f"image not found: {path}") from exc
    except OSError as exc:
        raise SplError(f"cannot read image {path}: {exc}") from exc


@dataclass
class Batch:
    """A collated batch: images stacked ``[B, s, s, 3]`` (``[B, 1 + g*g, s, s, 3]`` with
    tiles; a list when some are JPEG bytes)."""

    images: torch.Tensor | list[torch.Tensor]
    index: torch.Tensor
    errors: list[str]

    def pin_memory(self) -> Batch:
        if isinstance(self.images, torch.Tensor):
            images = self.images.pin_memory()
        else:
            images = [image.pin_memory() for image in self.images]
        return Batch(images, self.index, self.errors)


def collate(items: list[tuple[torch.Tensor, int, str]]) -> Batch:
    payloads = [payload for payload, _, _ in items]
    index = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
    errors = [error for _, _, error in items]
    if all(p.dim() >= 3 for p in payloads):  # decoded: an image, or an image and its tiles
        return Batch(torch.stack(payloads), index, errors)
    return Batch(payloads, index, errors)


def chunk_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    return [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]


def make_loader(
    files: ImageFiles, batches: list[list[int]], workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        files,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


def image_paths(prepared: PreparedDataset) -> list[Path]:
    """Absolute image paths of both source files, in row order (trainval, then test)."""
    paths = []
    for source in SOURCES:
        for row, image in enumerate(prepared.images[source]):
            where = f"{prepared.path} ({source}), row {row}"
            paths.append(prepared.image_root / safe_relative(str(image), where))
    return paths
