"""Users' own data (``spl data prepare custom``): an image folder and a CSV with one row per
image, its class names and optionally its split and verified negatives. Importable from
:mod:`spl.data.sources` too, beside the readers of the published layouts.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from spl.data.common import SplError, safe_relative
from spl.data.prepared import RawDataset
from spl.data.sampling import check_fraction
from spl.data.sources import _read_text, _require

CUSTOM_COLUMNS = ("image", "labels", "split", "negatives")
CUSTOM_LAYOUT = (
    "an image folder (--source) and a CSV (--csv) with a header row and the columns "
    "'image' (path relative to the image folder), 'labels' (class names separated by ';', "
    "may be empty), optionally 'split' (train or test) and 'negatives' (classes verified "
    "absent, separated by ';'; with it, a class in neither column is unknown)"
)


def _csv_records(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank records of a CSV, each with the line it starts on (a quoted field may
    span lines, so the reader's own count is the line a record ends on)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    records: list[tuple[int, list[str]]] = []
    end = 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields:
                records.append((start, fields))
    except csv.Error as exc:
        raise SplError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from exc
    return records


def _custom_header(csv_path: Path, line_no: int, fields: list[str]) -> list[str]:
    """The CSV's columns; an unknown or repeated one is refused rather than ignored (a
    'Split' column ignored would give a random split instead of the user's)."""
    header = [f.strip() for f in fields]
    where = f"{csv_path}, line {line_no}"
    for index, column in enumerate(header):
        if column not in CUSTOM_COLUMNS:
            hint = " (an empty name: drop the trailing ',')" if not column else ""
            raise SplError(
                f"{where}: unknown column {column!r}{hint}; the valid columns are "
                f"{', '.join(CUSTOM_COLUMNS)} (lower-case, and the first row must be the "
                f"header). Expected {CUSTOM_LAYOUT}"
            )
        if column in header[:index]:
            raise SplError(f"{where}: column {column!r} appears twice in the header")
    for column in ("image", "labels"):
        if column not in header:
            raise SplError(
                f"{csv_path}: missing column {column!r} (header is {header}). "
                f"Expected {CUSTOM_LAYOUT}"
            )
    return header


def _custom_fields(where: str, header: list[str], fields: list[str]) -> dict[str, str]:
    """One row's fields by column; a row with more or fewer fields than the header is
    refused (extra fields were once dropped, taking the labels after a ',' with them)."""
    if len(fields) > len(header):
        raise SplError(
            f"{where}: {len(fields)} fields but the header has {len(header)} "
            f"({', '.join(header)}); separate several labels with ';' within one field, "
            "e.g. img.png,cat;dog (and quote a field that holds a comma)"
        )
    if len(fields) < len(header):
        image = fields[header.index("image")] if header.index("image") < len(fields) else ""
        example = {"image": image.strip() or "img.png", "labels": "", "split": "train",
                   "negatives": ""}  # fmt: skip
        plural = "field" if len(fields) == 1 else "fields"
        raise SplError(
            f"{where}: {len(fields)} {plural} but the header has {len(header)} "
            f"({', '.join(header)}); write every field, leaving one empty rather than out: "
            f"{','.join(example[c] for c in header)!r} is an image with no positive label"
        )
    return dict(zip(header, fields, strict=True))


def read_custom(
    source: Path,
    csv_path: Path,
    *,
    name: str = "custom",
    test_fraction: float = 0.2,
    seed: int = 0,
    classes_file: Path | None = None,
) -> RawDataset:
    """Users' own data: one CSV row per image; the split column, or a seeded random split.

    Every row names a distinct image (after normalising the path): a repeat, above all one
    in both train and test, is refused. With a ``negatives`` column the labels are partial:
    ``labels`` are verified positives, ``negatives`` verified negatives, anything else
    unknown (a class in both columns of a row is refused).
    """
    _require(source, CUSTOM_LAYOUT)
    _require(csv_path, CUSTOM_LAYOUT)
    records = _csv_records(csv_path)
    if not records:
        raise SplError(f"{csv_path}: empty file. Expected {CUSTOM_LAYOUT}")
    header = _custom_header(csv_path, *records[0])
    partial = "negatives" in header
    rows = records[1:]
    if not rows:
        raise SplError(f"{csv_path}: no image rows")
    paths, names, negative_names, splits = _custom_rows(csv_path, header, rows)
    lines = [line_no for line_no, _ in rows]
    classes = _custom_classes(csv_path, lines, names, negative_names, classes_file)
    column = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(rows), len(classes)), dtype=np.int8 if partial else np.uint8)
    for r, (row_names, row_negatives) in enumerate(zip(names, negative_names, strict=True)):
        matrix[r, [column[n] for n in row_names]] = 1
        if row_negatives:
            matrix[r, [column[n] for n in row_negatives]] = -1
    if splits:
        is_test = np.array([s == "test" for s in splits])
    else:
        check_fraction(test_fraction, "--test-fraction")
        rng = np.random.RandomState(seed)
        n_test = int(round(test_fraction * len(rows)))
        is_test = np.zeros(len(rows), dtype=bool)
        is_test[rng.permutation(len(rows))[:n_test]] = True
    images = {
        "trainval": [p for p, t in zip(paths, is_test, strict=True) if not t],
        "test": [p for p, t in zip(paths, is_test, strict=True) if t],
    }
    labels = {"trainval": matrix[~is_test], "test": matrix[is_test]}
    return RawDataset(
        name, classes, source, images, labels, None, f"{source} + {csv_path}", partial=partial
    )


def _custom_rows(
    csv_path: Path, header: list[str], rows: list[tuple[int, list[str]]]
) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """Each row's image path, positive and negative class names, and split (the list of
    splits is empty without a split column). A path listed twice, a bad split or a class
    both present and absent in a row is refused, naming the line."""
    paths, names, negative_names, splits = [], [], [], []
    first: dict[str, tuple[int, str]] = {}  # normalised path -> (line, split)
    for line_no, fields in rows:
        where = f"{csv_path}, line {line_no}"
        row = _custom_fields(where, header, fields)
        path = safe_relative(row["image"], where)
        split = row["split"].strip().lower() if "split" in header else ""
        if "split" in header and split not in ("train", "test"):
            raise SplError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
        if path in first:
            earlier, earlier_split = first[path]
            leak = (
                " (once for train, once for test: the test set would leak into training)"
                if earlier_split != split
                else ""
            )
            raise SplError(
                f"{csv_path}: image {path!r} is listed twice, on lines {earlier} and {line_no}"
                f"{leak}; give each image one row, its labels joined with ';'"
            )
        first[path] = (line_no, split)
        paths.append(path)
        names.append(_class_names(row["labels"]))
        negative_names.append(_class_names(row.get("negatives", "")))
        both = sorted(set(names[-1]) & set(negative_names[-1]))
        if both:
            raise SplError(
                f"{where}: class {both[0]!r} is both in 'labels' (present) and in "
                "'negatives' (absent); keep it in one of the two"
            )
        if split:
            splits.append(split)
    return paths, names, negative_names, splits


def _custom_classes(
    csv_path: Path,
    lines: list[int],
    names: list[list[str]],
    negative_names: list[list[str]],
    classes_file: Path | None,
) -> list[str]:
    """The classes: those of ``classes_file`` in its order (a row naming another is
    refused), else every name the rows use, sorted."""
    if classes_file is not None:
        if not Path(classes_file).is_file():
            raise SplError(f"--classes {classes_file} not found (one class name per line)")
        classes = [c.strip() for c in _read_text(Path(classes_file)).splitlines() if c.strip()]
        known = set(classes)
        for line_no, row_names, row_negatives in zip(lines, names, negative_names, strict=True):
            unknown = [n for n in row_names + row_negatives if n not in known]
            if unknown:
                raise SplError(
                    f"{csv_path}, line {line_no}: class {unknown[0]!r} is not in {classes_file}"
                )
    else:
        classes = sorted({n for row_names in names + negative_names for n in row_names})
    if not classes:
        raise SplError(f"{csv_path}: no class names in the 'labels' column")
    return classes


def _class_names(field: str) -> list[str]:
    return [n.strip() for n in field.split(";") if n.strip()]
