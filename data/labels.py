"""Label matrices too large to hold dense: compressed sparse rows (CSR) in memory and in
``labels.h5``, read a block of rows at a time.

OpenImages' 1.7 M training images x 9,605 classes would take 16 GB as a dense int8
matrix; its verified labels are about 0.1 % of that. A matrix is stored as the nonzero
entries of the dense array it stands for: ``indptr [N+1] int64`` (row ``r``'s entries are
``indptr[r]:indptr[r+1]``), ``indices [nnz] int32`` (their columns, ascending within a
row) and ``values [nnz] int8``. Every reader gets dense blocks of rows
(:class:`SparseRows`: ``matrix[rows]``), so callers need not know the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spl.data.common import SplError

# Matrices of more dense bytes than this (rows x classes, one byte an entry) are stored
# sparse: 256 MiB is NUS-WIDE-sized data (150,000 x 81 = 12 MiB) times twenty, and a
# tenth of a laptop's memory.
SPARSE_THRESHOLD_BYTES = 256 * 2**20
# What ``m[rows]`` reads at once when it walks a whole matrix (counts, whole reads).
BLOCK_ROWS = 1 << 16
# Entries between two requested rows read anyway (one read instead of two).
READ_GAP = 1 << 12
_CHUNK = 1 << 12
VIEWS = ("values", "positive", "known")


@dataclass(frozen=True)
class CSR:
    """An in-memory ``[N, L]`` int8 matrix as its nonzero entries (module docstring)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    num_columns: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indptr) - 1, self.num_columns)

    @property
    def nnz(self) -> int:
        return len(self.indices)

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> CSR:
        dense = np.asarray(dense)
        rows, columns = np.nonzero(dense)
        counts = np.bincount(rows, minlength=dense.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(
            indptr, columns.astype(np.int32), dense[rows, columns].astype(np.int8), dense.shape[1]
        )

    @classmethod
    def from_entries(
        cls, rows: np.ndarray, columns: np.ndarray, values: np.ndarray, shape: tuple[int, int]
    ) -> CSR:
        """From distinct (row, column) entries in any order; zero values are dropped."""
        rows, columns, values = np.asarray(rows), np.asarray(columns), np.asarray(values)
        keep = values != 0
        rows, columns, values = rows[keep], columns[keep], values[keep]
        order = np.lexsort((columns, rows))
        counts = np.bincount(rows, minlength=shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(
            indptr, columns[order].astype(np.int32), values[order].astype(np.int8), int(shape[1])
        )

    def row_entries(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of one row."""
        start, stop = self.indptr[row], self.indptr[row + 1]
        return self.indices[start:stop], self.values[start:stop]

    def take(self, rows: np.ndarray) -> CSR:
        """The matrix of ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        positions = _ranges(starts, stops - starts)
        indptr = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
        return CSR(indptr, self.indices[positions], self.values[positions], self.num_columns)

    def block(self, rows) -> np.ndarray:
        """Dense int8 rows (``rows`` as for a NumPy array's first axis)."""
        rows = _row_index(rows, self.shape[0])
        part = self.take(rows)
        out = np.zeros((len(rows), self.num_columns), dtype=np.int8)
        local = np.repeat(np.arange(len(rows)), np.diff(part.indptr))
        out[local, part.indices] = part.values
        return out

    def to_dense(self) -> np.ndarray:
        return self.block(slice(None))

    def count_per_row(self, value: int) -> np.ndarray:
        """How many entries of each row equal ``value`` (nonzero)."""
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        return np.bincount(rows[self.values == value], minlength=self.shape[0])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + c)`` for each (s, c), without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, counts) + np.arange(total)


def _row_index(key, num_rows: int) -> np.ndarray:
    """A first-axis index (slice, integer array, boolean mask, list) as int64 rows."""
    if isinstance(key, slice):
        return np.arange(num_rows, dtype=np.int64)[key]
    rows = np.asarray(key)
    if rows.dtype == bool:
        if rows.shape != (num_rows,):
            raise IndexError(f"boolean index of shape {rows.shape} for {num_rows} rows")
        return np.flatnonzero(rows)
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise IndexError(f"rows must be a slice, a 1-d integer array or a mask, got {key!r}")
    rows = rows.astype(np.int64)
    if rows.min() < -num_rows or rows.max() >= num_rows:
        raise IndexError(f"row index out of range for {num_rows} rows")
    return np.where(rows < 0, rows + num_rows, rows)


def write_csr(group: h5py.Group, name: str, matrix: CSR) -> None:
    """``group/name`` as a CSR group (``indptr``, ``indices``, ``values``; attrs ``layout``
    and ``shape``)."""
    node = group.create_group(name)
    node.attrs["layout"] = "csr"
    node.attrs["shape"] = np.array(matrix.shape, dtype=np.int64)
    node.create_dataset("indptr", data=matrix.indptr.astype(np.int64))
    for key, array in (("indices", matrix.indices), ("values", matrix.values)):
        # Chunks of 4 Ki entries: a random row decompresses 16 KiB of columns, not the file.
        options = (
            {"compression": "gzip", "chunks": (min(len(array), _CHUNK),)} if len(array) else {}
        )
        node.create_dataset(key, data=array, **options)


class SparseRows:
    """A ``[N, L]`` matrix stored as CSR in an HDF5 file, read lazily by blocks of rows.

    ``m[rows]`` (an int, a slice, an integer array in any order, a boolean mask) reads only
    those rows' entries and returns them dense, as NumPy would for a dense array:
    ``view="values"`` the stored int8 values (observed sets: {-1, 0, +1}), ``"positive"``
    uint8 1 where the value is +1 (full labels, unknown as 0), ``"known"`` bool where an
    entry is stored (a partially labelled dataset's verified entries). A whole-matrix read
    is explicit (:meth:`dense`); ``np.asarray(m)`` gives it only below
    :data:`SPARSE_THRESHOLD_BYTES`.
    """

    def __init__(self, path: Path | str, name: str, view: str = "values") -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.path, self.name, self.view = Path(path), name, view
        with h5py.File(self.path, "r") as h5:
            node = h5[name]
            if not isinstance(node, h5py.Group) or node.attrs.get("layout") != "csr":
                raise SplError(f"{self.path}: {name} is not a CSR matrix group")
            num_rows, num_columns = (int(n) for n in node.attrs["shape"])
            self.indptr = node["indptr"][()]
        if len(self.indptr) != num_rows + 1:
            raise SplError(
                f"{self.path}: {name}/indptr has {len(self.indptr)} entries for "
                f"{num_rows} rows; prepare the dataset again"
            )
        self.shape = (num_rows, num_columns)
        self._memory: tuple[np.ndarray, np.ndarray] | None = None  # (indices, values)

    def in_memory(self) -> SparseRows:
        """The same matrix with its stored entries read once into memory (5 bytes an
        entry, not N x L): for random batches, which would touch most of the file."""
        if self._memory is not None:
            return self
        other = self.with_view(self.view)
        with h5py.File(self.path, "r") as h5:
            node = h5[self.name]
            other._memory = (node["indices"][()], node["values"][()])
        return other

    def with_view(self, view: str) -> SparseRows:
        """The same stored matrix under another view (no reread of the file)."""
        other = object.__new__(SparseRows)
        other.__dict__.update(self.__dict__)
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        other.view = view
        return other

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({"values": np.int8, "positive": np.uint8, "known": bool}[self.view])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"SparseRows({self.path.name}:{self.name}, shape={self.shape}, nnz={self.nnz}, "
            f"view={self.view!r})"
        )

    def entries(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in ``rows``, column, stored value) of every entry of ``rows``."""
        rows = _row_index(rows, self.shape[0])
        unique, inverse = np.unique(rows, return_inverse=True)
        starts, stops = self.indptr[unique], self.indptr[unique + 1]
        columns, values = self._read(starts, stops)
        counts = stops - starts
        if len(unique) != len(rows) or not np.array_equal(unique, rows):
            # Requested order or repeats: give every requested position its row's entries.
            offsets = np.concatenate([[0], np.cumsum(counts)])[:-1]
            positions = _ranges(offsets[inverse], counts[inverse])
            columns, values, counts = columns[positions], values[positions], counts[inverse]
        local = np.repeat(np.arange(len(rows)), counts)
        return local, columns, values

    def _read(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored (indices, values) of the sorted spans ``starts[i]:stops[i]``, concatenated;
        spans a few entries apart are read as one."""
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        if len(starts) == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int8)
        new_run = np.concatenate([[True], starts[1:] - stops[:-1] > READ_GAP])
        run = np.cumsum(new_run) - 1
        run_starts = starts[new_run]
        run_stops = np.maximum.reduceat(stops, np.flatnonzero(new_run))
        spans = zip(run_starts.tolist(), run_stops.tolist(), strict=True)
        if self._memory is not None:
            parts = [(self._memory[0][a:b], self._memory[1][a:b]) for a, b in spans]
        else:
            with h5py.File(self.path, "r") as h5:
                node = h5[self.name]
                parts = [(node["indices"][a:b], node["values"][a:b]) for a, b in spans]
        run_offsets = np.concatenate([[0], np.cumsum(run_stops - run_starts)])[:-1]
        indices = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts])
        positions = _ranges(run_offsets[run] + starts - run_starts[run], stops - starts)
        return indices[positions], values[positions]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            raise IndexError(
                "index a SparseRows by rows only (m[rows]); select columns on the dense block"
            )
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        local, columns, values = self.entries(key)
        num_rows = len(_row_index(key, self.shape[0]))
        out = np.zeros((num_rows, self.shape[1]), dtype=self.dtype)
        if self.view == "values":
            out[local, columns] = values
        elif self.view == "positive":
            hit = values == 1
            out[local[hit], columns[hit]] = 1
        else:
            out[local, columns] = True
        return out

    def csr(self) -> CSR:
        """Every stored entry in memory (memory in proportion to the entries, not N x L)."""
        indices, values = self.in_memory()._memory
        return CSR(self.indptr.copy(), indices, values, self.shape[1])

    def dense(self) -> np.ndarray:
        """The whole matrix, dense: an explicit read of N x L entries."""
        return self[slice(None)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        size = self.shape[0] * self.shape[1] * self.dtype.itemsize
        if size > SPARSE_THRESHOLD_BYTES:
            raise SplError(
                f"{self.path}: {self.name} is {self.shape[0]} x {self.shape[1]} "
                f"({size / 2**30:.1f} GiB dense); read blocks of rows (m[rows]) or call "
                ".dense() explicitly"
            )
        out = self.dense()
        return out if dtype is None else out.astype(dtype)


LabelMatrix = np.ndarray | SparseRows


def row_blocks(num_rows: int, block_rows: int = BLOCK_ROWS):
    """Slices that cover ``range(num_rows)`` in blocks: how whole-matrix work walks a file."""
    for start in range(0, num_rows, block_rows):
        yield slice(start, min(start + block_rows, num_rows))


def count_values(
    matrix: LabelMatrix, rows: np.ndarray, block_rows: int = BLOCK_ROWS
) -> dict[str, np.ndarray]:
    """Counts over ``rows`` of a matrix's +1 and -1 entries: ``positives_per_row``,
    ``negatives_per_row`` and ``positives_per_class``, read block by block."""
    rows = np.asarray(rows, dtype=np.int64)
    num_columns = matrix.shape[1]
    pos_row = np.zeros(len(rows), dtype=np.int64)
    neg_row = np.zeros(len(rows), dtype=np.int64)
    pos_class = np.zeros(num_columns, dtype=np.int64)
    for part in row_blocks(len(rows), block_rows):
        if isinstance(matrix, SparseRows):
            local, columns, values = matrix.entries(rows[part])
            n = part.stop - part.start
            pos_row[part] = np.bincount(local[values == 1], minlength=n)
            neg_row[part] = np.bincount(local[values == -1], minlength=n)
            pos_class += np.bincount(columns[values == 1], minlength=num_columns)
        else:
            block = np.asarray(matrix[rows[part]]).astype(np.int8)
            pos_row[part] = (block == 1).sum(axis=1)
            neg_row[part] = (block == -1).sum(axis=1)
            pos_class += (block == 1).sum(axis=0)
    return {
        "positives_per_row": pos_row,
        "negatives_per_row": neg_row,
        "positives_per_class": pos_class,
    }
