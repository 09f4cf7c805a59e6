"""Biased single-positive labels: the one observed positive drawn in favour of large,
central or often-clicked classes (docs/methods.md section 11; COCO 2014 only).

Each rule gives every image a weight per class (0 for the classes it does not have):

- ``size``: each instance adds ``area / (the image's total instance area)`` to its
  category, ``area`` being COCO's segmentation area (not the box's): a class is drawn in
  proportion to its total instance area in the image.
- ``location``: each instance adds ``1 / d`` to its category, ``d`` the distance from the
  centre of its box ``(x + w/2, y + h/2)`` (COCO's boxes are ``[x, y, width, height]``) to
  the image centre ``(W/2, H/2)``; ``d = 0`` counts as 0.0005.
- ``semantic``: one global weight per class, the share of good clicks on that class in
  COCO's crowdsourced click files (:func:`click_weights`, :func:`semantic_class_weights`);
  the image's positives are drawn in proportion to their class weights, uniformly
  (``random.choice``) when all of them weigh 0.

The draw is the official release's (BIAS:preproc/biased_labels.py): per source file a
generator seeded with the seed (Python's ``random``, not numpy), then one
``choices(range(L), weights=<the image's L weights>)`` per image in row order. Where the
release has a bug, spl follows the paper instead (see ``docs/biased-labels.md``): the
click files' good-click test reads COCO's boxes as ``[x, y, width, height]``.

Every function here but :func:`read_instances`, :func:`read_clicks` and
:func:`observe_biased` is pure (data in, numbers out). ``BIAS:path:line`` cites the
release (docs/methods.md section 0) as read for this module; the code here is our own.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spl.data.common import SplError, safe_relative, sha256_file
from spl.data.protocol import BIASES as ALL_BIASES
from spl.data.sources import _coco_entries, _json_entries, _json_kind, read_coco_json, read_json

BIASES = tuple(b for b in ALL_BIASES if b != "uniform")
# The source files of a prepared dataset and the COCO 2014 files they were made from.
PHASES = {"trainval": "train2014", "test": "val2014"}
# The crowdsourced click files on COCO val2014 the release's semantic weights come from,
# in the order it reads them.
CLICK_FILES = (
    "crowdsourcing_annotate_category_val2014.json",
    "crowdsourcing_instance_spotting_val2014.json",
)
ZERO_DISTANCE = 0.0005  # location: an instance centred exactly on the image centre
INSTANCES_LAYOUT = "RAW_DIR/annotations/instances_{train,val}2014.json (COCO 2014)"


@dataclass(frozen=True)
class Instance:
    """One COCO instance annotation: its class column, segmentation area and box
    ``(x, y, width, height)`` (0 where the bias does not read them)."""

    column: int
    area: float = 0.0
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


@dataclass
class InstancesFile:
    """A COCO instances file as the biased draw reads it.

    ``image_ids`` are the annotated images in the prepared dataset's row order (ids sorted
    as decimal strings, as ``read_coco14`` and the release's ``format_coco.py`` sort them);
    ``instances`` holds each image's annotations in file order; ``sizes`` each image's
    ``(width, height)`` (empty unless read).
    """

    path: Path
    phase: str
    classes: list[str]
    category_ids: list
    image_ids: list
    file_names: dict
    instances: dict[object, list[Instance]]
    sizes: dict[object, tuple[float, float]] = field(default_factory=dict)

    def positives(self, image_id) -> list[int]:
        """The image's classes (columns with at least one instance), ascending."""
        return sorted({inst.column for inst in self.instances[image_id]})


@dataclass(frozen=True)
class Click:
    """One crowdsourced click: the image, the class column it was made for, and where, as
    fractions of the image's width and height."""

    image_id: object
    column: int
    x: float
    y: float


# --------------------------------------------------------------------------- weights


def size_weights(instances: Sequence[Instance], num_classes: int) -> list[float]:
    """Per class, the sum over its instances of ``area / (all instances' area)``.

    The release's arithmetic, in its order (BIAS:preproc/biased_labels.py:110-118): the
    image's total area summed in file order, each instance's share added to its class.
    An image whose instances all have area 0 gets all-zero weights (the release stops on
    an assertion there; :func:`draw_single_positive` draws such an image uniformly).
    """
    weights = [0.0] * num_classes
    total = 0
    for inst in instances:
        total += inst.area
    if total <= 0:
        return weights
    for inst in instances:
        weights[inst.column] += inst.area / total
    return weights


def location_weights(
    instances: Sequence[Instance], width: float, height: float, num_classes: int
) -> list[float]:
    """Per class, the sum over its instances of ``1 / d`` (d: box centre to image centre,
    0 counted as 0.0005), times one constant per image.

    The constant is the release's (BIAS:preproc/biased_labels.py:83-92, 119-130):
    ``1 / sum(1 / d')`` with ``d'`` measured to ``(W, H)``, the image's bottom-right corner
    (a wrong centre; ``d' = 0`` counted as 1). It multiplies every weight of the image
    alike, so it changes no probability; it is kept so that the weights, and with them the
    draw, equal the release's to the last bit. Boxes are read as ``[x, y, width, height]``,
    as the release does here.
    """
    weights = [0.0] * num_classes
    if not instances:
        return weights
    inverse = 0
    for inst in instances:
        x, y = _box_centre(inst.box)
        d = math.sqrt((x - width) ** 2 + (y - height) ** 2)
        inverse += 1 / (d if d != 0 else 1)
    scale = 1 / inverse
    cx, cy = 0.5 * width, 0.5 * height
    for inst in instances:
        x, y = _box_centre(inst.box)
        d = math.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        weights[inst.column] += scale / (d if d != 0 else ZERO_DISTANCE)
    return weights


def _box_centre(box: Sequence[float]) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def box_contains(box: Sequence[float], x: float, y: float) -> bool:
    """Whether the point lies in the COCO box ``[x, y, width, height]`` (edges included).

    The release's good-click test reads the box as ``[x1, y1, x2, y2]`` and compares y
    with the third number (``x1 <= x <= box[2]`` and ``y1 <= y <= box[2]``,
    BIAS:preproc/semantic_distribution.py:60-65): a click is then "good" only inside a
    region that has little to do with the object. spl follows the paper: inside the box.
    """
    return box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]


def click_weights(
    clicks: Sequence[Click],
    boxes: dict[object, list[Instance]],
    sizes: dict[object, tuple[float, float]],
    num_classes: int,
) -> list[float | None]:
    """Per class, good clicks / all clicks as the release counts them (None: no click).

    The release (BIAS:preproc/semantic_distribution.py:21-33, 131-150) lists an image under
    class c once per click made for c on it, and for each listing counts every click on
    that image (made for any class) in the total, and the clicks made for c that fall in
    one of the image's boxes of c as good. With n(i) the clicks on image i, n_c(i) those
    made for c and g_c(i) the good ones among them, that is
    ``sum_i n_c(i) g_c(i) / sum_i n_c(i) n(i)``, computed so here. A click's position is
    its fractions times the image's width and height; the good test is
    :func:`box_contains` (the paper's reading of the box, not the release's).
    """
    per_image: dict[object, list[Click]] = defaultdict(list)
    for click in clicks:
        per_image[click.image_id].append(click)
    good, total = [0] * num_classes, [0] * num_classes
    for image_id, on_image in per_image.items():
        width, height = sizes[image_id]
        image_boxes = boxes.get(image_id, [])
        listed = Counter(c.column for c in on_image)
        hits = Counter(
            c.column
            for c in on_image
            if any(
                inst.column == c.column and box_contains(inst.box, width * c.x, height * c.y)
                for inst in image_boxes
            )
        )
        for column, times in listed.items():
            total[column] += times * len(on_image)
            good[column] += times * hits[column]
    return [g / t if t else None for g, t in zip(good, total, strict=True)]


def semantic_class_weights(
    per_file: dict[str, Sequence[float | None]], classes: Sequence[str]
) -> list[float]:
    """One weight per class: the mean over the click files of :func:`click_weights`.

    Every file must have clicks on every class (refused otherwise, naming the classes it
    lacks). The release pairs the two files' values by position after sorting each by
    class name (BIAS:preproc/semantic_distribution.py, after line 150), which matches
    class to class only when both files cover every class; spl pairs them by class.
    """
    for name, weights in per_file.items():
        missing = [classes[c] for c, w in enumerate(weights) if w is None]
        if missing:
            raise SplError(
                f"{name} has no click on {len(missing)} of the dataset's {len(classes)} "
                f"classes: {', '.join(missing)}; --bias semantic needs click files that "
                "cover every class"
            )
    out = []
    for column in range(len(classes)):
        value = 0.0
        for weights in per_file.values():
            value += weights[column]
        out.append(value / len(per_file))
    return out


def image_weights(
    bias: str, file: InstancesFile, num_classes: int, class_weights: Sequence[float] | None = None
) -> list[list[float]]:
    """Per row of ``file``, the image's weight for every class under ``bias``."""
    if bias == "semantic" and class_weights is None:
        raise ValueError("the semantic bias needs class weights")
    rows = []
    for image_id in file.image_ids:
        instances = file.instances[image_id]
        if bias == "size":
            rows.append(size_weights(instances, num_classes))
        elif bias == "location":
            width, height = file.sizes[image_id]
            rows.append(location_weights(instances, width, height, num_classes))
        elif bias == "semantic":
            assert class_weights is not None
            weights = [0.0] * num_classes
            for column in file.positives(image_id):
                weights[column] = class_weights[column]
            rows.append(weights)
        else:
            raise ValueError(f"unknown bias {bias!r}; expected one of {', '.join(BIASES)}")
    return rows


# --------------------------------------------------------------------------- the draw


def draw_single_positive(
    weights: Sequence[Sequence[float]], positives: Sequence[Sequence[int]], seed: int
) -> np.ndarray:
    """Observed labels ``[N, L]`` int8: per row one +1, drawn with the row's weights.

    Parity with the release (BIAS:preproc/biased_labels.py:97, 143, 160, 182-188): a
    generator seeded with ``seed`` (``random.Random(seed)`` gives the stream
    ``random.seed(seed)`` gives, without touching the global one), then per row in order
    ``choices(range(L), weights=row)[0]``, the row holding all L classes (0 for those the
    image lacks); a row whose positives all weigh 0 is drawn with ``choice(positives)``
    (positives ascending), as the release's semantic draw does. A row without positives
    stays all zero and draws nothing.
    """
    if len(weights) != len(positives):
        raise ValueError(f"{len(weights)} weight rows for {len(positives)} rows of positives")
    num_classes = len(weights[0]) if len(weights) else 0
    observed = np.zeros((len(weights), num_classes), dtype=np.int8)
    rng = random.Random(seed)
    population = range(num_classes)
    for row, (row_weights, row_positives) in enumerate(zip(weights, positives, strict=True)):
        if len(row_weights) != num_classes:
            raise ValueError(f"row {row} has {len(row_weights)} weights, expected {num_classes}")
        if not len(row_positives):
            continue
        if any(w > 0 for w in row_weights):
            column = rng.choices(population, weights=row_weights)[0]
            if column not in row_positives:  # weight on a class the image lacks
                raise ValueError(f"row {row}: drew class {column}, which the image lacks")
        else:
            column = rng.choice(list(row_positives))
        observed[row, column] = 1
    return observed


# --------------------------------------------------------------------------- files


def read_instances(
    path: Path, phase: str, *, areas: bool = False, boxes: bool = False, sizes: bool = False
) -> InstancesFile:
    """Read a COCO instances file: classes, annotated images in row order, and per image
    its instances (with their ``areas`` and ``boxes`` when asked) and ``sizes``.

    Bad input is refused as ``read_coco14`` refuses it (not UTF-8, not JSON, not a COCO
    structure, a malformed entry named by its index), and so are the numbers the draw
    reads: a negative area, a width or height that is not positive.
    """
    data = read_coco_json(path)
    categories = _coco_entries(data, path, "categories", {"id": "id", "name": "string"})
    column = {cid: c for c, (cid, _) in enumerate(categories)}
    image_fields = {"id": "id", "file_name": "string"}
    if sizes:
        image_fields.update(width="number", height="number")
    images = _coco_entries(data, path, "images", image_fields)
    file_names = {entry[0]: entry[1] for entry in images}
    image_sizes = {}
    if sizes:
        for index, (image_id, _, width, height) in enumerate(images):
            if width <= 0 or height <= 0:
                raise SplError(
                    f"{path}: images[{index}] (id {image_id}) has width {width} and height "
                    f"{height}; both must be positive"
                )
            image_sizes[image_id] = (width, height)
    fields = {"image_id": "id", "category_id": "id"}
    if areas:
        fields["area"] = "number"
    if boxes:
        fields["bbox"] = "box"
    instances: dict[object, list[Instance]] = defaultdict(list)
    for index, entry in enumerate(_coco_entries(data, path, "annotations", fields)):
        values = dict(zip(fields, entry, strict=True))
        if values["category_id"] not in column:
            raise SplError(
                f"{path}: annotations[{index}] has the unknown category_id {values['category_id']}"
            )
        area = values.get("area", 0.0)
        if area < 0:
            raise SplError(f"{path}: annotations[{index}] has a negative area {area}")
        box = tuple(values.get("bbox", (0.0, 0.0, 0.0, 0.0)))
        instances[values["image_id"]].append(Instance(column[values["category_id"]], area, box))
    image_ids = sorted(instances, key=str)
    for image_id in image_ids:
        if image_id not in file_names:
            raise SplError(f"{path}: image id {image_id} is annotated but not in 'images'")
    return InstancesFile(
        path=path,
        phase=phase,
        classes=[name for _, name in categories],
        category_ids=[cid for cid, _ in categories],
        image_ids=image_ids,
        file_names=file_names,
        instances=dict(instances),
        sizes=image_sizes,
    )


def read_clicks(path: Path, file: InstancesFile) -> list[Click]:
    """A crowdsourced click file: a JSON list of objects with ``im_id`` (a COCO image id),
    ``cat_id`` (a COCO category id), and ``x``, ``y`` (the click as fractions of the
    image's width and height); other keys are ignored. Refused: a malformed entry, an
    unknown category, an image the instances file ``file`` (val2014) does not list, a
    coordinate outside [0, 1] (pixels where fractions are expected)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise SplError(
            f"{path}: the top level is {_json_kind(data)}, expected a JSON list of clicks, "
            "each an object with 'im_id', 'cat_id', 'x' and 'y'"
        )
    fields = {"im_id": "id", "cat_id": "id", "x": "number", "y": "number"}
    column = {cid: c for c, cid in enumerate(file.category_ids)}
    clicks = []
    for index, (image_id, cat_id, x, y) in enumerate(_json_entries(data, f"{path}: entry", fields)):
        if cat_id not in column:
            raise SplError(
                f"{path}: entry[{index}] has cat_id {cat_id}, not a category of {file.path}"
            )
        if image_id not in file.sizes:
            raise SplError(
                f"{path}: entry[{index}] clicks on image id {image_id}, which {file.path} "
                "does not list (the click files are on COCO val2014)"
            )
        if not (0 <= x <= 1 and 0 <= y <= 1):
            width, height = file.sizes[image_id]
            pixels = " (pixels?)" if x > 1 or y > 1 else ""
            raise SplError(
                f"{path}: entry[{index}] (image id {image_id}, {width:g} x {height:g}) clicks at "
                f"x {x}, y {y}{pixels}; a click's x and y are fractions of the image's width "
                "and height, in [0, 1]: divide pixel coordinates by the width and the height"
            )
        clicks.append(Click(image_id, column[cat_id], x, y))
    return clicks


def clicks_digest(folder: Path) -> str:
    """SHA-256 of the click files (each file's name and SHA-256, one per line)."""
    lines = "".join(f"{name} {sha256_file(folder / name)}\n" for name in CLICK_FILES)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the set


def check_options(bias: str, num_pos: int, num_neg: int, clicks: Path | None) -> None:
    """Refuse what a biased draw cannot do, naming the option, before any file is read."""
    if bias not in BIASES:
        raise SplError(f"--bias must be one of {', '.join(ALL_BIASES)}; got {bias!r}")
    if (num_pos, num_neg) != (1, 0):
        raise SplError(
            f"--bias {bias} draws exactly one observed positive and no negative per image "
            f"(as the release does); got --num-pos {num_pos} --num-neg {num_neg}: leave "
            "them at 1 and 0"
        )
    if bias == "semantic" and clicks is None:
        raise SplError(
            "--bias semantic needs --clicks DIR, the folder holding COCO's crowdsourced "
            f"click files {' and '.join(CLICK_FILES)}"
        )
    if bias != "semantic" and clicks is not None:
        raise SplError(f"--clicks is read only by --bias semantic, not --bias {bias}")


def raw_folder(prepared, source: Path | None) -> Path:
    """The COCO folder to read: ``--source``, else the one the dataset was prepared from."""
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise SplError(f"--source {source} is not a folder")
        return source
    recorded = str(prepared.attrs.get("source", "") or "")
    if not recorded:
        raise SplError(
            f"{prepared.path} records no source folder; pass --source RAW_DIR, the folder "
            f"with {INSTANCES_LAYOUT}"
        )
    folder = Path(recorded)
    if not folder.is_absolute():
        # Recorded as typed, relative to where `prepare` ran; the readers made it the image
        # root, which labels.h5 holds resolved.
        folder = Path(prepared.image_root)
    if not folder.is_dir():
        raise SplError(
            f"{prepared.path} was prepared from {recorded}, which is not a folder (any "
            f"more); pass --source RAW_DIR, the folder with {INSTANCES_LAYOUT}"
        )
    return folder


def check_matches(prepared, src: str, file: InstancesFile) -> None:
    """Refuse an instances file that is not the one ``prepared``'s ``src`` file was made
    from: other classes, other annotated images (by row), or other labels."""
    where = f"{file.path} does not match {prepared.path}"
    hint = "pass the --source it was prepared from, or prepare it again from this folder"
    if file.classes != list(prepared.classes):
        raise SplError(
            f"{where}: its categories ({len(file.classes)}: {', '.join(file.classes[:5])}"
            f"{', ...' if len(file.classes) > 5 else ''}) are not the dataset's classes "
            f"({prepared.num_classes}: {', '.join(prepared.classes[:5])}"
            f"{', ...' if prepared.num_classes > 5 else ''}); {hint}"
        )
    rows = prepared.images[src]
    if len(file.image_ids) != len(rows):
        raise SplError(
            f"{where}: it annotates {len(file.image_ids)} images where the dataset's {src} "
            f"file has {len(rows)} rows; {hint}"
        )
    labels = prepared.labels[src]
    for row, image_id in enumerate(file.image_ids):
        name = safe_relative(
            f"{file.phase}/{file.file_names[image_id]}", f"{file.path} (image id {image_id})"
        )
        if name != rows[row]:
            raise SplError(
                f"{where}: row {row} of {src} is {rows[row]} in the dataset but {name} "
                f"(image id {image_id}) in the instances file; {hint}"
            )
        if file.positives(image_id) != list(np.flatnonzero(labels[row])):
            raise SplError(
                f"{where}: image {name} (row {row} of {src}) has other classes in the "
                f"instances file than in the dataset; {hint}"
            )


def observe_biased(
    prepared, bias: str, seed: int, *, source: Path | None = None, clicks: Path | None = None
) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Draw a biased single-positive set for both source files of a prepared COCO dataset.

    Returns the ``[N, L]`` int8 arrays per source file and the set's parameters (``bias``,
    ``seed``, ``num_pos`` 1, ``num_neg`` 0, and for ``semantic`` ``clicks_sha256``). The
    instances files under ``source`` (default: the dataset's recorded source) must be the
    ones it was prepared from: their classes, annotated images and labels are checked
    against it row by row. Missing files are named before any large file is read.
    """
    check_options(bias, 1, 0, clicks)
    folder = raw_folder(prepared, source)
    paths = {
        src: folder / "annotations" / f"instances_{phase}.json" for src, phase in PHASES.items()
    }
    for path in paths.values():
        if not path.is_file():
            raise SplError(
                f"{path} not found: --bias {bias} draws from COCO 2014's instance "
                f"annotations (areas and boxes), expected at {INSTANCES_LAYOUT}; pass "
                "--source RAW_DIR if they are in another folder"
            )
    if clicks is not None:
        clicks = Path(clicks)
        if not clicks.is_dir():
            raise SplError(f"--clicks {clicks} is not a folder")
        for name in CLICK_FILES:
            if not (clicks / name).is_file():
                raise SplError(
                    f"{clicks / name} not found: --bias semantic reads COCO's crowdsourced "
                    f"click files {' and '.join(CLICK_FILES)} from --clicks DIR"
                )
    files = {}
    for src, path in paths.items():
        need_boxes = bias == "location" or (bias == "semantic" and src == "test")
        files[src] = read_instances(
            path, PHASES[src], areas=bias == "size", boxes=need_boxes, sizes=need_boxes
        )
    for src, file in files.items():
        check_matches(prepared, src, file)
    num_classes = prepared.num_classes
    params: dict[str, object] = {"bias": bias, "seed": int(seed), "num_pos": 1, "num_neg": 0}
    class_weights = None
    if bias == "semantic":
        assert clicks is not None
        val = files["test"]
        per_file = {
            str(clicks / name): click_weights(
                read_clicks(clicks / name, val), val.instances, val.sizes, num_classes
            )
            for name in CLICK_FILES
        }
        class_weights = semantic_class_weights(per_file, prepared.classes)
        params["clicks_sha256"] = clicks_digest(clicks)
    arrays = {}
    for src, file in files.items():
        weights = image_weights(bias, file, num_classes, class_weights)
        positives = [file.positives(i) for i in file.image_ids]
        arrays[src] = draw_single_positive(weights, positives, seed)
    return arrays, params
