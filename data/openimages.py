"""OpenImages V6's human-verified image-level labels: a real partially labelled dataset.

Each image has a few labels a person verified as present (Confidence 1) or absent
(Confidence 0); every other class is unknown. The training file has about 19 M rows
(1.2 GB) for 1.7 M images and 9,605 trainable classes, so the annotation files are
streamed: memory grows with the verified labels kept (a few bytes each, plus one entry per
image of an id-to-row table), never with the rows x classes matrix.
"""

from __future__ import annotations

import csv
import re
from array import array
from pathlib import Path

import numpy as np

from spl.data.common import SplError
from spl.data.labels import CSR
from spl.data.prepared import RawDataset

DESCRIPTIONS = "oidv6-class-descriptions.csv"
TRAINABLE = "oidv6-classes-trainable.txt"
ANNOTATIONS = {
    "train": "oidv6-train-annotations-human-imagelabels.csv",
    "validation": "validation-annotations-human-imagelabels.csv",
    "test": "test-annotations-human-imagelabels.csv",
}
TEST_SPLITS = ("validation", "test")
COLUMNS = ("ImageID", "LabelName", "Confidence")  # Source is read past
LAYOUT = (
    f"RAW_DIR/{DESCRIPTIONS} (LabelName,DisplayName), RAW_DIR/{TRAINABLE} (one LabelName a "
    f"line), RAW_DIR/{ANNOTATIONS['train']}, RAW_DIR/{ANNOTATIONS['validation']} and "
    f"RAW_DIR/{ANNOTATIONS['test']} (ImageID,Source,LabelName,Confidence), images as "
    "RAW_DIR/{train,validation,test}/<ImageID>.jpg"
)
NO_LABEL = "no verified label"
NO_POSITIVE = "no verified positive"
_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]+")


def read_openimages(
    source: Path, *, classes_file: Path | None = None, test_split: str = "validation"
) -> RawDataset:
    """OpenImages V6: ``trainval`` is the training file, ``test`` the validation file (or
    with ``test_split="test"`` the test file); classes are the trainable ones (or the
    LabelNames of ``classes_file``, in its order), named by their DisplayName.

    Labels are partial: +1 verified positive, -1 verified negative, 0 unknown; a
    LabelName outside the chosen classes is not used. Images with no verified label on the
    chosen classes are left out of both files, and training images with no verified
    positive too: every single-positive method needs one observed positive per image
    (test keeps them: their verified negatives count in each class's AP). Both are
    counted in the RawDataset's ``dropped``. Rows are sorted by ImageID.
    """
    if test_split not in TEST_SPLITS:
        raise SplError(f"--test-split must be one of {', '.join(TEST_SPLITS)}; got {test_split!r}")
    paths = {key: _required(source / name) for key, name in ANNOTATIONS.items()}
    descriptions = read_descriptions(_required(source / DESCRIPTIONS))
    list_file = Path(classes_file) if classes_file is not None else _required(source / TRAINABLE)
    class_ids = read_class_list(list_file, descriptions, option=classes_file is not None)
    classes = display_names(class_ids, descriptions)
    column = {label: index for index, label in enumerate(class_ids)}
    images, labels, dropped = {}, {}, {}
    for src, phase in (("trainval", "train"), ("test", test_split)):
        ids, matrix, unverified = read_annotations(paths[phase], column, descriptions)
        dropped[src] = {NO_LABEL: unverified}
        if src == "trainval":
            has_positive = matrix.count_per_row(1) > 0
            dropped[src][NO_POSITIVE] = int((~has_positive).sum())
            keep = np.flatnonzero(has_positive)
            ids, matrix = [ids[r] for r in keep], matrix.take(keep)
        images[src] = [f"{phase}/{image_id}.jpg" for image_id in ids]
        labels[src] = matrix
    return RawDataset(
        "openimages",
        classes,
        source,
        images,
        labels,
        None,
        str(source),
        partial=True,
        class_ids=class_ids,
        dropped=dropped,
    )


def _required(path: Path) -> Path:
    if not path.is_file():
        raise SplError(f"{path} not found. Expected layout: {LAYOUT}")
    return path


def _open_csv(path: Path):
    """A CSV file as text: UTF-8 (a byte-order mark dropped), newlines as the csv module
    wants them."""
    return open(path, encoding="utf-8-sig", newline="")


def _rows(path: Path, reader):
    """The reader's rows with their line numbers; invalid CSV or a byte that is not UTF-8
    is refused naming the line."""
    try:
        for fields in reader:
            yield reader.line_num, fields
    except csv.Error as exc:
        raise SplError(f"{path}, line {reader.line_num + 1}: not valid CSV ({exc})") from None
    except UnicodeDecodeError:
        raise SplError(
            f"{path}, near line {reader.line_num + 1}: a byte is not UTF-8; the file must be "
            "UTF-8 text (re-download it)"
        ) from None


def read_descriptions(path: Path) -> dict[str, str]:
    """LabelName -> DisplayName; the header row ``LabelName,DisplayName`` is optional."""
    out: dict[str, str] = {}
    with _open_csv(path) as handle:
        for line, fields in _rows(path, csv.reader(handle)):
            if not fields:
                continue
            if line == 1 and fields[0].strip() == "LabelName":
                continue
            if len(fields) != 2 or not fields[0].strip():
                raise SplError(
                    f"{path}, line {line}: expected 'LabelName,DisplayName', got {','.join(fields)!r}"
                )
            label = fields[0].strip()
            if label in out:
                raise SplError(f"{path}, line {line}: LabelName {label} is described twice")
            out[label] = fields[1].strip()
    if not out:
        raise SplError(f"{path}: no class descriptions. Expected layout: {LAYOUT}")
    return out


def read_class_list(path: Path, descriptions: dict[str, str], *, option: bool) -> list[str]:
    """The chosen classes: one LabelName a line, each described, none twice."""
    if option and not path.is_file():
        raise SplError(f"--classes {path} not found (one OpenImages LabelName a line)")
    classes: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, 1):
            label = text.strip()
            if not label:
                continue
            if label not in descriptions:
                raise SplError(
                    f"{path}, line {line}: class {label!r} is not in {DESCRIPTIONS} (an "
                    "OpenImages LabelName such as /m/01g317 is expected)"
                )
            if label in seen:
                raise SplError(
                    f"{path}, line {line}: class {label} is listed again (line {seen[label]})"
                )
            seen[label] = line
            classes.append(label)
    if not classes:
        raise SplError(f"{path}: no classes listed")
    return classes


def display_names(class_ids: list[str], descriptions: dict[str, str]) -> list[str]:
    """Each class's DisplayName; a name two chosen classes share gets its LabelName added,
    so that class names stay unique."""
    names = [descriptions[label] for label in class_ids]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [
        f"{name} ({label})" if counts[name] > 1 else name
        for name, label in zip(names, class_ids, strict=True)
    ]


def read_annotations(
    path: Path, column: dict[str, int], descriptions: dict[str, str]
) -> tuple[list[str], CSR, int]:
    """Stream one human-imagelabels file into (ImageIDs sorted, their labels as a CSR
    over the chosen classes, images with no verified label on them).

    Refused, naming the file and line: a missing column, a malformed line, a LabelName
    that is not described, a Confidence other than 0 or 1, a bad ImageID, and an (image,
    class) pair labelled twice with different confidences. A repeat that agrees is kept once.
    """
    codes: dict[str, int] = {}  # ImageID -> its number in order of first sight
    # Five bytes a kept row (image number, class, +1/-1), in arrays that grow in place.
    image_code, label_column, value = array("i"), array("i"), array("b")
    last_image, last_code = None, -1
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        rows = _rows(path, reader)
        header = next(((line, fields) for line, fields in rows if fields), None)
        if header is None:
            raise SplError(f"{path}: empty file. Expected layout: {LAYOUT}")
        names = [name.strip() for name in header[1]]
        for name in COLUMNS:
            if name not in names:
                raise SplError(
                    f"{path}, line {header[0]}: missing column {name!r} (header is "
                    f"{','.join(names)}); expected ImageID,Source,LabelName,Confidence"
                )
        at_image, at_label, at_confidence = (names.index(name) for name in COLUMNS)
        width = len(names)
        # The hot loop: ~19 M rows for the training file; line numbers are only looked up
        # (reader.line_num) when a row is refused.
        for fields in _records(path, reader):
            if len(fields) != width:
                if not fields:
                    continue
                raise SplError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields where the header "
                    f"has {width} ({','.join(names)})"
                )
            image = fields[at_image]
            if image != last_image:
                code = codes.get(image)
                if code is None:
                    if not _IMAGE_ID.fullmatch(image):
                        raise SplError(
                            f"{path}, line {reader.line_num}: ImageID {image!r} is not an id "
                            "(letters, digits, '_' and '-' only)"
                        )
                    code = codes[image] = len(codes)
                last_image, last_code = image, code
            label = fields[at_label]
            index = column.get(label)
            if index is None:
                if label not in descriptions:
                    raise SplError(
                        f"{path}, line {reader.line_num}: unknown class {label!r}: it is not "
                        f"in {DESCRIPTIONS}"
                    )
                continue
            confidence = fields[at_confidence]
            if confidence == "1":
                value.append(1)
            elif confidence == "0":
                value.append(-1)
            else:
                value.append(_confidence(confidence, path, reader.line_num))
            image_code.append(last_code)
            label_column.append(index)
    staged = [image_code, label_column, value]
    del image_code, label_column, value
    return _assemble(path, codes, column, staged)


def _records(path: Path, reader):
    """The reader's rows, invalid CSV or a byte that is not UTF-8 refused naming the line."""
    try:
        yield from reader
    except csv.Error as exc:
        raise SplError(f"{path}, line {reader.line_num + 1}: not valid CSV ({exc})") from None
    except UnicodeDecodeError:
        raise SplError(
            f"{path}, near line {reader.line_num + 1}: a byte is not UTF-8; the file must be "
            "UTF-8 text (re-download it)"
        ) from None


def _confidence(text: str, path: Path, line: int) -> int:
    """A Confidence written otherwise than '0' or '1' (e.g. '1.0'): +1 or -1, or refused."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number == 1:
        return 1
    if number == 0:
        return -1
    raise SplError(
        f"{path}, line {line}: Confidence must be 1 (verified present) or 0 (verified "
        f"absent); got {text!r}"
    )


def _assemble(
    path: Path, codes: dict[str, int], column: dict[str, int], staged: list[array]
) -> tuple[list[str], CSR, int]:
    """Sort images by id, resolve repeated (image, class) pairs, build the CSR; the staged
    arrays and the id table are released as soon as they are used."""
    ids = list(codes)
    codes.clear()
    # ImageIDs are ASCII (checked as read): as bytes they sort as text, in 1/4 the memory.
    order = np.argsort(np.array(ids, dtype="S"), kind="stable")
    row_of_code = np.empty(len(ids), dtype=np.int64)
    row_of_code[order] = np.arange(len(ids))
    num_classes = len(column)
    # One int64 key per entry, row-major: sorting it orders the CSR and groups repeats.
    key = row_of_code[np.frombuffer(staged[0], dtype=np.int32)]
    key *= num_classes
    key += np.frombuffer(staged[1], dtype=np.int32)
    values = np.array(staged[2], dtype=np.int8)
    staged.clear()
    by_key = np.argsort(key, kind="stable")  # repeats stay in file order
    key, values = key[by_key], values[by_key]
    del by_key
    repeat = key[1:] == key[:-1]
    if repeat.any():
        clash = np.flatnonzero(repeat & (values[1:] != values[:-1]))
        if len(clash):
            row, label = divmod(int(key[clash[0]]), num_classes)
            names = {index: name for name, index in column.items()}
            _refuse_clash(path, ids[order[row]], names[label])
        keep = np.concatenate([[True], ~repeat])
        key, values = key[keep], values[keep]
    del repeat
    counts = np.bincount(key // num_classes, minlength=len(ids))
    kept = np.flatnonzero(counts)
    indptr = np.concatenate([[0], np.cumsum(counts[kept])]).astype(np.int64)
    columns = (key % num_classes).astype(np.int32)
    del key
    matrix = CSR(indptr, columns, values, num_classes)
    return [ids[order[r]] for r in kept], matrix, int(len(ids) - len(kept))


def _refuse_clash(path: Path, image: str, label: str) -> None:
    """Name the two lines that label (image, class) differently (a second, rare pass)."""
    first: tuple[int, str] | None = None
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(fields for fields in reader if fields)]
        at_image, at_label, at_confidence = (header.index(name) for name in COLUMNS)
        for fields in reader:
            if len(fields) != len(header):
                continue
            if fields[at_image] != image or fields[at_label] != label:
                continue
            confidence = 1 if _confidence(fields[at_confidence], path, reader.line_num) == 1 else 0
            if first is None:
                first = (reader.line_num, confidence)
            elif confidence != first[1]:
                raise SplError(
                    f"{path}, line {reader.line_num}: image {image} class {label} has "
                    f"Confidence {confidence} here but {first[1]} on line {first[0]}; keep "
                    "one of the two rows"
                )
    raise AssertionError(f"{path}: no clash found on the second pass for {image} {label}")
