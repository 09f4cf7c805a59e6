"""Readers of the raw dataset layouts, each giving rows in the reference formatting's order.

Every reader returns a :class:`RawDataset` whose image paths are relative to
``image_root`` (the ``--source`` folder), so a prepared dataset can move with its images.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spl.data import protocol
from spl.data.common import SplError, safe_relative
from spl.data.prepared import RawDataset

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip

# The 81 NUS-WIDE concepts in the order of the dataset's Concepts81.txt (alphabetical).
NUS_CLASSES = [
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings",
    "cars", "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing",
    "dog", "earthquake", "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost",
    "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants",
    "police", "protest", "railroad", "rainbow", "reflection", "road", "rocks", "running",
    "sand", "sign", "sky", "snow", "soccer", "sports", "statue", "street", "sun", "sunset",
    "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town", "toy", "train", "tree",
    "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra",
]  # fmt: skip

# Expected positives per image k used by EPR/ROLE (docs/protocol.md section 2).
PAPER_EXPECTED_POSITIVES = protocol.EXPECTED_POSITIVES


def _require(path: Path, layout: str) -> Path:
    if not path.exists():
        raise SplError(f"{path} not found. Expected layout: {layout}")
    return path


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _read_text(path: Path) -> str:
    """A raw text file as UTF-8 (a leading byte-order mark is dropped); a byte that is not
    UTF-8 is refused naming the file and line, where a bare UnicodeDecodeError names neither."""
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise SplError(
            f"{path}, line {line}: byte 0x{data[offset]:02x} is not UTF-8; the file must be "
            "UTF-8 (or plain ASCII) text: re-save it as UTF-8"
        ) from None


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SplError(f"{where}: expected an integer id, got {text!r}") from None


# --------------------------------------------------------------------------- VOC 2012

VOC_LAYOUT = (
    "RAW_DIR/VOC2012/ImageSets/Main/<class>_{train,val}.txt and RAW_DIR/VOC2012/JPEGImages/ "
    "(RAW_DIR may also be the VOCdevkit folder's parent)"
)


def read_voc12(source: Path) -> RawDataset:
    """VOC 2012: `train` lists are the training file, `val` lists the test file.

    Parity: a label is positive only where the list says 1 (0 = difficult, -1 count as
    negative); images with no positive are left out; rows sorted by file name.
    """
    base = _first_existing([source / "VOC2012", source / "VOCdevkit" / "VOC2012"])
    if base is None:
        _require(source / "VOC2012", VOC_LAYOUT)
    assert base is not None
    main = _require(base / "ImageSets" / "Main", VOC_LAYOUT)
    jpegs = _require(base / "JPEGImages", VOC_LAYOUT)
    rel_jpegs = jpegs.relative_to(source).as_posix()
    images, labels = {}, {}
    for src, phase in (("trainval", "train"), ("test", "val")):
        positives: dict[str, set[int]] = {}
        for index, name in enumerate(VOC_CLASSES):
            path = _require(main / f"{name}_{phase}.txt", VOC_LAYOUT)
            for line_no, line in enumerate(_read_text(path).splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or fields[1] not in ("1", "0", "-1"):
                    raise SplError(
                        f"{path}, line {line_no}: expected '<image id> <1|0|-1>', got {line!r}"
                    )
                ids = positives.setdefault(fields[0], set())
                if fields[1] == "1":
                    ids.add(index)
        ids = sorted(i for i, pos in positives.items() if pos)
        matrix = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.uint8)
        for row, image_id in enumerate(ids):
            matrix[row, sorted(positives[image_id])] = 1
        images[src] = [f"{rel_jpegs}/{i}.jpg" for i in ids]
        labels[src] = matrix
    return RawDataset(
        "voc12",
        list(VOC_CLASSES),
        source,
        images,
        labels,
        PAPER_EXPECTED_POSITIVES["voc12"],
        str(source),
    )


# --------------------------------------------------------------------------- COCO 2014

COCO_LAYOUT = (
    "RAW_DIR/annotations/instances_{train,val}2014.json with RAW_DIR/train2014/ and "
    "RAW_DIR/val2014/"
)


def read_coco14(source: Path) -> RawDataset:
    """COCO 2014: class index = position in `categories`; rows = annotated image ids.

    Parity: every annotation counts (crowd instances too); rows are the distinct image ids
    of the annotations sorted by the id *as a decimal string* (so 100 precedes 25).
    """
    images, labels, classes = {}, {}, None
    for src, phase in (("trainval", "train2014"), ("test", "val2014")):
        path = _require(source / "annotations" / f"instances_{phase}.json", COCO_LAYOUT)
        _require(source / phase, COCO_LAYOUT)
        data = read_coco_json(path)
        categories = _coco_entries(data, path, "categories", {"id": "id", "name": "string"})
        category_ids = [cid for cid, _ in categories]
        names = [name for _, name in categories]
        file_names = dict(_coco_entries(data, path, "images", {"id": "id", "file_name": "string"}))
        pairs = _coco_entries(data, path, "annotations", {"image_id": "id", "category_id": "id"})
        if classes is None:
            classes = names
        elif names != classes:
            raise SplError(f"{path}: categories differ from the training file's")
        column = {cid: i for i, cid in enumerate(category_ids)}
        ids = sorted({image_id for image_id, _ in pairs}, key=str)
        row = {image_id: r for r, image_id in enumerate(ids)}
        matrix = np.zeros((len(ids), len(classes)), dtype=np.uint8)
        for image_id, category_id in pairs:
            if category_id not in column:
                raise SplError(f"{path}: annotation with unknown category_id {category_id}")
            matrix[row[image_id], column[category_id]] = 1
        missing = [i for i in ids if i not in file_names]
        if missing:
            raise SplError(f"{path}: image id {missing[0]} is annotated but not in 'images'")
        images[src] = [
            safe_relative(f"{phase}/{file_names[i]}", f"{path} (image id {i})") for i in ids
        ]
        labels[src] = matrix
    assert classes is not None
    return RawDataset(
        "coco14", classes, source, images, labels, PAPER_EXPECTED_POSITIVES["coco14"], str(source)
    )


def read_json(path: Path) -> object:
    """A JSON file read as UTF-8 text (:func:`_read_text`), invalid JSON named with its file."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise SplError(f"{path} is not valid JSON: {exc}") from exc


def read_coco_json(path: Path) -> dict:
    """A COCO instances file: a JSON object with 'images', 'annotations' and 'categories'
    (each entry's fields are checked by :func:`_coco_entries` as they are read)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise SplError(
            f"{path}: the top level is {_json_kind(data)}, expected a JSON object with "
            "'images', 'annotations' and 'categories' (is this a COCO instances file?)"
        )
    for key in ("categories", "annotations", "images"):
        if key not in data:
            raise SplError(f"{path}: missing key {key!r} (is this a COCO instances file?)")
    return data


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"))  # fmt: skip
    return next((text for kind, text in kinds if isinstance(value, kind)), type(value).__name__)


def _coco_entries(data: dict, path: Path, key: str, fields: dict[str, str]) -> list[tuple]:
    """The ``fields`` of every entry of ``data[key]``, in order, each checked: a malformed
    entry is named by its index rather than ending in a TypeError deep in the reader.

    A field is an ``"id"`` (a JSON integer; a string is let through as the old reader did),
    a ``"string"``, a ``"number"`` (finite) or a ``"box"`` (a list of four finite numbers).
    """
    entries = data[key]
    if not isinstance(entries, list):
        raise SplError(f"{path}: {key!r} must be a list of objects, got {_json_kind(entries)}")
    return _json_entries(entries, f"{path}: {key}", fields)


def _json_entries(entries: list, where: str, fields: dict[str, str]) -> list[tuple]:
    """The ``fields`` of every object of the JSON list ``entries`` (see :func:`_coco_entries`);
    ``where`` names the list in errors, each entry by its index (``where[3]``)."""
    out = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise SplError(
                f"{at} is {_json_kind(entry)}, expected an object with the keys "
                f"{', '.join(map(repr, fields))}"
            )
        values = []
        for field, kind in fields.items():
            if field not in entry:
                raise SplError(f"{at} lacks the key {field!r}")
            value = entry[field]
            ok, expected = _JSON_KINDS[kind](value)
            if not ok:
                non_finite = isinstance(value, float) and not math.isfinite(value)
                got = repr(value) if non_finite else _json_kind(value)
                raise SplError(f"{at}: {field!r} must be {expected}, got {got}")
            values.append(value)
        out.append(tuple(values))
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_JSON_KINDS: dict[str, Callable[[object], tuple[bool, str]]] = {
    "id": lambda v: (isinstance(v, (int, str)) and not isinstance(v, bool), "an integer id"),
    "string": lambda v: (isinstance(v, str), "a string"),
    "number": lambda v: (_is_number(v), "a finite number"),
    "box": lambda v: (
        isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
        "a list of four finite numbers [x, y, width, height]",
    ),
}


# --------------------------------------------------------------------------- NUS-WIDE

NUS_LAYOUT = (
    "RAW_DIR/formatted_{train,val}_{images,labels}.npy (the lists the paper's authors "
    "distribute) and the RAW_DIR/Flickr/ image folder; optional RAW_DIR/Concepts81.txt"
)


def read_nuswide(source: Path) -> RawDataset:
    """NUS-WIDE with the authors' 150,000 / 60,260 lists; images without a positive are kept."""
    _require(source / "Flickr", NUS_LAYOUT)
    images, labels = {}, {}
    for src, phase in (("trainval", "train"), ("test", "val")):
        image_file = _require(source / f"formatted_{phase}_images.npy", NUS_LAYOUT)
        label_file = _require(source / f"formatted_{phase}_labels.npy", NUS_LAYOUT)
        paths = np.load(image_file, allow_pickle=False)
        matrix = np.load(label_file, allow_pickle=False)
        if matrix.ndim != 2 or len(paths) != matrix.shape[0]:
            raise SplError(
                f"{label_file}: shape {matrix.shape} does not match {len(paths)} images in "
                f"{image_file}"
            )
        if not np.isin(matrix, (0, 1)).all():
            raise SplError(f"{label_file}: labels must be 0/1")
        rel = []
        for row, path in enumerate(paths):
            text = safe_relative(str(path), f"{image_file}, row {row}")
            # The distributed lists name images relative to Flickr/ in some releases.
            if not text.startswith("Flickr/"):
                text = f"Flickr/{text}"
            rel.append(text)
        images[src], labels[src] = rel, matrix.astype(np.uint8)
    concepts = source / "Concepts81.txt"
    classes = (
        [c.strip() for c in _read_text(concepts).split() if c.strip()]
        if concepts.exists()
        else list(NUS_CLASSES)
    )
    if len(classes) != labels["trainval"].shape[1]:
        raise SplError(
            f"NUS-WIDE labels have {labels['trainval'].shape[1]} columns but "
            f"{len(classes)} concept names"
        )
    return RawDataset(
        "nuswide", classes, source, images, labels, PAPER_EXPECTED_POSITIVES["nuswide"], str(source)
    )


# --------------------------------------------------------------------------- CUB-200-2011

CUB_LAYOUT = (
    "RAW_DIR/CUB_200_2011/ (or RAW_DIR itself) holding images.txt, train_test_split.txt, "
    "images/, attributes/image_attribute_labels.txt and attributes.txt (or "
    "attributes/attributes.txt)"
)


def read_cub(source: Path) -> RawDataset:
    """CUB attributes: images.txt order, split by is_train; labels = `is_present` (312)."""
    base = source / "CUB_200_2011" if (source / "CUB_200_2011").is_dir() else source
    images_txt = _require(base / "images.txt", CUB_LAYOUT)
    split_txt = _require(base / "train_test_split.txt", CUB_LAYOUT)
    labels_txt = _require(base / "attributes" / "image_attribute_labels.txt", CUB_LAYOUT)
    names_txt = _first_existing([base / "attributes.txt", base / "attributes" / "attributes.txt"])
    if names_txt is None:
        _require(base / "attributes.txt", CUB_LAYOUT)
    assert names_txt is not None
    prefix = (base / "images").relative_to(source).as_posix()
    ids, paths = [], {}
    for line_no, line in enumerate(_read_text(images_txt).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{images_txt}, line {line_no}"
        if len(fields) != 2:
            raise SplError(f"{where}: expected '<image id> <path>'")
        image_id = _int(fields[0], where)
        ids.append(image_id)
        paths[image_id] = safe_relative(f"{prefix}/{fields[1]}", where)
    is_train = {}
    for line_no, line in enumerate(_read_text(split_txt).splitlines(), 1):
        fields = line.split()
        if fields:
            where = f"{split_txt}, line {line_no}"
            if len(fields) != 2 or fields[1] not in ("0", "1"):
                raise SplError(f"{where}: expected '<image id> <0|1>'")
            is_train[_int(fields[0], where)] = fields[1] == "1"
    names = []
    for line in _read_text(names_txt).splitlines():
        fields = line.split(maxsplit=1)
        if fields:
            names.append(fields[1] if len(fields) > 1 else fields[0])
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    matrix = np.zeros((len(ids), len(names)), dtype=np.uint8)
    for line_no, line in enumerate(_read_text(labels_txt).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        # The released file has a few lines with an extra column; the first three fields
        # (image id, attribute id, is_present) are what counts; certainty is ignored.
        if len(fields) < 3:
            raise SplError(
                f"{labels_txt}, line {line_no}: expected '<image id> <attribute id> "
                f"<is_present> <certainty> <time>'"
            )
        where = f"{labels_txt}, line {line_no}"
        image_id, attribute, present = _int(fields[0], where), _int(fields[1], where), fields[2]
        if image_id not in row_of or not 1 <= attribute <= len(names):
            raise SplError(
                f"{labels_txt}, line {line_no}: image {image_id} or attribute {attribute} "
                "is not in images.txt / the attribute list"
            )
        if present == "1":
            matrix[row_of[image_id], attribute - 1] = 1
    missing = [i for i in ids if i not in is_train]
    if missing:
        raise SplError(f"{split_txt}: no split entry for image id {missing[0]}")
    train_mask = np.array([is_train[i] for i in ids])
    images = {
        "trainval": [paths[i] for i, t in zip(ids, train_mask, strict=True) if t],
        "test": [paths[i] for i, t in zip(ids, train_mask, strict=True) if not t],
    }
    labels = {"trainval": matrix[train_mask], "test": matrix[~train_mask]}
    return RawDataset(
        "cub", names, source, images, labels, PAPER_EXPECTED_POSITIVES["cub"], str(source)
    )


READERS: dict[str, Callable[[Path], RawDataset]] = {
    "voc12": read_voc12,
    "coco14": read_coco14,
    "nuswide": read_nuswide,
    "cub": read_cub,
}


def check_images_exist(raw: RawDataset, limit: int = 5) -> None:
    """Refuse a dataset whose listed images are missing, naming the first few."""
    missing = []
    for src in ("trainval", "test"):
        for row, rel in enumerate(raw.images[src]):
            if not (raw.image_root / rel).is_file():
                missing.append(f"{src} row {row}: {raw.image_root / rel}")
    if missing:
        shown = "\n  ".join(missing[:limit])
        raise SplError(
            f"{len(missing)} listed images are missing under {raw.image_root}, e.g.\n  {shown}\n"
            "Fix the image folder, or pass --allow-missing to prepare anyway "
            "(then `spl extract --skip-bad` records and skips them)"
        )


# The custom CSV reader (spl.data.custom) reads files through this module's helpers; its
# public names are importable from here too, imported on first use (PEP 562), so that
# neither module needs the other loaded first.
_CUSTOM_NAMES = frozenset({"CUSTOM_COLUMNS", "CUSTOM_LAYOUT", "read_custom"})


def __getattr__(name: str) -> Any:
    if name in _CUSTOM_NAMES:
        from spl.data import custom

        return getattr(custom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
