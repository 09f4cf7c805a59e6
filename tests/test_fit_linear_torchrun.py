"""`spl fit-linear` under torchrun (2 processes, gloo on the CPU): the run its rank 0 writes
is the single process's, file for file; a killed job resumes to it, with the same or
another number of processes; the units of work go to the processes by work; --loss-parts
is checked however it is set."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.fit.losses import Context, make_losses
from spl.linear_shards import Unit, assign, loss_partition, sweep_units
from spl.runs import read_csv
from spl.settings import LinearSettings

from conftest import invoke, kill_when_file_appears

# Files a finished run holds whose bytes must be the single process's (config.json differs
# in its times, its command line and its record of the processes).
SAME_BYTES = ("results.csv", "per_class_ap.csv", "history.jsonl", "summary.md")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs (the module's fixtures' too) on one thread, as torchrun's
    processes with OMP_NUM_THREADS=1 (on a busy 2-core machine, two threads per tiny
    product spin more than they compute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small imported dataset: 240 train, 60 val, 120 test rows, 16 features, 5 classes."""
    from click.testing import CliRunner

    tmp = tmp_path_factory.mktemp("torchrun_data")
    rng = np.random.RandomState(3)
    centers = rng.randn(5, 16)
    args = ["import-features", tmp / "ds" / "mine"]
    for split, n in (("train", 300), ("test", 120)):
        labels = (rng.rand(n, 5) < 0.3).astype(np.uint8)
        labels[np.arange(n), rng.randint(0, 5, n)] = 1
        features = (labels @ centers + 0.8 * rng.randn(n, 16)).astype(np.float32)
        np.save(tmp / f"{split}_f.npy", features)
        np.save(tmp / f"{split}_l.npy", labels)
        args += [f"--{split}-features", tmp / f"{split}_f.npy"]
        args += [f"--{split}-labels", tmp / f"{split}_l.npy"]
    invoke(CliRunner(), args)
    return tmp / "ds" / "mine"


def _fit_args(dataset: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in ("fit-linear", dataset, "--features", "imported", "--out", out,
                             "--quiet", *extra)]  # fmt: skip


def _torchrun_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "spl", *args]  # fmt: skip


def _torchrun(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        _torchrun_command(args), cwd=cwd, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _only_run(out: Path) -> Path:
    (run,) = (out / "mine" / "imported").iterdir()
    return run


def _bits(tensor: torch.Tensor) -> tuple:
    """A tensor's dtype, shape and bytes: equal when the values are, bit for bit."""
    return (
        tensor.dtype,
        tuple(tensor.shape),
        tensor.contiguous().view(torch.uint8).numpy().tobytes(),
    )


def _assert_same_run(single: Path, distributed: Path) -> None:
    """The distributed run is the single process's: the same bytes, the same tensors, the
    same settings, and none of the processes' own files left."""
    for name in SAME_BYTES:
        assert (distributed / name).read_bytes() == (single / name).read_bytes(), name
    one = torch.load(single / "heads.pt", weights_only=True)
    two = torch.load(distributed / "heads.pt", weights_only=True)
    assert list(one) == list(two) and one["names"] == two["names"]
    for key in ("weight", "bias", "best_epoch", "train_rows"):
        assert _bits(one[key]) == _bits(two[key]), key
    assert list(one["state"]) == list(two["state"])  # the losses' exported state, per head
    for head, state in one["state"].items():
        assert list(state) == list(two["state"][head])
        for name, tensor in state.items():  # (EM + APL's targets hold NaN: compared as bits)
            assert _bits(tensor) == _bits(two["state"][head][name]), (head, name)
    configs = [json.loads((run / "config.json").read_text()) for run in (single, distributed)]
    assert configs[0]["settings"] == configs[1]["settings"]
    assert {p.name for p in distributed.iterdir()} == {p.name for p in single.iterdir()}


# ----------------------------------------------------------------------------- units of work


def test_units_are_the_engine_groups_and_go_to_the_processes_by_work():
    """Work per head and step is its weights and biases plus its trainable per-row state
    (ROLE: one logit per training row and class); each (seed, batch size)'s losses split
    into parts of about equal work, and the units, largest first, each to the least
    loaded process."""
    losses = make_losses(["an", "role", "epr"], None, Context(4, 2.0, None, None))
    settings = LinearSettings(losses=list(losses), lrs=[1e-2, 1e-3], batch_sizes=[10, 20],
                              epochs=3)  # fmt: skip
    # an, epr: (9 + 1) x 4 = 40 entries; role: 40 + 100 x 4 = 440; 2 lrs; steps:
    # 100 // 10 x 3 = 30 and 100 // 20 x 3 = 15.
    whole = sweep_units(settings, losses, rows=100, features=9, classes=4)
    assert [(u.key, u.losses, u.work) for u in whole] == [
        ("s0_bs10", ("an", "epr", "role"), 2 * 520 * 30),
        ("s0_bs20", ("an", "epr", "role"), 2 * 520 * 15),
    ]
    assert assign(whole, 2) == [0, 1] and assign(whole, 1) == [0, 0]
    assert assign(whole, 3) == [0, 1]  # a process may have nothing to train
    # two parts: role alone (440), an and epr (80)
    assert loss_partition({"an": 40, "role": 440, "epr": 40}, 2) == [("role",), ("an", "epr")]
    settings.loss_parts = 2
    parts = sweep_units(settings, losses, rows=100, features=9, classes=4)
    assert [(u.key, u.work) for u in parts] == [
        ("s0_bs10_part1of2", 2 * 440 * 30), ("s0_bs10_part2of2", 2 * 80 * 30),
        ("s0_bs20_part1of2", 2 * 440 * 15), ("s0_bs20_part2of2", 2 * 80 * 15),
    ]  # fmt: skip
    # 26400 -> rank 0; 13200 -> rank 1; 4800 -> rank 1 (13200 < 26400): 18000;
    # 2400 -> rank 1: 20400 against rank 0's 26400
    assert assign(parts, 2) == [0, 1, 1, 1]


def test_assignment_balances_by_work_with_ties_to_the_lower_rank():
    def units(works):
        return [Unit(0, 8, ("an",), i, 0, 1, float(w)) for i, w in enumerate(works)]

    # 5 -> r0; 4 -> r1; 3 -> r1 (4 < 5): 7; 3 -> r0 (5 < 7): 8; 3 -> r1 (7 < 8): 10
    assert assign(units([5, 4, 3, 3, 3]), 2) == [0, 1, 1, 0, 1]
    # largest first whatever the order given, ties to the earlier unit and the lower rank:
    # 6 -> r0; 2 (unit 3) -> r1; 2 (unit 4) -> r2; 1 (unit 0) -> r1 (2 = 2): 3; 1 -> r2
    assert assign(units([1, 1, 6, 2, 2]), 3) == [1, 2, 0, 1, 2]
    assert assign(units([2, 2, 2, 2]), 2) == [0, 1, 0, 1]


def test_loss_parts_out_of_range_are_refused(dataset, tmp_path, runner):
    out = tmp_path / "runs"
    three = ("--losses", "an,role,epr", "--epochs", 1)
    result = invoke(runner, _fit_args(dataset, out, *three, "--loss-parts", 4), ok=False)
    assert "--loss-parts 4 is outside its range 1..3" in result.output
    assert "trains 3 (an, role, epr)" in result.output
    result = invoke(runner, _fit_args(dataset, out, *three, "--loss-parts", 0), ok=False)
    assert "--loss-parts must be >= 1, got 0" in result.output
    config = tmp_path / "fit.toml"
    for value, message in ((4, "loss_parts 4 is outside its range 1..3"),
                           (0, "loss_parts must be >= 1, got 0"),
                           (1.5, "loss_parts takes an integer, got 1.5")):  # fmt: skip
        config.write_text(f"loss_parts = {value}\nlosses = 'an,role,epr'\n")
        result = invoke(runner, _fit_args(dataset, out, "--config", config), ok=False)
        assert f"{config}: {message}" in result.output, result.output
    assert not out.exists()  # refused before a run directory exists
    from spl.linear import run_linear

    for parts in (0, 4, True, 1.5):
        settings = LinearSettings(losses=["an", "role", "epr"], epochs=1, loss_parts=parts)
        with pytest.raises(SplError, match="--loss-parts .* is outside its range 1..3"):
            run_linear(dataset, "imported", settings, out, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- torchrun

# Two groups (batch sizes 8 and 16); epochs enough that a kill after the first
# checkpoints lands before the end.
TWO_GROUPS = ("--losses", "an,role,epr", "--lrs", "1e-2,1e-3", "--batch-sizes", "8,16",
              "--epochs", 40)  # fmt: skip


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory):
    """The single process's run of TWO_GROUPS."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("single")
    invoke(CliRunner(), _fit_args(dataset, out, *TWO_GROUPS))
    return _only_run(out)


@pytest.mark.slow
def test_two_processes_write_the_single_process_run(dataset, single_run, tmp_path):
    output = _torchrun(_fit_args(dataset, tmp_path / "runs", *TWO_GROUPS), tmp_path)
    run = _only_run(tmp_path / "runs")
    _assert_same_run(single_run, run)
    assert output.count("run: ") == 1 and output.count("ROLE ") == 1  # rank 0 alone prints
    assert "2 engine groups over 2 processes" in output
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2
    assert [share["units"] for share in config["shares"]] == [["s0_bs8"], ["s0_bs16"]]


@pytest.mark.slow
def test_one_group_split_by_loss_parts_equals_one_process_with_the_same_parts(
    dataset, tmp_path, runner
):
    # losses with exported state: ROLE's estimates, EM + APL's soft negatives, LL-Cp's flips
    args = ("--losses", "an,role,em_apl,ll_cp", "--lrs", "1e-2,1e-3", "--batch-sizes", "8",
            "--epochs", 4, "--loss-parts", 2, "--loss-option", "em_apl.warmup=1")  # fmt: skip
    invoke(runner, _fit_args(dataset, tmp_path / "single", *args))
    _torchrun(_fit_args(dataset, tmp_path / "runs", *args), tmp_path)
    run = _only_run(tmp_path / "runs")
    _assert_same_run(_only_run(tmp_path / "single"), run)
    shares = json.loads((run / "config.json").read_text())["shares"]
    # ROLE (with its per-row estimator) is the heavier part: alone on rank 0
    assert [share["units"] for share in shares] == [["s0_bs8_part1of2"], ["s0_bs8_part2of2"]]
    assert len(read_csv(run / "results.csv")) == 4 * 2


def _kill_when_checkpointed(process: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """SIGKILL a torchrun job (its agent and its workers, each in a session of its own) as
    soon as both ranks have written a checkpoint; returns the run directory."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        runs = list(out.glob("mine/imported/linear-*"))
        if runs and all((runs[0] / name).exists() for name in ("checkpoint.pt", "checkpoint.rank1.pt")):  # fmt: skip
            workers = _children(process.pid)
            for pid in [process.pid, *workers]:
                os.kill(pid, signal.SIGKILL)
            process.wait()
            for pid in workers:  # gone before the run is resumed
                while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
                    time.sleep(0.01)
            return runs[0]
        time.sleep(0.01)
    raise AssertionError("the job ended before both ranks had written a checkpoint")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_same_run_with_two_processes_or_one(
    dataset, single_run, tmp_path, runner
):
    out = tmp_path / "runs"
    process = subprocess.Popen(
        _torchrun_command(_fit_args(dataset, out, *TWO_GROUPS)), cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run = _kill_when_checkpointed(process, out)
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    assert {"history.rank0.jsonl", "history.rank1.jsonl"} <= {p.name for p in run.iterdir()}
    # killed in the middle: rank 0's batch size 8 group saved as an engine state
    (saved,) = torch.load(run / "checkpoint.pt", weights_only=True)["units"].values()
    assert saved["state"]["groups"][0]["epochs_done"] < 40
    # the same run resumed by a single process: it reads both ranks' checkpoints
    copy = tmp_path / "copy" / run.name
    shutil.copytree(run, copy)
    invoke(runner, ["fit-linear", "--resume", copy, "--quiet"])
    _assert_same_run(single_run, copy)
    _torchrun(["fit-linear", "--resume", str(run), "--quiet"], tmp_path)
    _assert_same_run(single_run, run)


@pytest.mark.slow
def test_a_killed_single_process_run_resumes_under_torchrun(dataset, single_run, tmp_path):
    out = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "spl", *_fit_args(dataset, out, *TWO_GROUPS)], cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    checkpoint = kill_when_file_appears(process, out, "mine/imported/linear-*/checkpoint.pt")
    run = checkpoint.parent
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    units = torch.load(checkpoint, weights_only=True)["units"]
    assert list(units) == ["s0_bs8"] and units["s0_bs8"]["state"]["groups"][0]["epochs_done"] < 40
    _torchrun(["fit-linear", "--resume", str(run), "--quiet"], tmp_path)
    _assert_same_run(single_run, run)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_run_interrupted_by_an_earlier_version_resumes_under_torchrun(
    dataset, single_run, tmp_path
):
    """Earlier versions checkpointed one engine state of the whole grid (every (seed, batch
    size) group in one StackedHeads): such a run resumes, each group as its unit."""
    from spl.data.prepared import load_prepared
    from spl.extract.features import unreadable_rows
    from spl.fit.engine import StackedHeads
    from spl.fit.losses import SINGLE_POSITIVE, WITH_NEGATIVES
    from spl.linear_plan import split_features
    from spl.runs import mark_incomplete, read_jsonl
    from spl.settings import settings_from
    from spl.training import training_inputs

    run = tmp_path / "runs" / single_run.name
    shutil.copytree(single_run, run)
    for name in ("results.csv", "per_class_ap.csv", "heads.pt", "summary.md"):
        (run / name).unlink()
    mark_incomplete(run, "linear")
    config = json.loads((run / "config.json").read_text())
    settings = settings_from(LinearSettings, config["settings"])
    prepared = load_prepared(dataset)
    inputs = training_inputs(prepared, settings, settings.losses, unreadable_rows(prepared, "imported"))  # fmt: skip
    features, _ = split_features(prepared, "imported", inputs.rows)
    model = StackedHeads(  # the earlier version's one engine of the whole grid
        losses=inputs.losses, lrs=settings.lrs, batch_sizes=settings.batch_sizes,
        seeds=settings.seeds, epochs=settings.epochs, device="cpu",
        histogram_bins=settings.histogram_bins,
    )  # fmt: skip

    def stop_after_three_epochs(model, record):
        if record["epoch"] == 3:
            torch.save(model.state_dict(), run / "checkpoint.pt")
            raise _Stop

    with pytest.raises(_Stop):
        model.fit(
            features["train"], inputs.observed[SINGLE_POSITIVE], labels=inputs.labels("train"),
            X_val=features["val"], Y_val=inputs.selection_labels,
            observed_iu=inputs.observed.get(WITH_NEGATIVES), on_epoch=stop_after_three_epochs,
        )  # fmt: skip
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert [group["epochs_done"] for group in saved["groups"]] == [3, 0]
    # the history as a kill after the checkpoint leaves it: rows beyond the checkpoint's 18
    history = read_jsonl(run / "history.jsonl")
    (run / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history[:30]))
    _torchrun(["fit-linear", "--resume", str(run), "--quiet"], tmp_path)
    _assert_same_run(single_run, run)


def test_a_checkpoint_of_another_grid_is_refused(tmp_path):
    from spl.linear_shards import saved_units
    from spl.runs import Run, save_torch

    run = Run(tmp_path, {})
    units = [Unit(0, 8, ("an", "role"), 0, 0, 1, 1.0)]
    heads = [{"loss": loss, "lr": 1e-3, "batch_size": 8, "seed": 0} for loss in ("an", "role")]
    save_torch(tmp_path / "checkpoint.rank1.pt", {"units": {"s0_bs8": {"fit": {"heads": heads}}}})
    assert list(saved_units(run, units, [1e-3])) == ["s0_bs8"]
    for key, losses in (("s0_bs16", ("an", "role")), ("s0_bs8", ("an",))):
        entry = {"state": {"heads": [h for h in heads if h["loss"] in losses]}}
        save_torch(tmp_path / "checkpoint.rank1.pt", {"units": {key: entry}})
        with pytest.raises(SplError, match=f"checkpoint.rank1.pt holds the engine group '{key}'"):
            saved_units(run, units, [1e-3])
    # an earlier version's whole-grid checkpoint of another grid
    save_torch(
        tmp_path / "checkpoint.rank1.pt", {"heads": heads, "groups": [{}, {}], "history": []}
    )
    with pytest.raises(SplError, match="is a checkpoint of another grid than this run's"):
        saved_units(run, units, [1e-3])


@pytest.mark.slow
def test_a_process_failing_alone_ends_the_job(dataset, tmp_path):
    """Rank 0 fails to create the run (--out under a file) while rank 1 waits for its path:
    rank 0 leaves without a closing barrier that rank 1 would never meet, and torchrun ends
    the job (a barrier there waited for the collectives' timeout, days)."""
    (tmp_path / "a-file").write_text("x")
    args = _fit_args(dataset, tmp_path / "a-file" / "runs", "--losses", "an", "--epochs", 1)
    done = subprocess.run(
        _torchrun_command(args), cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "Not a directory" in done.stdout + done.stderr
