"""Builders of tiny raw dataset trees in each real layout, with real (decodable) images."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from spl.data.sources import VOC_CLASSES


def write_image(path: Path, seed: int, size: int = 24, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, (size, size + 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def make_voc(root: Path) -> dict:
    """VOCdevkit layout. Returns the expected label rows per phase (id -> positive classes).

    Holds the cases the reader must get right: a difficult-only class (0) is negative,
    an image with no positive is dropped, ids come unsorted in the lists.
    """
    base = root / "VOC2012"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    phases = {
        "train": {
            "2008_000010": {"dog": "1", "cat": "0"},  # cat difficult -> negative
            "2008_000002": {"aeroplane": "1", "person": "1"},
            "2007_000033": {"tvmonitor": "1"},
            "2008_000005": {"bird": "0"},  # difficult only -> no positive -> dropped
            "2009_000001": {"sheep": "1", "cow": "1", "horse": "0"},
        },
        "val": {
            "2010_000003": {"car": "1"},
            "2007_000129": {"bicycle": "1", "person": "1", "bus": "0"},
            "2011_000001": {"chair": "1", "sofa": "1", "diningtable": "1"},
        },
    }
    for phase, images in phases.items():
        for name in VOC_CLASSES:
            lines = [f"{image_id} {marks.get(name, '-1'):>2}" for image_id, marks in images.items()]
            (base / "ImageSets" / "Main" / f"{name}_{phase}.txt").write_text(
                "\n".join(lines) + "\n"
            )
        for i, image_id in enumerate(images):
            write_image(
                base / "JPEGImages" / f"{image_id}.jpg",
                seed=zlib.crc32(image_id.encode()) % 1000 + i,
            )
    expected = {}
    for phase, images in phases.items():
        expected[phase] = {
            image_id: sorted(VOC_CLASSES.index(c) for c, v in marks.items() if v == "1")
            for image_id, marks in sorted(images.items())
            if any(v == "1" for v in marks.values())
        }
    return expected


def make_coco(root: Path) -> dict:
    """COCO 2014 layout with a crowd instance, an unannotated image and ids 9, 25, 100."""
    categories = [
        {"id": 1, "name": "person"},
        {"id": 3, "name": "car"},
        {"id": 18, "name": "dog"},
    ]
    specs = {
        "train2014": {
            "images": [9, 25, 100, 7],
            "annotations": [
                (100, 1, 0),
                (9, 18, 0),
                (25, 3, 1),  # crowd instance: counts
                (9, 1, 0),
                (100, 3, 0),
            ],
        },
        "val2014": {"images": [42, 5, 1000], "annotations": [(5, 18, 0), (1000, 1, 0)]},
    }
    (root / "annotations").mkdir(parents=True)
    for phase, spec in specs.items():
        images = [
            {"id": i, "file_name": f"COCO_{phase}_{i:012d}.jpg", "height": 24, "width": 28}
            for i in spec["images"]
        ]
        anns = [
            {"id": n, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
            for n, (i, c, crowd) in enumerate(spec["annotations"])
        ]
        data = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{phase}.json").write_text(json.dumps(data))
        for image in images:
            write_image(root / phase / image["file_name"], seed=image["id"])
    return specs


def make_cub(root: Path, n_attributes: int = 5) -> dict:
    """CUB_200_2011 layout; attribute labels include a line with an extra column."""
    base = root / "CUB_200_2011"
    (base / "attributes").mkdir(parents=True)
    entries = [
        (1, "001.Albatross/a_1.jpg", 1),
        (2, "001.Albatross/a_2.jpg", 0),
        (3, "002.Auklet/b_1.jpg", 1),
        (4, "002.Auklet/b_2.jpg", 0),
        (5, "002.Auklet/b_3.jpg", 1),
    ]
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _ in entries))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in entries))
    (base / "attributes" / "attributes.txt").write_text(
        "".join(f"{a} has_part::{a}\n" for a in range(1, n_attributes + 1))
    )
    rng = np.random.RandomState(3)
    present = rng.randint(0, 2, size=(len(entries), n_attributes))
    certainty = rng.randint(1, 5, size=(len(entries), n_attributes))
    lines = []
    for r, (image_id, _, _) in enumerate(entries):
        for a in range(n_attributes):
            extra = " 0" if (r, a) == (2, 1) else ""  # the released file has such lines
            lines.append(f"{image_id} {a + 1} {present[r, a]} {certainty[r, a]} 3.5{extra}")
    (base / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for i, path, _ in entries:
        write_image(base / "images" / path, seed=i)
    return {"entries": entries, "present": present}


def make_nuswide(root: Path) -> dict:
    """The authors' formatted NUS-WIDE lists; some rows have no positive label."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(5)
    out = {}
    for phase, n in (("train", 12), ("val", 6)):
        paths = [f"Flickr/concept_{i % 3}/{phase}_{i:04d}.jpg" for i in range(n)]
        labels = (rng.rand(n, 81) < 0.03).astype(np.uint8)
        labels[0] = 0  # an image with no positive: kept by default
        labels[1, 7] = 1
        np.save(root / f"formatted_{phase}_images.npy", np.array(paths))
        np.save(root / f"formatted_{phase}_labels.npy", labels)
        for i, path in enumerate(paths):
            write_image(root / path, seed=i)
        out[phase] = (paths, labels)
    return out


def make_custom(root: Path, csv: str | bytes, images: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """An image folder ``root/imgs`` holding ``images`` and the CSV ``root/labels.csv``.

    ``csv`` is written as given (bytes for an encoding test). Returns (image folder, CSV).
    """
    folder = root / "imgs"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(images):
        write_image(folder / name, seed=i, fmt="PNG")
    path = root / "labels.csv"
    if isinstance(csv, str):
        csv = csv.encode("utf-8")
    path.write_bytes(csv)
    return folder, path
