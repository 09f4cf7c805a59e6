"""Killed writes leave nothing behind for good: every writer goes through
``spl.data.common.atomic_path``, whose temporary ``.<name>.tmp-<host>-<pid>`` the next write
of the same file removes once its process is gone, and never while it runs. Real processes,
killed with SIGKILL mid-write."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spl.data.common import (
    atomic_path,
    remove_stale_temporaries,
    temporary_path,
    write_json_atomic,
    write_text_atomic,
)

from conftest import invoke

# Writes the temporary of the file argv[1] through atomic_path, prints its name, then waits
# to be killed: a write caught in the middle.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from spl.data.common import atomic_path

    with atomic_path(Path(sys.argv[1]), force=True) as tmp:
        tmp.write_bytes(b"half a file")
        print(tmp, flush=True)
        time.sleep(300)
    """
)


def start_writer(final: Path) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of writing ``final``, and its temporary."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, text=True
    )
    tmp = Path(process.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == final.parent, tmp
    return process, tmp


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()  # reaped: the pid no longer runs
    process.stdout.close()


def killed_writer(final: Path) -> Path:
    """The temporary a writer of ``final`` killed mid-write left behind."""
    process, tmp = start_writer(final)
    kill(process)
    assert tmp.is_file()
    return tmp


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()


def test_the_temporary_names_the_host_and_the_process(tmp_path):
    final = tmp_path / "labels.h5"
    with atomic_path(final) as tmp:
        assert re.fullmatch(rf"\.labels\.h5\.tmp-[A-Za-z0-9._]+-{os.getpid()}", tmp.name)
        assert tmp == temporary_path(final) and tmp.parent == tmp_path
        tmp.write_text("x")
    assert final.read_text() == "x" and not tmp.exists()


def test_a_killed_import_scores_write_is_cleaned_by_the_next_run(demo_small, runner, tmp_path):
    """The issue's case: `spl import-scores` killed while writing scores/imported.h5."""
    from spl.data.prepared import load_prepared
    from spl.extract.scores import load_scores

    dataset = tmp_path / "demo"
    shutil.copytree(demo_small, dataset, ignore=shutil.ignore_patterns("features", "scores"))
    final = dataset / "scores" / "imported.h5"
    final.parent.mkdir()
    leftover = killed_writer(final)
    arrays = {}
    for name, rows in (("train", 160), ("test", 80)):
        arrays[name] = np.random.default_rng(rows).normal(size=(rows, 10)).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", arrays[name])
    command = ["import-scores", dataset, "--train", tmp_path / "train.npy"]
    invoke(runner, [*command, "--test", tmp_path / "test.npy"])
    assert not leftover.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["imported.h5"]
    loaded = load_scores(load_prepared(dataset), "imported")
    assert np.array_equal(loaded.scores["test"], arrays["test"])


def test_a_live_writers_temporary_is_kept_until_it_is_killed(tmp_path):
    final = tmp_path / "settings.json"
    process, live = start_writer(final)
    try:
        write_json_atomic(final, {"a": 1})  # another writer of the same file meanwhile
        assert live.read_bytes() == b"half a file"
        assert remove_stale_temporaries(tmp_path) == []
    finally:
        kill(process)
    write_json_atomic(final, {"a": 2})
    assert not live.exists() and final.read_text() == '{\n  "a": 2\n}\n'


def test_only_dead_writers_of_this_machine_and_this_file_are_removed(tmp_path, live_pid):
    final = tmp_path / "notes.txt"
    host = temporary_path(final).name.removeprefix(".notes.txt.tmp-").rsplit("-", 1)[0]
    dead = dead_pid()
    stale = [
        tmp_path / f".notes.txt.tmp-{host}-{dead}",
        tmp_path / f".notes.txt.tmp-{dead}",  # the name an older spl gave its temporaries
    ]
    kept = [
        tmp_path / f".notes.txt.tmp-{host}-{live_pid}",  # a live writer
        tmp_path / f".notes.txt.tmp-elsewhere-{dead}",  # another machine: its pid says nothing
        tmp_path / f".other.txt.tmp-{host}-{dead}",  # another file's: its own writes clean it
        tmp_path / "notes.txt.tmp-1",  # not a name spl gives
    ]
    for path in stale + kept:
        path.write_text("left")
    write_text_atomic(final, "done")
    assert final.read_text() == "done"
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in kept)
    removed = remove_stale_temporaries(tmp_path)  # a whole folder: every file's
    assert removed == [tmp_path / f".other.txt.tmp-{host}-{dead}"]


def _labels(dataset: Path) -> Path:
    from spl.data.demo import build_demo
    from spl.data.prepared import write_prepared

    raw = build_demo(dataset, train_images=20, test_images=10, seed=0, force=True)
    write_prepared(raw, dataset / "labels.h5", force=True)
    return dataset / "labels.h5"


def _features(dataset: Path) -> Path:
    from spl.extract.features import feature_path, write_features

    path = feature_path(dataset, "mine")
    arrays = {"trainval": np.zeros((4, 3), np.float32), "test": np.ones((2, 3), np.float32)}
    attrs = {"tag": "mine", "backbone": "b", "dataset_fingerprint": "f", "dataset_name": "d"}
    return write_features(path, arrays, attrs, force=True)


def _scores(dataset: Path) -> Path:
    from spl.extract.scores import scores_path, write_scores

    path = scores_path(dataset, "mine")
    arrays = {"trainval": np.zeros((4, 3), np.float32), "test": np.ones((2, 3), np.float32)}
    attrs = {"tag": "mine", "scorer": "s", "dataset_fingerprint": "f", "dataset_name": "d",
             "classes": ["a", "b", "c"], "grid": 0}  # fmt: skip
    return write_scores(path, arrays, attrs, force=True)


def _cache(dataset: Path) -> Path:
    from spl.data.cache import build_cache, cache_paths
    from spl.data.prepared import load_prepared

    prepared = load_prepared(_labels(dataset))
    build_cache(prepared, 8, workers=0, force=True, progress=False)
    return cache_paths(prepared, "test", 8)[0]


def _torch(dataset: Path) -> Path:
    from spl.runs import save_torch

    path = dataset / "run" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, {"weight": torch.ones(2)})
    return path


def _json(dataset: Path) -> Path:
    write_json_atomic(dataset / "run" / "config.json", {"lr": 0.1})
    return dataset / "run" / "config.json"


WRITERS = {"labels.h5": _labels, "features": _features, "scores": _scores, "cache": _cache,
           "torch": _torch, "json": _json}  # fmt: skip


@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
def test_every_writer_removes_what_its_killed_writes_left(tmp_path, write):
    """Each writer once, to learn its file; a writer of that file killed mid-write; the
    writer again: the leftover is gone, the file is whole."""
    dataset = tmp_path / "demo"
    final = write(dataset)
    leftover = killed_writer(final)
    before = final.read_bytes()
    assert write(dataset) == final and not leftover.exists()
    assert not [p for p in final.parent.iterdir() if ".tmp-" in p.name]
    if final.suffix in (".json", ".npy"):
        assert final.read_bytes() == before


def test_a_partial_folder_drops_the_chunks_killed_writers_left(tmp_path, live_pid):
    """A resumed extraction removes the chunk temporaries of dead processes only."""
    from spl.extract.chunks import open_partial

    partial = tmp_path / ".tag.partial"
    open_partial(partial, {"backbone": "b"}, 4, force=False)
    dead = killed_writer(partial / "trainval-000001.npz")
    host = dead.name.removeprefix(".trainval-000001.npz.tmp-").rsplit("-", 1)[0]
    live = partial / f".trainval-000002.npz.tmp-{host}-{live_pid}"
    live.write_bytes(b"being written")
    open_partial(partial, {"backbone": "b"}, 4, force=False)
    assert not dead.exists() and live.exists()
