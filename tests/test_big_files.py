"""Files between stages at OpenImages' scale: feature and scores files written block by
block (memory bounded by a block, measured), contiguous datasets a reader can memory-map,
earlier chunked files still readable, a refused or interrupted write leaves nothing."""

import json
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from spl.data.common import SplError
from spl.data.prepared import load_prepared
from spl.extract import features as feature_file
from spl.extract.features import FeatureWriter, StageFileWriter, feature_path, load_features
from spl.extract.scores import load_scores, scores_path
from spl.imported import import_arrays, import_scores

from conftest import REPO


def _save(folder, name, array):
    path = folder / f"{name}.npy"
    np.save(path, array)
    return path


def _user_arrays(folder, rows=(300, 90), dim=24, classes=7, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    given = {}
    for key, count in zip(("train", "test"), rows, strict=True):
        features = rng.normal(size=(count, dim)).astype(dtype)
        labels = (rng.random((count, classes)) < 0.3).astype(np.uint8)
        labels[np.arange(count), rng.integers(0, classes, count)] = 1  # one positive at least
        given[f"{key}_features"] = _save(folder, f"{key}-features", features)
        given[f"{key}_labels"] = _save(folder, f"{key}-labels", labels)
    return given


def _memory_mapped(path, name):
    """``name`` of the HDF5 file ``path`` read through np.memmap at its offset, the way a
    streaming reader reads it, and through h5py."""
    with h5py.File(path) as h5:
        dataset = h5[name]
        assert dataset.chunks is None and dataset.compression is None, (name, dataset.chunks)
        offset = dataset.id.get_offset()
        assert offset is not None, f"{name} is not allocated contiguously"
        through_h5py = dataset[()]
    mapped = np.memmap(path, dtype=through_h5py.dtype, mode="r", offset=offset,
                       shape=through_h5py.shape)  # fmt: skip
    return np.array(mapped), through_h5py


def test_written_datasets_are_contiguous_and_memory_map_to_their_values(tmp_path, demo_small):
    given = _user_arrays(tmp_path)
    prepared, path = import_arrays(tmp_path / "mine", **given)
    for source, key in (("trainval", "train"), ("test", "test")):
        mapped, stored = _memory_mapped(path, source)
        expected = np.load(given[f"{key}_features"]).astype(np.float32)
        assert mapped.dtype == np.float32 and np.array_equal(mapped, expected)
        assert np.array_equal(stored, expected)
    demo = load_prepared(demo_small)
    counts = {src: len(demo.images[src]) for src in ("trainval", "test")}
    rng = np.random.default_rng(1)
    scores = {src: rng.normal(size=(n, demo.num_classes)) for src, n in counts.items()}
    tiles = {src: rng.normal(size=(n, 4, demo.num_classes)) for src, n in counts.items()}
    files = {src: _save(tmp_path, f"scores-{src}", array) for src, array in scores.items()}
    tile_files = {src: _save(tmp_path, f"tiles-{src}", array) for src, array in tiles.items()}
    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset, ignore=shutil.ignore_patterns("features", "scores"))
    written = import_scores(dataset, train=files["trainval"], test=files["test"],
                            train_tiles=tile_files["trainval"], test_tiles=tile_files["test"])  # fmt: skip
    for src in ("trainval", "test"):
        mapped, _ = _memory_mapped(written, src)
        assert np.array_equal(mapped, scores[src].astype(np.float32))
        mapped, _ = _memory_mapped(written, f"tiles/{src}")
        assert np.array_equal(mapped, tiles[src].astype(np.float32))


def test_files_written_chunked_before_stay_readable(tmp_path, demo_small):
    """Feature and scores files as spl wrote them before (HDF5-chunked datasets) read the
    same as the contiguous ones."""
    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset, ignore=shutil.ignore_patterns("features", "scores"))
    prepared = load_prepared(dataset)
    counts = {src: len(prepared.images[src]) for src in ("trainval", "test")}
    rng = np.random.default_rng(2)
    arrays = {src: rng.normal(size=(n, 12)).astype(np.float16) for src, n in counts.items()}
    attrs = {"format": feature_file.FORMAT, "format_version": 1, "tag": "old", "backbone": "b",
             "dtype": "float16", "feature_dim": 12, "dataset_name": prepared.name,
             "dataset_fingerprint": prepared.fingerprint}  # fmt: skip
    old = feature_path(dataset, "old")
    old.parent.mkdir()
    with h5py.File(old, "w") as h5:
        for src in ("trainval", "test"):
            h5.create_dataset(src, data=arrays[src], chunks=True)
            h5.create_dataset(f"bad/{src}", data=np.zeros(0, np.int64))
        h5.attrs.update(attrs)
    loaded = load_features(prepared, "old")
    for src in ("trainval", "test"):
        assert loaded.features[src].dtype == np.float16
        assert np.array_equal(loaded.features[src], arrays[src])
    scores = {src: rng.normal(size=(n, prepared.num_classes)).astype(np.float32)
              for src, n in counts.items()}  # fmt: skip
    old_scores = scores_path(dataset, "old")
    old_scores.parent.mkdir()
    with h5py.File(old_scores, "w") as h5:
        for src in ("trainval", "test"):
            h5.create_dataset(src, data=scores[src], chunks=True)
            h5.create_dataset(f"bad/{src}", data=np.zeros(0, np.int64))
        h5.attrs.update({"format": "spl.scores", "format_version": 1, "grid": 0,
                         "classes": json.dumps(list(prepared.classes)),
                         "dataset_name": prepared.name,
                         "dataset_fingerprint": prepared.fingerprint})  # fmt: skip
    read = load_scores(prepared, "old")
    assert all(np.array_equal(read.scores[src], scores[src]) for src in ("trainval", "test"))


def test_a_write_that_fails_or_is_left_unfinished_leaves_the_earlier_file(tmp_path):
    path = tmp_path / "features" / "f.h5"
    attrs = {"tag": "f", "backbone": "b", "dataset_name": "d", "dataset_fingerprint": "x"}
    rows = {"trainval": 5, "test": 3}
    first = {"trainval": np.ones((5, 2), np.float32), "test": np.zeros((3, 2), np.float32)}
    feature_file.write_features(path, first, attrs)
    before = path.read_bytes()

    def leftovers():
        return sorted(p.name for p in path.parent.iterdir() if p.name != "f.h5")

    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(path, rows, 2, np.float32, attrs, force=True) as out:
            out.append("trainval", np.full((5, 2), 7, np.float32))
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match=r"not fully written .*'test': '1 of 3 rows'"):
        with FeatureWriter(path, rows, 2, np.float32, attrs, force=True) as out:
            out.append("trainval", np.full((5, 2), 7, np.float32))
            out.append("test", np.full((1, 2), 7, np.float32))
            out.finish()
    with pytest.raises(RuntimeError, match="without finish"):
        with FeatureWriter(path, rows, 2, np.float32, attrs, force=True) as out:
            out.append("trainval", np.full((5, 2), 7, np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        with FeatureWriter(path, rows, 2, np.float32, attrs, force=True) as out:
            out.append("trainval", np.full((6, 2), 7, np.float32))
    with pytest.raises(ValueError, match=r"feature attrs lack \['dataset_fingerprint'\]"):
        with FeatureWriter(path, rows, 2, np.float32, {"tag": "f", "backbone": "b",
                                                       "dataset_name": "d"}, force=True) as out:  # fmt: skip
            out.append("trainval", np.full((5, 2), 7, np.float32))
            out.append("test", np.full((3, 2), 7, np.float32))
            out.finish()
    assert path.read_bytes() == before and leftovers() == []
    with pytest.raises(SplError, match="already exists; pass --force"):
        FeatureWriter(path, rows, 2, np.float32, attrs)
    writer = StageFileWriter(tmp_path / "s.h5", {"a": ((4, 3), np.float16)})
    writer.append("a", np.arange(6).reshape(2, 3))  # converted as NumPy converts
    writer.append("a", np.full((2, 3), 1 / 3))
    writer.finish({"k": 1})
    with h5py.File(tmp_path / "s.h5") as h5:
        expected = np.concatenate([np.arange(6).reshape(2, 3), np.full((2, 3), 1 / 3)])
        assert h5["a"].dtype == np.float16
        assert h5["a"][()].tobytes() == expected.astype(np.float16).tobytes()
        assert h5.attrs["k"] == 1


# The child process: tracemalloc sees every NumPy array's memory (NumPy reports its
# allocations to it), not the pages of a memory-mapped file, which the OS reclaims.
_MEASURE = """
import json, sys, tracemalloc
from pathlib import Path
import numpy as np

def peak(job):
    tracemalloc.start()
    job()
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return top
"""


def _child(code: str) -> dict:
    script = textwrap.dedent(_MEASURE) + textwrap.dedent(code)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_features_many_blocks_large_peaks_near_one_block(tmp_path):
    """import-features of a 32 MiB float64 array with blocks of 1 MiB: the peak of the
    import's arrays stays under 3 blocks (it was the whole array, converted: 48 MiB), and
    the same measurement of loading the array whole sees all of it."""
    rows, dim = 2048, 2048
    rng = np.random.default_rng(3)
    given = {
        "train_features": _save(tmp_path, "train-f", rng.normal(size=(rows, dim))),
        "test_features": _save(tmp_path, "test-f", rng.normal(size=(256, dim))),
        "train_labels": _save(tmp_path, "train-l", np.eye(4, dtype=np.uint8)[np.arange(rows) % 4]),
        "test_labels": _save(tmp_path, "test-l", np.eye(4, dtype=np.uint8)[np.arange(256) % 4]),
    }
    small = _user_arrays(tmp_path, rows=(20, 10))
    measured = _child(f"""
        import spl.imported
        from spl.imported import import_arrays
        given = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in given.items()})}.items()}}
        spl.imported.BLOCK_BYTES = 1 << 20
        small = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in small.items()})}.items()}}
        import_arrays(Path({str(tmp_path / "warm-up")!r}), **small)  # imports every module
        imported = peak(lambda: import_arrays(Path({str(tmp_path / "mine")!r}), **given))
        whole = peak(lambda: np.load(given["train_features"]))
        print(json.dumps({{"imported": imported, "whole": whole}}))
    """)
    array_bytes = rows * dim * 8
    assert measured["whole"] >= array_bytes  # the measurement sees NumPy's arrays
    assert measured["imported"] < 3 * 2**20, measured  # measured: 2.1 MB
    prepared = load_prepared(tmp_path / "mine")
    stored = load_features(prepared, "imported").features["trainval"]
    assert np.array_equal(stored, np.load(given["train_features"]).astype(np.float32))


def test_writing_an_extraction_from_many_chunks_peaks_near_one_chunk(tmp_path):
    """The end of `spl extract`: 32 finished chunks of 1 MiB each streamed into the feature
    file (spl.extract.run.write_feature_file, the pass's writer): the peak stays under 3
    chunks (it was all 32, concatenated); the file holds every chunk in row order, the bad rows and the attributes."""
    measured = _child(f"""
        from spl.extract.chunks import assemble, plan_chunks, save_chunk
        from spl.extract.features import library_versions
        from spl.extract.run import write_feature_file
        library_versions()  # imports torch, sklearn...: not the writer's memory
        partial = Path({str(tmp_path / "features" / ".t.partial")!r})
        partial.mkdir(parents=True)
        counts = {{"trainval": 24 * 64, "test": 8 * 64}}
        chunks = plan_chunks(counts, 64)
        for chunk in chunks:
            block = np.full((chunk.rows, 4096), chunk.offset, np.float32)
            block += np.arange(chunk.rows, dtype=np.float32)[:, None]
            bad = [1] if chunk.number == 2 else []
            block[bad] = np.nan
            save_chunk(partial / f"{{chunk.name}}.npz", {{"features": block}},
                       np.array(bad, np.int64), ["unreadable"] * len(bad))
        attrs = {{"tag": "t", "backbone": "b", "dataset_name": "d", "dataset_fingerprint": "x",
                  "dtype": "float32"}}
        final = partial.parent / "t.h5"
        write = lambda assembly: write_feature_file(final, assembly, attrs, force=False)
        top = peak(lambda: assemble(partial, chunks, counts, str, write))
        print(json.dumps({{"peak": top, "partial_left": partial.exists()}}))
    """)
    assert measured["peak"] < 3 * 2**20, measured  # measured: 2.8 MB (two chunks and a read)
    assert not measured["partial_left"]
    with h5py.File(tmp_path / "features" / "t.h5") as h5:
        assert h5["trainval"].chunks is None and h5["trainval"].shape == (1536, 4096)
        for src, first in (("trainval", 0), ("test", 1536)):
            values = h5[src][:, 0]
            expected = first + np.arange(len(values), dtype=np.float32)
            bad = h5[f"bad/{src}"][()]
            assert np.array_equal(np.delete(values, bad), np.delete(expected, bad))
            assert np.isnan(values[bad]).all()
        assert h5["bad/trainval"][()].tolist() == [129] and h5["bad/test"][()].tolist() == [129]
        assert h5.attrs["bad_images"] == 2 and h5.attrs["feature_dim"] == 4096


def test_labels_too_large_for_dense_storage_are_imported_sparse_with_the_same_draws(
    tmp_path, monkeypatch
):
    """Labels whose dense matrix passes the sparse threshold are read a block at a time
    into the CSR of their positives; the prepared file then holds the same labels and the
    same single-positive draws as a dense import of the same arrays."""
    import spl.data.labels
    import spl.imported

    given = _user_arrays(tmp_path, rows=(300, 90), classes=7)
    dense, _ = import_arrays(tmp_path / "dense", **given)
    monkeypatch.setattr(spl.data.labels, "SPARSE_THRESHOLD_BYTES", 90 * 7 - 1)
    monkeypatch.setattr(spl.imported, "BLOCK_BYTES", 7 * 16)  # labels in blocks of 16 rows
    sparse, _ = import_arrays(tmp_path / "sparse", **given)
    assert not dense.sparse and sparse.sparse
    assert sparse.fingerprint == dense.fingerprint
    for src, key in (("trainval", "train"), ("test", "test")):
        expected = np.load(given[f"{key}_labels"])
        assert np.array_equal(sparse.labels[src].dense(), expected)
        assert np.array_equal(dense.labels[src], expected)
        for name in dense.observed:
            drawn = sparse.observed_set(name)[src].dense()
            assert np.array_equal(drawn, dense.observed_set(name)[src]), name
    features = {tag: load_features(p, "imported").features for tag, p in
                (("dense", dense), ("sparse", sparse))}  # fmt: skip
    assert all(
        np.array_equal(features["dense"][s], features["sparse"][s]) for s in features["dense"]
    )
