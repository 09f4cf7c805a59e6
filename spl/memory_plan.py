"""The memory plan of ``spl fit-linear``: what a sweep holds, item by item, and what of it
stays resident within ``--memory-budget``.

A sweep over OpenImages-sized data (1.7 M images x 9,605 classes) would not fit held dense:
the training features alone are 14 GiB of float32 at D = 2,048. Before a run exists,
:func:`plan_linear` counts every item the engine holds (features, label matrices, heads and
their Adam state, each loss's per-row state, the label-only weight tables, the scoring
blocks, the read-ahead buffers) and decides, in this order, what stops being resident:
the features first (streamed from the HDF5 feature file, :class:`spl.fit.data.StreamedFeatures`),
then the label matrices on the device (read a batch at a time from their compact host
copy), then the scoring blocks shrink. What still does not fit is refused, naming the
largest item that cannot stream and what reduces it. None of these choices changes a
number the run computes (tests/test_streaming.py checks it bit for bit).

Budgets are bytes; :func:`parse_size` reads ``8GiB``, ``512MiB``, ``2.5GB`` or a byte count.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

from spl.data.common import SplError

# A default budget keeps a margin of what the machine has: the operating system, the
# interpreter, CUDA's context and allocator caches.
DEFAULT_SHARE = {"cpu": 0.8, "cuda": 0.9}
# Copies of each head's weights [L, D + 1] a group holds: the weights, their gradient,
# Adam's two moments, the best epoch's weights (fit/group.py, fit/adam.py).
HEAD_COPIES = 5
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


class ByteSize(int):
    """A settings field's type for a size in bytes: on the command line and in --config it
    is text such as ``8GiB`` (:func:`parse_size`), once parsed a plain int."""


def parse_size(value, option: str = "--memory-budget") -> int | None:
    """Bytes of a size: an integer (bytes) or text ``<number><unit>`` with units B, KB, MB,
    GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024; K, M, G, T alike).
    Must be > 0; None stays None (the machine's default)."""
    if value is None:
        return None
    fix = "give bytes or a number with a unit, e.g. 8GiB, 512MiB, 2.5GB"
    if isinstance(value, bool):
        raise SplError(f"{option} takes a size, got {value!r}; {fix}")
    if isinstance(value, int | float):
        number, unit = float(value), 1
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(3).lower() not in _UNITS:
            raise SplError(f"{option}: {value!r} is not a size; {fix}")
        number = float(match.group(1) + (f"e{match.group(2)}" if match.group(2) else ""))
        unit = _UNITS[match.group(3).lower()]
    size = number * unit
    if not math.isfinite(size) or size < 1:
        raise SplError(f"{option} must be at least 1 byte (> 0), got {value!r}; {fix}")
    return int(size)


def format_size(size: float) -> str:
    """Bytes for a person: ``24.4 GiB``, ``512.0 MiB``, ``96 B``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def machine_budget(device: str) -> int:
    """The default budget: a share (:data:`DEFAULT_SHARE`) of the GPU's memory on CUDA, of
    the machine's RAM (``os.sysconf``) on a CPU."""
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * DEFAULT_SHARE["cuda"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_SHARE["cpu"])


@dataclass
class PlanItem:
    """One thing a sweep holds: its bytes, where (``device``: the engine's device; ``host``:
    the process's memory, the same memory on a CPU), and whether it is resident or
    streamed (``bytes`` is then what it holds while streaming: its buffers). ``reduce``
    says what makes it smaller when the plan does not fit."""

    name: str
    bytes: int
    where: str = "device"
    streamed: bool = False
    reduce: str = ""


@dataclass
class MemoryPlan:
    """What a sweep holds and how (:func:`plan_linear`). ``stream_features``,
    ``resident_labels`` and ``score_bytes`` are what the engine is given."""

    budget: int
    device: str
    items: list[PlanItem] = field(default_factory=list)
    sharing: int = 1  # processes of a torchrun job sharing this machine's RAM (CPU only)
    stream_features: bool = False
    resident_labels: bool = True
    score_bytes: int = 0

    @property
    def counted(self) -> list[PlanItem]:
        """The items the budget bounds: on a CPU every item, on a GPU those on it."""
        if self.device.startswith("cuda"):
            return [i for i in self.items if i.where == "device"]
        return list(self.items)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.counted)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def record(self) -> dict:
        """What config.json records."""
        return {
            "budget": self.budget,
            "device": self.device,
            "sharing": self.sharing,
            "total": self.total,
            "stream_features": self.stream_features,
            "resident_labels": self.resident_labels,
            "score_bytes": self.score_bytes,
            "items": [asdict(i) for i in self.items],
        }

    def text(self) -> str:
        """The plan as ``--dry-run`` prints it: each item, its bytes, resident or streamed."""
        width = max([len(i.name) for i in self.items] + [4])
        lines = [
            f"memory plan on {self.device}: {format_size(self.total)} of a "
            f"{format_size(self.budget)} budget ({self.total} of {self.budget} bytes)",
            f"  {'item':<{width}} {'bytes':>14} {'size':>10}  {'where':<6} how",
        ]
        for item in self.items:
            how = "streamed" if item.streamed else "resident"
            lines.append(
                f"  {item.name:<{width}} {item.bytes:>14} {format_size(item.bytes):>10}  "
                f"{item.where:<6} {how}"
            )
        if self.device.startswith("cuda"):
            lines.append("  (on a GPU the budget bounds the device's items)")
        if self.sharing > 1:
            lines.append(f"  (this process's share: the budget divided by the {self.sharing} "
                         "torchrun processes sharing this machine's memory)")  # fmt: skip
        return "\n".join(lines)


@dataclass(frozen=True)
class LossState:
    """A loss's per-row state for the plan: bytes per training row of each head and of
    each group (a tensor its heads share), and fixed bytes, each with every copy the engine
    keeps (the state, for trainable tensors their gradient and Adam's two moments, the best
    epoch's snapshot, each head's copy exported for heads.pt)."""

    key: str
    heads: int
    groups: int
    bytes_per_row: int  # per head
    bytes_shared_per_row: int = 0  # per group
    bytes_fixed: int = 0


@dataclass(frozen=True)
class SweepShape:
    """What the plan counts from: rows per split, features D, classes L, the feature file's
    bytes per value, the engine's, the label matrices' host bytes as stored, the grid
    (heads per group, batch sizes), the loss states, the number of label-only weight tables
    a group holds (losses on the ``weights`` route), the observed sets on the device, the
    unobserved positives the histograms follow (0: histograms off), and whether a loss
    initialises its state from a dense copy of its observed set."""

    train_rows: int
    val_rows: int
    test_rows: int
    features: int
    classes: int
    group_heads: list[int]
    batch_sizes: list[int]
    feature_itemsize: int = 4
    itemsize: int = 4
    host_labels: int = 0
    observed_sets: int = 1
    weight_tables: int = 0
    loss_states: list[LossState] = field(default_factory=list)
    hidden_positives: int = 0
    ap_chunk: int = 16
    dense_init: bool = False  # a loss initialises its state from a dense observed set


def _split_rows(s: SweepShape) -> dict[str, int]:
    return {"train": s.train_rows, "val": s.val_rows, "test": s.test_rows}


def feature_items(s: SweepShape, streamed: bool) -> list[PlanItem]:
    """The features: each split resident in the engine's dtype, or the read-ahead buffers
    and a pass's blocks when they stream."""
    width, item = s.features + 1, s.itemsize
    split_rows = _split_rows(s)
    if not streamed:
        return [
            PlanItem(f"{split} features", rows * width * item,
                     reduce="they stream (--stream-features)")
            for split, rows in split_rows.items()
        ]  # fmt: skip
    from spl.fit.data import READ_AHEAD_ROWS, READ_AHEAD_WINDOWS, SCORE_ROWS

    # the windows queued, the one being read and the one the steps take batches from
    window = READ_AHEAD_ROWS + max(s.batch_sizes) - 1
    buffers = (READ_AHEAD_WINDOWS + 2) * min(window, s.train_rows) * width * item
    # a pass over a split reads a block of rows: as stored, then in the engine's dtype
    score_rows = max(split_rows.values())
    block = min(SCORE_ROWS, score_rows) * s.features * s.feature_itemsize
    block += min(SCORE_ROWS, score_rows) * width * item
    return [
        PlanItem("features (streamed from the feature file)", 0, "host", True),
        PlanItem("read-ahead buffers", buffers, "host", True),
        PlanItem("feature blocks of a pass", block, streamed=True),
    ]


def label_items(s: SweepShape, resident: bool) -> list[PlanItem]:
    """The label matrices as stored, and their dense copies on the device when resident."""
    item = s.itemsize
    items = [
        PlanItem("label matrices as stored", s.host_labels, "host",
                 reduce="fewer observed sets or a sparse labels.h5"),
    ]  # fmt: skip
    if not resident:
        return items
    train = (1 + s.observed_sets) * s.train_rows * s.classes * item
    items.append(PlanItem("train labels and observed sets (dense)", train,
                          reduce="they are read per batch"))  # fmt: skip
    items.append(PlanItem("val labels (dense)", s.val_rows * s.classes * item,
                          reduce="they are read per batch"))  # fmt: skip
    if s.weight_tables:
        tables = 2 * s.weight_tables * s.train_rows * s.classes * item
        items.append(PlanItem("label-only weight tables of an epoch", tables,
                              reduce="they are computed per batch"))  # fmt: skip
    return items


def fixed_items(s: SweepShape) -> list[PlanItem]:
    """What no plan streams: heads and Adam, each loss's per-row state, the dense observed
    set a loss's initial state is made from, the histograms' positives."""
    width, item = s.features + 1, s.itemsize
    heads = sum(s.group_heads)
    items = [
        PlanItem(
            f"heads and their Adam state ({heads} heads)",
            HEAD_COPIES * heads * s.classes * width * item
            + max(s.group_heads) * s.classes * width * item,  # the weights validation reads
            reduce="fewer heads: fewer --lrs, --batch-sizes, --seeds or --losses",
        )
    ]
    for state in s.loss_states:
        size = (
            s.train_rows
            * (state.heads * state.bytes_per_row + state.groups * state.bytes_shared_per_row)
            + state.bytes_fixed
        )
        if size:
            items.append(
                PlanItem(
                    f"{state.key}'s state ({state.heads} heads)",
                    size,
                    reduce=f"fewer {state.key} heads (fewer --lrs, --batch-sizes or "
                    f"--seeds), or leave {state.key} out of --losses",
                )
            )
    if s.dense_init:  # (fit/group.py: a dense [N, L] copy for the call, one at a time)
        items.append(
            PlanItem(
                "observed set made dense for a loss's initial state",
                s.train_rows * s.classes * item,
                reduce="leave out the losses with a per-row state",
            )
        )
    if s.hidden_positives:
        items.append(
            PlanItem(
                "unobserved positives followed by the histograms",
                16 * s.hidden_positives,  # rows on the device and on the host, int64
                reduce="--histogram-bins 0",
            )
        )
    return items


def plan_linear(
    shape: SweepShape,
    budget: int,
    device: str,
    *,
    stream_features: bool = False,
    sharing: int = 1,
) -> MemoryPlan:
    """The plan of a sweep of ``shape`` within ``budget`` bytes on ``device``: features
    stream when asked or when they do not fit, then the label matrices are read per batch,
    then the scoring blocks shrink (:data:`~spl.evaluate.blocks.SCORE_BYTES` at most);
    refused (:class:`~spl.data.common.SplError`) when it still does not fit, naming the
    largest item that cannot stream and what reduces it. On a CPU, ``sharing`` processes
    (a torchrun job's on this machine) share the budget: each plans within its equal share
    (on CUDA each process has its own GPU)."""
    if sharing < 1:
        raise ValueError(f"sharing must be at least 1, not {sharing}")
    if not device.startswith("cuda"):
        budget //= sharing
    from spl.evaluate.blocks import SCORE_BYTES, block_bytes

    s, item = shape, shape.itemsize
    largest_group = max(s.group_heads)
    score_rows = max(_split_rows(s).values())
    full_scoring = block_bytes(largest_group, score_rows, s.classes, s.ap_chunk, item)
    least_scoring = block_bytes(min(largest_group, s.ap_chunk), score_rows, 1, s.ap_chunk, item)
    plan = MemoryPlan(budget=budget, device=device, sharing=sharing)
    # What changes no number goes first (features streamed, labels read per batch), then
    # the scoring blocks shrink (smaller products: the same numbers to rounding).
    steps = [(True, True), (True, False)]
    if not stream_features:
        steps.insert(0, (False, True))
    for (streamed, resident_labels), shrink in [(step, False) for step in steps] + [
        (steps[-1], True)
    ]:
        plan.items = feature_items(s, streamed) + label_items(s, resident_labels) + fixed_items(s)
        plan.stream_features, plan.resident_labels = streamed, resident_labels
        plan.score_bytes = min(SCORE_BYTES, full_scoring)
        room = budget - plan.total
        if shrink and plan.score_bytes > room:  # down to one class of a few heads
            plan.score_bytes = max(least_scoring, room)
        plan.items.append(
            PlanItem(
                "scoring blocks (val, test, recovery)",
                plan.score_bytes,
                reduce="fewer heads per group: fewer --losses or --lrs",
            )  # fmt: skip
        )
        if plan.fits:
            return plan
    raise SplError(refusal(plan))


def refusal(plan: MemoryPlan) -> str:
    """Why a plan that streams what it can still does not fit, naming the largest item
    that cannot stream and what reduces it."""
    fixed = sorted((i for i in plan.counted if not i.streamed and i.reduce), key=lambda i: -i.bytes)
    worst = fixed[0]
    over = plan.total - plan.budget
    return (
        f"the sweep needs {format_size(plan.total)} with the features streamed and the labels "
        f"read per batch, {format_size(over)} over the {format_size(plan.budget)} memory "
        f"budget (--memory-budget). The largest item: {worst.name} needs "
        f"{format_size(worst.bytes)}; reduce it: {worst.reduce}. The plan (--dry-run):\n"
        + plan.text()
    )
