"""The bundled demo: a real multi-label image set built from scikit-learn's handwritten digits.

Each image is a 2x2 grid holding 1 to 4 digits (8x8 scans upscaled), labelled with the
digit classes present (10 classes). Train and test images draw their digits from disjoint
pools of scans, so a test image never reuses a training scan. Everything follows one seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from spl.data.common import SplError
from spl.data.prepared import RawDataset

DEMO_CLASSES = [str(d) for d in range(10)]
CELL = 32  # pixels per grid cell; images are 2*CELL square


def scan_pools(
    targets: np.ndarray, rng: np.random.RandomState, test_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Split the scans per class so both pools hold every digit."""
    train, test = [], []
    for digit in range(10):
        scans = rng.permutation(np.nonzero(targets == digit)[0])
        n_test = int(round(test_share * len(scans)))
        test.extend(scans[:n_test])
        train.extend(scans[n_test:])
    return np.array(sorted(train)), np.array(sorted(test))


def _render(scans: np.ndarray, cells: list[int], rng: np.random.RandomState) -> np.ndarray:
    from PIL import Image

    canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.float32)
    for scan, cell in zip(scans, cells, strict=True):
        digit = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8))
        size = CELL - 4
        big = np.asarray(digit.resize((size, size), Image.BILINEAR), dtype=np.float32)
        row, col = divmod(cell, 2)
        dy, dx = rng.randint(0, 5, size=2)  # small jitter inside the cell
        y0, x0 = row * CELL + dy, col * CELL + dx
        canvas[y0 : y0 + size, x0 : x0 + size] = np.maximum(
            canvas[y0 : y0 + size, x0 : x0 + size], big
        )
    canvas += rng.normal(0.0, 6.0, size=canvas.shape)  # mild sensor noise
    gray = np.clip(canvas, 0, 255).astype(np.uint8)
    return np.stack([gray] * 3, axis=-1)


def build_demo(
    out_dir: Path,
    *,
    train_images: int = 2000,
    test_images: int = 1000,
    seed: int = 0,
    force: bool = False,
) -> RawDataset:
    """Write the demo PNGs under ``out_dir/images`` and return the raw dataset over them."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if train_images < 10 or test_images < 1:
        raise SplError("the demo needs at least 10 training and 1 test image")
    image_dir = out_dir / "images"
    if image_dir.exists():
        if not force:
            raise SplError(f"{image_dir} already exists; pass --force to rebuild the demo images")
        shutil.rmtree(image_dir)
    digits = load_digits()
    rng = np.random.RandomState(seed)
    train_pool, test_pool = scan_pools(digits.target, rng, test_share=1 / 3)
    images: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    tmp_dir = out_dir / ".images.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    for src, count, pool, folder in (
        ("trainval", train_images, train_pool, "train"),
        ("test", test_images, test_pool, "test"),
    ):
        (tmp_dir / folder).mkdir(parents=True)
        matrix = np.zeros((count, 10), dtype=np.uint8)
        paths = []
        for row in range(count):
            n_digits = rng.randint(1, 5)
            chosen = rng.choice(pool, size=n_digits, replace=False)
            cells = list(rng.permutation(4)[:n_digits])
            pixels = _render(digits.images[chosen], cells, rng)
            rel = f"images/{folder}/{row:05d}.png"
            Image.fromarray(pixels).save(tmp_dir / folder / f"{row:05d}.png")
            paths.append(rel)
            matrix[row, digits.target[chosen]] = 1
        images[src], labels[src] = paths, matrix
    tmp_dir.rename(image_dir)
    return RawDataset(
        "demo", list(DEMO_CLASSES), out_dir, images, labels, None, "sklearn.datasets.load_digits"
    )
