"""A prepared dataset of synthetic JPEG photos (VOC-like sizes) for throughput benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_jpeg_dataset(root: Path, count: int = 1024, classes: int = 20, seed: int = 0) -> Path:
    """Write ``count`` 500x375 JPEGs with smooth content and noise, prepare them as a custom
    dataset, and return its folder (``root/synthetic``)."""
    from PIL import Image

    from spl.data.prepared import write_prepared
    from spl.data.sources import read_custom

    folder = root / "synthetic"
    if (folder / "labels.h5").exists():
        return folder
    images = root / "synthetic-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    rows = ["image,labels,split"]
    for i in range(count):
        phase = rng.rand(3) * 6.28
        base = np.stack([np.sin(xx / (20 + 9 * c) + yy / 31 + phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:06d}.jpg", quality=90)
        names = ";".join(f"c{c}" for c in rng.choice(classes, rng.randint(1, 4), replace=False))
        rows.append(f"{i:06d}.jpg,{names},{'test' if i % 5 == 0 else 'train'}")
    (root / "synthetic.csv").write_text("\n".join(rows) + "\n")
    raw = read_custom(images, root / "synthetic.csv", name="synthetic")
    write_prepared(raw, folder / "labels.h5")
    return folder
