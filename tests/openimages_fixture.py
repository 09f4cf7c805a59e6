"""A tiny OpenImages V6 tree: the five label files of the official layout and real JPEGs.

Eight trainable classes and two described classes that are not trainable; a few dozen
images per file with a few verified labels each (the rest unknown), and the cases the
reader must get right, named in ``SPECIAL``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from rawfixtures import write_image

TRAINABLE = ["/m/01g317", "/m/0199g", "/m/0k4j", "/m/01yrx", "/m/0bt9lr", "/m/04yx4",
             "/m/03bt1vf", "/m/0jbk"]  # fmt: skip
NOT_TRAINABLE = ["/m/0cgh4", "/m/09j2d"]
DISPLAY = {
    "/m/01g317": "Person", "/m/0199g": "Bicycle", "/m/0k4j": "Car", "/m/01yrx": "Cat",
    "/m/0bt9lr": "Dog", "/m/04yx4": "Man", "/m/03bt1vf": "Woman, adult",  # a comma: quoted
    "/m/0jbk": "Animal", "/m/0cgh4": "Building", "/m/09j2d": "Clothing",
}  # fmt: skip
PHASES = {"train": 30, "validation": 12, "test": 10}
# The cases, by phase: the ImageIDs that hold them.
SPECIAL = {
    "train": {
        "no_label": "00000000000000a1",  # only a class that is not trainable: dropped
        "negatives_only": "00000000000000a2",  # verified negatives only: dropped (train)
        "repeat": "00000000000000a3",  # the same (image, class, 1) twice: kept once
    },
    "validation": {
        "no_label": "00000000000000b1",
        "negatives_only": "00000000000000b2",  # kept: its negatives count in AP
    },
    "test": {"negatives_only": "00000000000000c2"},
}


def make_openimages(root: Path, seed: int = 0) -> dict:
    """Write the tree under ``root``. Returns ``verified``: per phase, ImageID -> {LabelName:
    +1 or -1} over every described class (what the files say, repeats merged), and the
    classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    with open(root / "oidv6-class-descriptions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["LabelName", "DisplayName"])
        for label, name in DISPLAY.items():
            writer.writerow([label, name])
    (root / "oidv6-classes-trainable.txt").write_text("\n".join(TRAINABLE) + "\n")
    described = TRAINABLE + NOT_TRAINABLE
    verified: dict[str, dict[str, dict[str, int]]] = {}
    files = {
        "train": "oidv6-train-annotations-human-imagelabels.csv",
        "validation": "validation-annotations-human-imagelabels.csv",
        "test": "test-annotations-human-imagelabels.csv",
    }
    for phase, count in PHASES.items():
        special = SPECIAL.get(phase, {})
        ids = sorted({f"{rng.randint(16**8):08x}{rng.randint(16**8):08x}" for _ in range(count)})
        entries: dict[str, dict[str, int]] = {}
        for image_id in ids:
            labels = rng.choice(len(described), rng.randint(1, 5), replace=False)
            marks = {described[i]: int(rng.rand() < 0.6) for i in labels}
            marks.setdefault(TRAINABLE[rng.randint(len(TRAINABLE))], 1)  # most have a positive
            entries[image_id] = marks
        if "no_label" in special:
            entries[special["no_label"]] = {NOT_TRAINABLE[0]: 1, NOT_TRAINABLE[1]: 0}
        entries[special["negatives_only"]] = {TRAINABLE[0]: 0, TRAINABLE[3]: 0}
        if "repeat" in special:
            entries[special["repeat"]] = {TRAINABLE[1]: 1, TRAINABLE[2]: 0}
        rows = [
            [image_id, rng.choice(["verification", "crowdsource-verification"]), label, mark]
            for image_id, marks in entries.items()
            for label, mark in marks.items()
        ]
        if "repeat" in special:
            rows.append([special["repeat"], "crowdsource-verification", TRAINABLE[1], 1])
        rows = [rows[i] for i in rng.permutation(len(rows))]  # not grouped, not sorted
        with open(root / files[phase], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            writer.writerows(rows)
        for i, image_id in enumerate(entries):
            write_image(root / phase / f"{image_id}.jpg", seed=i, size=16)
        verified[phase] = {
            image_id: {label: 1 if mark else -1 for label, mark in marks.items()}
            for image_id, marks in entries.items()
        }
    return {"verified": verified, "trainable": list(TRAINABLE), "display": dict(DISPLAY),
            "files": files}  # fmt: skip


def expected_rows(
    verified: dict[str, dict[str, int]], classes: list[str], *, need_positive: bool
) -> tuple[list[str], np.ndarray]:
    """The ImageIDs a prepared file should keep (sorted) and their labels over ``classes``
    (+1, -1, 0 unknown): images with a verified label on them, and with a positive if asked."""
    ids, matrix = [], []
    for image_id in sorted(verified):
        row = [verified[image_id].get(label, 0) for label in classes]
        if not any(row) or (need_positive and 1 not in row):
            continue
        ids.append(image_id)
        matrix.append(row)
    return ids, np.array(matrix, dtype=np.int8).reshape(len(ids), len(classes))
