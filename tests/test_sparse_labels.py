"""Sparse label matrices: CSR in memory and in HDF5, read by blocks of rows as NumPy would
index the dense matrix; the sparse uniform draw equals the dense one bit for bit."""

import h5py
import numpy as np
import pytest

from spl.data import labels as label_store
from spl.data.common import SplError
from spl.data.labels import CSR, SparseRows, count_values, write_csr
from spl.data.prepared import choose_layout
from spl.data.sampling import observe_uniform, observe_uniform_csr


def _matrix(seed, rows=300, columns=17, density=0.1):
    rng = np.random.RandomState(seed)
    values = rng.choice([-1, 1], size=(rows, columns)).astype(np.int8)
    values[rng.rand(rows, columns) > density] = 0
    values[rng.rand(rows) < 0.2] = 0  # empty rows
    return values


def _stored(tmp_path, dense, name="m"):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as h5:
        write_csr(h5, name, CSR.from_dense(dense))
    return SparseRows(path, name)


def _keys(num_rows, rng):
    """Every kind of first-axis index a caller uses, with NumPy's meaning."""
    mask = rng.rand(num_rows) < 0.3
    return [
        slice(None), slice(5, 40), slice(None, None, -3), np.arange(num_rows)[::7],
        rng.randint(0, num_rows, 50),  # unsorted, with repeats
        np.sort(rng.choice(num_rows, 60, replace=False)), mask, [3, 1, -1],
        np.zeros(0, dtype=np.int64),
    ]  # fmt: skip


def test_csr_round_trip_and_take():
    dense = _matrix(0)
    csr = CSR.from_dense(dense)
    assert csr.nnz == np.count_nonzero(dense)
    np.testing.assert_array_equal(csr.to_dense(), dense)
    rows = np.array([5, 0, 5, 299])
    np.testing.assert_array_equal(csr.take(rows).to_dense(), dense[rows])
    np.testing.assert_array_equal(csr.count_per_row(-1), (dense == -1).sum(1))
    shuffled = np.random.RandomState(1).permutation(csr.nnz)
    entries = np.repeat(np.arange(300), np.diff(csr.indptr))
    again = CSR.from_entries(entries[shuffled], csr.indices[shuffled], csr.values[shuffled],
                             dense.shape)  # fmt: skip
    for a, b in zip(
        (again.indptr, again.indices, again.values),
        (csr.indptr, csr.indices, csr.values),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gap", [0, 1 << 20])  # each requested span read alone / merged
def test_block_reads_index_as_numpy_does(tmp_path, monkeypatch, gap):
    monkeypatch.setattr(label_store, "READ_GAP", gap)
    dense = _matrix(2, rows=3000, columns=40, density=0.2)  # > 64 Ki entries: several chunks
    stored = _stored(tmp_path, dense)
    assert stored.shape == dense.shape and stored.nnz == np.count_nonzero(dense)
    rng = np.random.RandomState(0)
    for key in _keys(len(dense), rng):
        values = stored[key]
        assert values.dtype == np.int8
        np.testing.assert_array_equal(values, dense[key])
        np.testing.assert_array_equal(stored.with_view("positive")[key], (dense[key] == 1))
        assert stored.with_view("positive")[key].dtype == np.uint8
        np.testing.assert_array_equal(stored.with_view("known")[key], dense[key] != 0)
    np.testing.assert_array_equal(stored[7], dense[7])
    np.testing.assert_array_equal(stored[-2], dense[-2])
    np.testing.assert_array_equal(stored.csr().to_dense(), dense)


def test_whole_reads_of_a_large_matrix_are_explicit(tmp_path, monkeypatch):
    dense = _matrix(3)
    stored = _stored(tmp_path, dense)
    np.testing.assert_array_equal(np.asarray(stored), dense)  # small: allowed
    monkeypatch.setattr(label_store, "SPARSE_THRESHOLD_BYTES", dense.size - 1)
    with pytest.raises(SplError, match=r"read blocks of rows \(m\[rows\]\) or call .dense\(\)"):
        np.asarray(stored)
    np.testing.assert_array_equal(stored.dense(), dense)
    with pytest.raises(IndexError, match="by rows only"):
        stored[1:3, 2]
    with pytest.raises(IndexError, match="out of range"):
        stored[[300]]


def test_count_values_reads_dense_and_sparse_alike(tmp_path):
    dense = _matrix(4)
    stored = _stored(tmp_path, dense)
    rows = np.random.RandomState(0).choice(300, 120, replace=False)
    for matrix in (dense, stored):
        counts = count_values(matrix, rows, block_rows=32)
        np.testing.assert_array_equal(counts["positives_per_row"], (dense[rows] == 1).sum(1))
        np.testing.assert_array_equal(counts["negatives_per_row"], (dense[rows] == -1).sum(1))
        np.testing.assert_array_equal(counts["positives_per_class"], (dense[rows] == 1).sum(0))


def test_the_sparse_threshold_and_the_layout_choice():
    """256 MiB of dense entries (a byte each): OpenImages' 1.7 M x 9,605 goes sparse,
    NUS-WIDE's 150,000 x 81 stays dense."""
    assert label_store.SPARSE_THRESHOLD_BYTES == 256 * 2**20
    assert choose_layout("auto", [(2**20, 256), (10, 10)]) == "dense"
    assert choose_layout("auto", [(2**20, 256), (2**20 + 1, 256)]) == "sparse"
    assert choose_layout("auto", [(1_700_000, 9605), (41_620, 9605)]) == "sparse"
    assert choose_layout("auto", [(150_000, 81), (60_260, 81)]) == "dense"
    assert choose_layout("sparse", [(3, 3), (3, 3)]) == "sparse"
    with pytest.raises(SplError, match="auto, dense, sparse"):
        choose_layout("csr", [(3, 3)])


@pytest.mark.parametrize("seed", range(4))
def test_the_sparse_draw_is_the_dense_draw(seed):
    states = _matrix(seed, rows=200, columns=12, density=0.4)
    full = (states == 1).astype(np.uint8)
    for num_pos, num_neg in ((1, 0), (1, 1), (2, 3), (-1, -1), (1, -1)):
        dense = observe_uniform(full, num_pos, num_neg, seed)
        sparse = observe_uniform_csr(CSR.from_dense(full), num_pos, num_neg, seed)
        np.testing.assert_array_equal(sparse.to_dense(), dense)
        partial = observe_uniform(states, num_pos, num_neg, seed, known=states != 0)
        sparse = observe_uniform_csr(CSR.from_dense(states), num_pos, num_neg, seed, partial=True)
        np.testing.assert_array_equal(sparse.to_dense(), partial)
        assert (partial[states == 0] == 0).all()  # an unknown entry is never observed
        assert (states[partial == -1] == -1).all()  # negatives are verified negatives
        assert (states[partial == 1] == 1).all()


def test_partial_draw_by_rule():
    """Row by row: min(P, positives) positives and min(N, verified negatives) negatives; all
    of both (P = N = -1) is the verified labels themselves."""
    states = _matrix(9, rows=400, columns=10, density=0.5)
    observed = observe_uniform(states, 1, 2, 5, known=states != 0)
    np.testing.assert_array_equal((observed == 1).sum(1), np.minimum((states == 1).sum(1), 1))
    np.testing.assert_array_equal((observed == -1).sum(1), np.minimum((states == -1).sum(1), 2))
    np.testing.assert_array_equal(observe_uniform(states, -1, -1, 5, known=states != 0), states)
