"""Image datasets over a prepared split, with the paper's transforms (docs/protocol.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spl.data import protocol
from spl.data.common import SplError, safe_relative
from spl.data.prepared import PreparedDataset

IMAGENET_MEAN = protocol.IMAGENET_MEAN
IMAGENET_STD = protocol.IMAGENET_STD
DEFAULT_IMAGE_SIZE = protocol.IMAGE_SIZE


class ImageError(SplError):
    """An image file that cannot be read; the message names its path."""


def build_transform(
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    train: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """``Resize((s, s))`` (no crop, aspect not kept), flip p=0.5 for training only, normalise."""
    from torchvision import transforms

    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip(p=0.5))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def load_rgb(path: Path):
    """Decode an image file to RGB; a missing or corrupt file raises :class:`ImageError`
    with its path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image {path}: {exc}") from exc


def split_arrays(
    prepared: PreparedDataset,
    split: str,
    observed_set: str | None,
    exclude_rows: Sequence[int] = (),
) -> tuple[str, np.ndarray, torch.Tensor, torch.Tensor]:
    """(source file, rows, full labels, observed labels) of a split, without ``exclude_rows``;
    observed labels are all zero (unobserved) when no set is named."""
    source, rows = prepared.rows(split)
    if len(exclude_rows):
        rows = rows[~np.isin(rows, np.asarray(exclude_rows))]
    labels = torch.from_numpy(prepared.labels[source][rows].astype(np.float32))
    if observed_set is None:
        return source, rows, labels, torch.zeros_like(labels)
    observed = prepared.observed_set(observed_set)[source][rows]
    return source, rows, labels, torch.from_numpy(observed.astype(np.float32))


class ImageDataset(Dataset):
    """One split of a prepared dataset: ``(image, labels, observed, index)`` per item.

    ``index`` is the item's position in the split (what the ROLE estimator and distributed
    evaluation key on); ``rows[index]`` is its row in the source file. ``observed`` is the
    observed-label row of ``observed_set`` (all zeros when no set is named, e.g. for test).
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        split: str,
        transform=None,
        *,
        observed_set: str | None = None,
        image_root: Path | None = None,
        exclude_rows: Sequence[int] = (),
    ) -> None:
        self.prepared = prepared
        self.split = split
        self.source, self.rows, self.labels, self.observed = split_arrays(
            prepared, split, observed_set, exclude_rows
        )
        self.image_root = Path(image_root) if image_root else prepared.image_root
        where = f"{prepared.path} ({self.source})"
        self.paths = [
            safe_relative(str(p), f"{where}, row {r}")
            for r, p in zip(self.rows, prepared.images[self.source][self.rows], strict=True)
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int) -> Path:
        return self.image_root / self.paths[index]

    def __getitem__(self, index: int):
        try:
            image = load_rgb(self.path(index))
        except SplError as exc:
            raise ImageError(
                f"{self.split} split, {self.source} row {self.rows[index]}: {exc}"
            ) from exc
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], self.observed[index], index
