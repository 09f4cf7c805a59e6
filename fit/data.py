"""What the linear engine reads its data through: features and label matrices held on the
device (resident, as the engine always did) or read a block of rows at a time (streamed)
from the feature file and from label matrices kept compactly in host memory.

- :class:`Features`: a split's features as ``[B, D + 1]`` blocks (the ones column last) in
  the engine's dtype. :class:`ResidentFeatures` holds the whole split on the device;
  :class:`StreamedFeatures` reads rows from the HDF5 feature file (positional reads in the
  dataset when its layout allows, else through h5py), sorted, float16 files converted per
  block.
- :class:`LabelRows`: an ``[N, L]`` label matrix (dense, or a :class:`~spl.data.labels.CSR`
  of its nonzero entries) as ``[B, L]`` blocks of rows or ``[N, c]`` blocks of columns;
  resident: a dense copy on the device.
- :class:`ReadAhead`: the epoch's batches are known before it starts, so a background thread
  reads the next batches' rows (a window of batches at once, sorted) while the steps compute.
- :class:`HiddenPositives`: the entries the paper's figure follows (y = 1, z = 0) as
  per-class row lists instead of a dense ``[N, L]`` mask.

Streaming changes no number: a batch's rows come out of the file with the values a resident
copy holds (float16 to float32 is exact), in the same order, and the step computes the same
products on them. A pass over a whole split (validation, histograms, a loss's end-of-epoch
scores, test scoring) takes a resident split as one block, as the engine always did, and a
streamed one in blocks of :data:`SCORE_ROWS` rows.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from spl.data.labels import CSR

# Rows per block of a pass over a streamed split: 32 Ki rows of 2,048 float32 features are
# 256 MiB, a few large reads per pass.
SCORE_ROWS = 1 << 15
# Entries (rows x classes) per block when a pass walks a label matrix (hidden positives,
# label estimates): 16 Mi entries, 64 MiB of float32.
LABEL_BLOCK_ENTRIES = 1 << 24
# Rows the read-ahead thread reads at once (the next batches together, sorted), and how many
# such windows wait ready for the steps.
READ_AHEAD_ROWS = 4096
READ_AHEAD_WINDOWS = 2


# --------------------------------------------------------------------------- features


class Features:
    """A split's features as the engine reads them: ``[B, D + 1]`` blocks with the ones
    column last, in ``dtype`` on ``device``."""

    num_rows: int
    width: int  # D + 1
    dtype: torch.dtype
    device: torch.device
    resident: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.width)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows ``rows`` (any order), on the device."""
        raise NotImplementedError

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` on the host (what the read-ahead thread prepares)."""
        raise NotImplementedError

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows start:stop on the device)`` covering the split: one block
        when resident, :data:`SCORE_ROWS` rows at a time when streamed."""
        raise NotImplementedError


class ResidentFeatures(Features):
    """Features held on the device: ``X [N, D + 1]``, the ones column appended already."""

    resident = True

    def __init__(self, X: torch.Tensor) -> None:
        self.X = X
        self.num_rows, self.width = X.shape
        self.dtype, self.device = X.dtype, X.device

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.X.index_select(0, rows)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        return self.X.index_select(0, torch.from_numpy(rows).to(self.device)).cpu()

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        yield 0, self.num_rows, self.X


def contiguous_offset(dataset: h5py.Dataset) -> int | None:
    """The file offset of a dataset stored contiguously and uncompressed (the layout a
    memory map can read), None for any other (chunked, compressed, not yet written)."""
    if dataset.chunks is not None or dataset.compression is not None:
        return None
    if not dataset.dtype.isnative or dataset.dtype.kind != "f":
        return None
    try:
        return dataset.id.get_offset()
    except (RuntimeError, ValueError):  # pragma: no cover - an unallocated dataset
        return None


class StreamedFeatures(Features):
    """Rows of the dataset ``name`` of the HDF5 feature file ``path``, read when asked.

    ``rows`` maps the split's rows to the file's (the split's rows of its source file,
    unreadable images left out; default all rows). A contiguous, uncompressed dataset is
    read by positional reads at the dataset's offset (the page cache serves repeated epochs;
    a memory map would count the file's pages in the process's memory), any other layout
    through h5py; either way the rows of a read are sorted and read at once. The file's
    dtype (float16 or float32) becomes ``dtype`` per block, exactly.
    """

    def __init__(
        self,
        path: Path | str,
        name: str,
        rows: np.ndarray | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.path, self.name = Path(path), name
        # h5py reads chunked datasets through its chunk cache: 64 MiB keeps a window's chunks
        self._h5 = h5py.File(self.path, "r", rdcc_nbytes=64 * 2**20)
        dataset = self._h5[name]
        self.file_shape = tuple(dataset.shape)
        self.file_dtype = np.dtype(dataset.dtype)
        self._offset = contiguous_offset(dataset)
        self.layout = "direct" if self._offset is not None else "hdf5"
        self._file = None
        if self._offset is not None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._dataset = dataset
        self.file_rows = (
            np.arange(self.file_shape[0], dtype=np.int64)
            if rows is None
            else np.asarray(rows, dtype=np.int64)
        )
        self.num_rows, self.width = len(self.file_rows), self.file_shape[1] + 1
        self.dtype, self.device = dtype, torch.device(device)
        self._lock = threading.Lock()

    def _read_file_rows(self, file_rows: np.ndarray) -> np.ndarray:
        """The file's rows ``file_rows`` (sorted, distinct) as stored."""
        if len(file_rows) and file_rows[-1] - file_rows[0] + 1 == len(file_rows):
            part = slice(int(file_rows[0]), int(file_rows[-1]) + 1)  # a range: one slice
        else:
            part = file_rows
        if self._file is not None:
            return self._read_direct(file_rows)
        with self._lock:  # one h5py read at a time: the read-ahead thread and a pass
            return self._dataset[part]

    def _read_direct(self, file_rows: np.ndarray) -> np.ndarray:
        """Sorted rows of a contiguous dataset by positional reads at its offset, one read
        per run of consecutive rows. Not a memory map: a map's pages count in the process's
        resident memory once touched (a pass over a 4 GiB file made it 4 GiB larger, beyond
        the memory plan), where these reads leave the file's pages to the page cache, which
        the kernel shares and gives back."""
        row_bytes = self.file_shape[1] * self.file_dtype.itemsize
        out = np.empty((len(file_rows), self.file_shape[1]), dtype=self.file_dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(file_rows) != 1) + 1
        starts = np.concatenate([[0], breaks]).astype(np.int64)
        stops = np.concatenate([breaks, [len(file_rows)]]).astype(np.int64)
        fd = self._file.fileno()
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            where = self._offset + int(file_rows[start]) * row_bytes
            chunk = view[start * row_bytes : stop * row_bytes]
            while len(chunk):
                got = os.preadv(fd, [chunk], where)
                if got <= 0:
                    raise OSError(
                        f"{self.path}: the feature file ends before row {file_rows[start]}"
                    )
                chunk, where = chunk[got:], where + got
        return out

    def read(self, rows: np.ndarray) -> torch.Tensor:
        file_rows = self.file_rows[np.asarray(rows, dtype=np.int64)]
        unique, inverse = np.unique(file_rows, return_inverse=True)  # sorted, as few reads
        values = torch.from_numpy(self._read_file_rows(unique))
        out = torch.empty(len(file_rows), self.width, dtype=self.dtype)
        out[:, -1] = 1
        if len(unique) == len(file_rows) and np.array_equal(unique, file_rows):
            out[:, :-1] = values
        else:
            out[:, :-1] = values[torch.from_numpy(inverse.reshape(-1))]
        return out

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.read(rows.cpu().numpy()).to(self.device)

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for start in range(0, self.num_rows, SCORE_ROWS):
            stop = min(start + SCORE_ROWS, self.num_rows)
            rows = np.arange(start, stop, dtype=np.int64)
            yield start, stop, self.read(rows).to(self.device)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._h5.close()

    def __repr__(self) -> str:
        return (
            f"StreamedFeatures({self.path.name}:{self.name}, rows={self.num_rows}, "
            f"layout={self.layout}, file dtype={self.file_dtype})"
        )


def split_logits(X: Features, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``[H, N, L]`` of stacked heads ``weight [H, L, D + 1]`` on every row of a
    split, block by block (one product for a resident split, as before)."""
    from spl.fit.heads import stacked_logits

    blocks = X.blocks()
    start, stop, block = next(blocks)
    first = stacked_logits(block, weight)
    if stop == X.num_rows:
        return first
    out = first.new_empty(weight.shape[0], X.num_rows, weight.shape[1])
    out[:, start:stop] = first
    for start, stop, block in blocks:
        out[:, start:stop] = stacked_logits(block, weight)
    return out


def as_features(X, dtype: torch.dtype, device: torch.device) -> Features:
    """Features given to the engine: a :class:`Features` as it is, an array or tensor
    ``[N, D]`` held on the device with its ones column."""
    if isinstance(X, Features):
        return X
    from spl.fit.heads import as_tensor, augment

    return ResidentFeatures(augment(as_tensor(X, dtype, device)))


# --------------------------------------------------------------------------- labels

LabelInput = np.ndarray | torch.Tensor | CSR


class LabelRows:
    """An ``[N, L]`` label matrix as the engine reads it, values in ``dtype``.

    ``resident``: a dense copy on the device (what the engine always held); otherwise the
    matrix stays on the host as given (a dense array, or a :class:`~spl.data.labels.CSR`:
    memory in proportion to its entries) and blocks are made when asked.
    """

    def __init__(
        self,
        matrix: LabelInput,
        *,
        dtype: torch.dtype,
        device: torch.device,
        resident: bool = True,
    ) -> None:
        self.dtype, self.device = dtype, torch.device(device)
        self.shape = tuple(matrix.shape)
        self.resident = resident
        self._entry_rows: np.ndarray | None = None
        if resident:
            if isinstance(matrix, CSR):
                matrix = matrix.to_dense()
            tensor = torch.as_tensor(np.asarray(matrix) if not torch.is_tensor(matrix) else matrix)
            self.tensor: torch.Tensor | None = tensor.to(device=self.device, dtype=dtype)
            self.matrix: LabelInput | None = None
        else:
            self.tensor = None
            self.matrix = matrix.cpu().numpy() if torch.is_tensor(matrix) else matrix

    @property
    def sparse(self) -> bool:
        """Whether the matrix is held as a CSR of its entries (not resident)."""
        return isinstance(self.matrix, CSR)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows ``rows`` on the device."""
        if self.tensor is not None:
            return self.tensor.index_select(0, rows)
        return self.read(rows.cpu().numpy()).to(self.device)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` on the host."""
        if self.tensor is not None:
            return self.tensor.index_select(0, torch.from_numpy(rows).to(self.device)).cpu()
        if isinstance(self.matrix, CSR):
            block = self.matrix.block(np.asarray(rows, dtype=np.int64))
        else:
            block = np.ascontiguousarray(self.matrix[np.asarray(rows, dtype=np.int64)])
        return torch.from_numpy(block).to(self.dtype)

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Every row of the columns ``start:stop``, on the device (the resident matrix itself
        for all columns)."""
        if self.tensor is not None:
            if (start, stop) == (0, self.shape[1]):
                return self.tensor
            return self.tensor[:, start:stop]
        if isinstance(self.matrix, CSR):
            csr = self.matrix
            if self._entry_rows is None:
                self._entry_rows = np.repeat(
                    np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr)
                )
            keep = (csr.indices >= start) & (csr.indices < stop)
            block = np.zeros((csr.shape[0], stop - start), dtype=np.int8)
            block[self._entry_rows[keep], csr.indices[keep] - start] = csr.values[keep]
        else:
            block = np.ascontiguousarray(self.matrix[:, start:stop])
        return torch.from_numpy(block).to(device=self.device, dtype=self.dtype)

    def dense(self) -> torch.Tensor:
        """The whole matrix on the device."""
        return self.columns(0, self.shape[1])

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows start:stop on the host)``, a few Mi entries at a time."""
        step = max(1, LABEL_BLOCK_ENTRIES // max(1, self.shape[1]))
        for start in range(0, self.shape[0], step):
            stop = min(start + step, self.shape[0])
            yield start, stop, self.read(np.arange(start, stop, dtype=np.int64))


def as_labels(
    matrix: LabelInput | LabelRows, dtype: torch.dtype, device: torch.device, resident: bool
) -> LabelRows:
    """A label matrix given to the engine: a :class:`LabelRows` as it is, a dense array,
    tensor or :class:`~spl.data.labels.CSR` wrapped (on the device when ``resident``)."""
    if isinstance(matrix, LabelRows):
        return matrix
    return LabelRows(matrix, dtype=dtype, device=device, resident=resident)


# --------------------------------------------------------------------------- hidden positives


@dataclass
class HiddenPositives:
    """The training entries whose probabilities the paper's figure follows, the unobserved
    positives (y = 1, z = 0), per class: class ``c``'s rows are
    ``rows[starts[c]:starts[c + 1]]``, ascending (memory in proportion to the entries, not
    to N x L)."""

    starts: np.ndarray  # [L + 1] int64
    rows: torch.Tensor  # [E] int64, on the device
    host_rows: np.ndarray  # the same, on the host
    num_rows: int

    @property
    def num_classes(self) -> int:
        return len(self.starts) - 1

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    @classmethod
    def find(cls, labels: LabelRows, observed: LabelRows, device: torch.device) -> HiddenPositives:
        """Read ``labels`` and ``observed`` block by block."""
        found_rows, found_classes = [], []
        for start, stop, label_block in labels.row_blocks():
            observed_block = observed.read(np.arange(start, stop, dtype=np.int64))
            rows, classes = np.nonzero(((label_block == 1) & (observed_block == 0)).numpy())
            found_rows.append(rows + start)
            found_classes.append(classes)
        rows = np.concatenate(found_rows) if found_rows else np.zeros(0, np.int64)
        classes = np.concatenate(found_classes) if found_classes else np.zeros(0, np.int64)
        return cls.from_entries(rows, classes, labels.shape, device)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> HiddenPositives:
        """From a dense ``[N, L]`` bool mask (on its device)."""
        rows, classes = np.nonzero(mask.cpu().numpy())
        return cls.from_entries(rows, classes, tuple(mask.shape), mask.device)

    @classmethod
    def from_entries(
        cls, rows: np.ndarray, classes: np.ndarray, shape: tuple[int, int], device
    ) -> HiddenPositives:
        """From the (row, class) of each entry, in any order."""
        order = np.lexsort((rows, classes))
        host_rows = np.asarray(rows, dtype=np.int64)[order]
        counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=shape[1])
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(starts, torch.from_numpy(host_rows).to(device), host_rows, shape[0])

    def class_rows(self, cls_index: int, start: int, stop: int) -> torch.Tensor | None:
        """Class ``cls_index``'s rows within ``start:stop``, relative to ``start`` (None:
        none)."""
        lo, hi = int(self.starts[cls_index]), int(self.starts[cls_index + 1])
        if (start, stop) != (0, self.num_rows):
            rows = self.host_rows[lo:hi]
            lo, hi = lo + int(np.searchsorted(rows, start)), lo + int(np.searchsorted(rows, stop))
        if hi == lo:
            return None
        rows = self.rows[lo:hi]
        return rows if start == 0 else rows - start

    def entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(row relative to ``start``, class) of every entry whose row is in ``start:stop``."""
        classes = np.repeat(np.arange(self.num_classes), np.diff(self.starts))
        keep = (self.host_rows >= start) & (self.host_rows < stop)
        return self.host_rows[keep] - start, classes[keep]


# --------------------------------------------------------------------------- read-ahead


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class ReadAhead:
    """The host blocks of an epoch's batches, read ahead of the steps by a background thread.

    ``read(rows)`` returns a dict of host tensors (or dicts of them) with one row per entry
    of ``rows``; the thread calls it for windows of consecutive batches (at least
    ``window_rows`` rows together), splits the result by batch and queues it, at most
    ``windows`` windows ahead. Iterating gives one batch's dict per step; :attr:`waited` is
    the time the steps spent waiting for one. ``close`` stops the thread (an interrupted
    epoch)."""

    def __init__(
        self,
        read: Callable[[np.ndarray], dict],
        batches: list[np.ndarray],
        *,
        window_rows: int = READ_AHEAD_ROWS,
        windows: int = READ_AHEAD_WINDOWS,
        pin: bool = False,
    ) -> None:
        self.read, self.batches, self.pin = read, batches, pin
        self.waited = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, windows))
        self._stop = threading.Event()
        self._windows = _windows([len(b) for b in batches], window_rows)
        self._ready: list[dict] = []
        self._thread = threading.Thread(target=self._work, name="spl-read-ahead", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for first, last in self._windows:
                if self._stop.is_set():
                    return
                part = self.batches[first:last]
                block = self.read(np.concatenate(part))
                if self.pin:
                    block = _map(block, lambda t: t.pin_memory())
                sizes = [len(b) for b in part]
                pieces = _map(block, lambda t, sizes=sizes: t.split(sizes))
                self._put([_map(pieces, lambda p, i=i: p[i]) for i in range(len(part))])
        except BaseException as exc:  # handed to the steps, raised there
            self._put(_Failed(exc))
        finally:
            self._put(_END)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> dict:
        if not self._ready:
            started = time.perf_counter()
            item = self._queue.get()
            self.waited += time.perf_counter() - started
            if item is _END:
                raise StopIteration
            if isinstance(item, _Failed):
                raise item.error
            self._ready = list(reversed(item))
        return self._ready.pop()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _windows(sizes: list[int], window_rows: int) -> list[tuple[int, int]]:
    """Consecutive batches grouped so that each group holds at least ``window_rows`` rows."""
    out, first, rows = [], 0, 0
    for i, size in enumerate(sizes):
        rows += size
        if rows >= window_rows:
            out.append((first, i + 1))
            first, rows = i + 1, 0
    if first < len(sizes):
        out.append((first, len(sizes)))
    return out


def _map(block, function):
    if isinstance(block, dict):
        return {k: _map(v, function) for k, v in block.items()}
    if block is None:
        return None
    return function(block)
