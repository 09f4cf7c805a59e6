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


COCO_CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 18, "name": "dog"},
]


def write_coco(root: Path, phases: dict, categories: list[dict] = COCO_CATEGORIES) -> None:
    """A COCO 2014 tree from ``phases``: per phase (``train2014``, ``val2014``) a list of
    images ``(id, width, height)`` and of annotations (dicts with ``image_id``,
    ``category_id`` and any of ``area``, ``bbox`` [x, y, w, h], ``iscrowd``)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for phase, spec in phases.items():
        images = [
            {"id": i, "file_name": f"COCO_{phase}_{i:012d}.jpg", "width": w, "height": h}
            for i, w, h in spec["images"]
        ]
        anns = [{"id": n, "iscrowd": 0, **ann} for n, ann in enumerate(spec["annotations"])]
        data = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{phase}.json").write_text(json.dumps(data))
        for image in images:
            write_image(root / phase / image["file_name"], seed=image["id"], size=8)


def _ann(image_id: int, category_id: int, area: float, bbox: list, crowd: int = 0) -> dict:
    return {
        "image_id": image_id,
        "category_id": category_id,
        "area": area,
        "bbox": bbox,
        "iscrowd": crowd,
    }


# Instances with known areas and boxes (columns: person 0, car 1, dog 2). Per annotated
# image: its size and, per class, the hand-computed size weight and sum of 1/distance.
COCO_INSTANCES = {
    "train2014": {
        "images": [(9, 100, 80), (25, 60, 60), (100, 50, 40), (7, 30, 30), (31, 40, 40)],
        "annotations": [
            _ann(9, 1, 300.0, [70, 30, 20, 20]),  # centre (80, 40): d = 30 from (50, 40)
            _ann(25, 18, 50.0, [25, 25, 10, 10]),  # centre (30, 30) = the image centre
            _ann(9, 3, 600.0, [20, 60, 20, 10], crowd=1),  # centre (30, 65): d = sqrt(1025)
            _ann(100, 3, 80.0, [0, 0, 10, 8]),
            _ann(25, 3, 150.0, [0, 0, 10, 10]),  # centre (5, 5): d = sqrt(1250)
            _ann(9, 1, 100.0, [0, 0, 20, 20]),  # centre (10, 10): d = 50
            _ann(25, 1, 200.0, [40, 0, 20, 60]),  # centre (50, 30): d = 20
            _ann(31, 18, 0.0, [0, 0, 4, 4]),  # no area at all in image 31
            _ann(31, 1, 0.0, [30, 30, 4, 4]),
        ],
    },
    "val2014": {
        "images": [(5, 200, 100), (42, 64, 48), (1000, 100, 100)],
        "annotations": [
            _ann(5, 18, 1000.0, [10, 50, 30, 20]),  # x 10..40, y 50..70
            _ann(1000, 1, 500.0, [0, 0, 50, 50]),
            _ann(5, 1, 3000.0, [100, 0, 50, 100]),  # x 100..150, y 0..100
            _ann(1000, 3, 500.0, [50, 50, 50, 50]),
        ],
    },
}
COCO_INSTANCES_ROWS = {"trainval": [100, 25, 31, 9], "test": [1000, 5]}  # ids sorted as text
COCO_INSTANCES_WEIGHTS = {
    # image id: (size weight per class, sum over its instances of 1/d per class), d from
    # the box centre (x + w/2, y + h/2) to the image centre, 0 counted as 0.0005
    9: ([0.4, 0.6, 0.0], [1 / 30 + 1 / 50, 1 / 1025**0.5, 0.0]),
    25: ([0.5, 0.375, 0.125], [1 / 20, 1 / 1250**0.5, 1 / 0.0005]),
    100: ([0.0, 1.0, 0.0], [0.0, 1 / 656**0.5, 0.0]),  # (5, 4) to (25, 20)
    31: ([0.0, 0.0, 0.0], [1 / (12 * 2**0.5), 0.0, 1 / (18 * 2**0.5)]),  # no area at all
    1000: ([0.5, 0.5, 0.0], [1 / 1250**0.5, 1 / 1250**0.5, 0.0]),
    5: ([0.75, 0.0, 0.25], [1 / 25, 0.0, 1 / 5725**0.5]),  # (125, 50), (25, 60) to (100, 50)
}


# Crowdsourced clicks on the val2014 images of COCO_INSTANCES, per click file: (image id,
# category id, x, y) with x, y fractions of the image's width and height.
COCO_CLICKS = {
    "crowdsourcing_annotate_category_val2014.json": [
        (5, 18, 0.125, 0.6),  # (25, 60): in the dog box (the release's reading: not)
        (5, 1, 0.6, 0.5),  # (120, 50): in the person box (the release's reading: not)
        (5, 1, 0.1, 0.1),  # (20, 10): outside
        (1000, 3, 0.75, 0.75),  # (75, 75): in the car box
        (1000, 1, 0.9, 0.1),  # (90, 10): outside the person box
        (42, 3, 0.5, 0.5),  # an image without boxes
    ],
    "crowdsourcing_instance_spotting_val2014.json": [
        (1000, 1, 0.2, 0.2),  # (20, 20): in the person box
        (1000, 3, 0.1, 0.9),  # (10, 90): outside the car box
        (5, 18, 0.1, 0.55),  # (20, 55): in the dog box
        (5, 18, 0.9, 0.9),  # (180, 90): outside
    ],
}
# good / total as the release counts them (an image listed once per click made for the
# class, every click on it counted in the total), then the mean of the two files:
# annotate: person 2/8, car 1/3, dog 1/3; spotting: person 1/2, car 0/2, dog 2/4.
COCO_CLICK_WEIGHTS = {
    "crowdsourcing_annotate_category_val2014.json": [2 / 8, 1 / 3, 1 / 3],
    "crowdsourcing_instance_spotting_val2014.json": [1 / 2, 0.0, 2 / 4],
}
COCO_CLASS_WEIGHTS = [(2 / 8 + 1 / 2) / 2, (1 / 3 + 0.0) / 2, (1 / 3 + 2 / 4) / 2]


def write_clicks(folder: Path, clicks: dict = COCO_CLICKS) -> Path:
    """The click files as the COCO crowdsourcing release lays them out: JSON lists of
    objects with im_id, cat_id, x, y (and keys the reader ignores)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in clicks.items():
        records = [
            {"im_id": i, "cat_id": c, "x": x, "y": y, "worker": n}
            for n, (i, c, x, y) in enumerate(rows)
        ]
        (folder / name).write_text(json.dumps(records))
    return folder
