"""The state of the methods since 2021 (EM + APL's soft negatives, LL-Cp's permanent flips)
through real runs: the same on every torchrun rank, equal to a one-process replay of the
updates, kept across epochs and through --resume; option and observed-set refusals before
a run exists; `spl fit-linear --losses since-2021` end to end. On the demo digits with the
real EfficientNet-Lite0 weights at 48 px, on the CPU."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spl.data.prepared import load_prepared
from spl.fit.losses import SINCE_2021, Batch, Context, get_loss
from spl.runs import read_csv

from conftest import invoke, kill_when_file_appears

SIZE = 48
TAG = f"efficientnet_lite0-IMAGENET1K_TF-{SIZE}"
BACKBONE = ["--backbone", "efficientnet_lite0", "--image-size", SIZE]
NEGATIVES = "uniform-p1-n1-s1200"  # `spl data prepare` adds it: 1 positive + 1 negative


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per process, here and in the runs started here (as torchrun sets it):
    a straight and a resumed run then compare bit for bit, and two threads do not spin
    against other work on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo digits with 129 training rows (odd: a distributed scoring pass pads one)
    and Lite0 features at 48 px."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("state")
    runner = CliRunner()
    invoke(runner, ["data", "prepare", "demo", "--root", root, "--train-images", 161,
                    "--test-images", 40])  # fmt: skip
    dataset = root / "demo"
    invoke(runner, ["extract", dataset, *BACKBONE, "--device", "cpu", "--workers", 0])
    prepared = load_prepared(dataset)
    assert len(prepared.split["train"]) == 129 and NEGATIVES in prepared.observed
    return dataset


def _context(dataset: Path) -> Context:
    prepared = load_prepared(dataset)
    return Context(prepared.num_classes, prepared.expected_positives, prepared.name)


def _finetune_args(dataset, out, *extra) -> list:
    return ["finetune", dataset, *BACKBONE, "--batch-sizes", 16, "--device", "cpu",
            "--workers", 0, "--out", out, "--quiet", *extra]  # fmt: skip


def _only_run(folder: Path, kind: str) -> Path:
    (run,) = [p for p in folder.iterdir() if p.name.startswith(f"{kind}-")]
    return run


# ----------------------------------------------------------------------------- torchrun


def _distributed_states(
    dataset: Path, key: str, options: dict, epochs: int, out: Path, drop_last: bool = True
):
    """Both ranks' dumps of tests/ddp_state.py, fine-tuning ``key`` under torchrun (the last
    partial batch dropped, the paper's, or kept, the releases')."""
    out.mkdir()
    script = Path(__file__).with_name("ddp_state.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29500 + (os.getpid() + 7) % 1000), str(script),
               str(dataset), key, json.dumps(options), str(epochs), str(out),
               "drop" if drop_last else "keep"]  # fmt: skip
    done = subprocess.run(
        command, cwd=out, env=ONE_THREAD, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [d["world"] for d in ranks] == [2, 2] and [d["rank"] for d in ranks] == [0, 1]
    return ranks


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


def _rank_batches(
    rows: int, epoch: int, world: int = 2, per_rank: int = 8, drop_last: bool = True
) -> list[list]:
    """Each rank's batches of an epoch as ImageSplits.train_loader deals them: PyTorch's
    DistributedSampler (dropping the tail or padding it with rows from the epoch's start to
    equal shares), cut into batches of ``per_rank``, the last partial one dropped or kept."""
    from torch.utils.data.distributed import DistributedSampler

    out = []
    for rank in range(world):
        sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True,
                                     seed=0, drop_last=drop_last)  # fmt: skip
        sampler.set_epoch(epoch)
        order = list(sampler)
        end = len(order) // per_rank * per_rank if drop_last else len(order)
        out.append([order[i : i + per_rank] for i in range(0, end, per_rank)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("drop_last", [True, False], ids=["paper", "partial-batch-kept"])
def test_ll_cp_flips_are_the_same_on_every_rank_and_replay_in_one_process(
    demo, tmp_path, drop_last
):
    """Also with the releases' batching: 129 rows in global batches of 16 make 8 full
    steps and a last one of one row, padded with a second row so that each rank takes one."""
    epochs, options = 2, {"delta_rel": 5.0}  # k = ceil(8 x 10 x 5%) = 4 per part: 3 flips
    ranks = _distributed_states(demo, "ll_cp", options, epochs, tmp_path / "ll_cp", drop_last)
    observed = ranks[0]["observed"]
    for a, b in zip(ranks[0]["states"], ranks[1]["states"], strict=True):
        _assert_same(a, b)
    flips = [s["flipped"] for s in ranks[0]["states"]]
    assert len(flips) == epochs and not flips[0].any()  # epoch 1 is plain AN
    assert flips[-1].any() and not (flips[-1] & (observed != 0)).any()  # unobserved only
    # Every rank applied every rank's part of every step, in rank order: the parts are the
    # batches the sampler dealt to rank 0, then rank 1, step by step.
    calls = ranks[0]["calls"]
    assert len(calls) == len(ranks[1]["calls"])
    for a, b in zip(calls, ranks[1]["calls"], strict=True):
        assert a["epoch"] == b["epoch"]
        for name in ("rows", "logits", "observed", "labels"):
            assert torch.equal(a[name], b[name]), name
    expected_rows = []
    rows = ranks[0]["train_rows"]
    for epoch in range(1, epochs + 1):
        dealt = _rank_batches(rows, epoch, drop_last=drop_last)
        assert [len(d) for d in dealt] == [rows // 16 if drop_last else math.ceil(rows / 16)] * 2
        for step in range(len(dealt[0])):
            expected_rows += [(epoch, dealt[rank][step]) for rank in range(2)]
        if not drop_last:  # every row trained on in the epoch, the last step's shares equal
            assert {r for d in dealt for b in d for r in b} == set(range(rows))
            assert [len(d[-1]) for d in dealt] == [1, 1]
    assert [(c["epoch"], c["rows"].tolist()) for c in calls] == expected_rows
    # One process applying the same parts in that order reaches each epoch's state.
    loss = get_loss("ll_cp").make(options, _context(demo))
    state = {"flipped": loss.init_state(observed, heads=1, seed=0)["flipped"][0]}
    for epoch in range(1, epochs + 1):
        for call in (c for c in calls if c["epoch"] == epoch):
            rows_state = loss.batch_state(state, call["rows"])
            _assert_same(rows_state, call["state"])  # what the part's rank saw in its step
            batch = Batch(call["observed"], call["labels"], epoch, epochs, rows_state)
            loss.after_step(state, rows=call["rows"], logits=call["logits"], batch=batch)
        assert torch.equal(state["flipped"], flips[epoch - 1]), epoch
    # Parts of unequal sizes that share a row (rank 0: rows 0-2, rank 1: rows 2-6): the
    # same on both ranks, and what one process applying them in rank order leaves.
    fresh = {"flipped": torch.zeros_like(state["flipped"])}
    for dump in ranks:
        part = dump["unequal"]["part"]
        batch = Batch(part["observed"], part["labels"], 2, epochs, part["state"])
        loss.after_step(fresh, rows=part["rows"], logits=part["logits"], batch=batch)
    assert fresh["flipped"].any()
    for dump in ranks:
        assert torch.equal(dump["unequal"]["after"]["flipped"], fresh["flipped"])


@pytest.mark.slow
def test_apl_soft_negatives_are_the_same_on_every_rank(demo, tmp_path):
    from spl.fit.losses import apl_label

    epochs, options = 2, {"warmup": 1}  # APL labels after epochs 1 and 2
    ranks = _distributed_states(demo, "em_apl", options, epochs, tmp_path / "em_apl")
    observed = ranks[0]["observed"]
    for a, b in zip(ranks[0]["states"], ranks[1]["states"], strict=True):
        _assert_same(a, b)
    assert not ranks[0]["calls"]  # no after-step hook: FineTuner gathers nothing per step
    ends = [d["ends"] for d in ranks]
    assert [e["epoch"] for e in ends[0]] == [1, 2]
    # The scores are every row's, in row order, the same on both ranks: each rank's share
    # of the rows lands on its rows; the row the sampler repeated to pad rank 1's share
    # (129 rows, odd) keeps rank 0's score. The ranks score with the same model (rank 0's
    # BatchNorm statistics, broadcast after each epoch), each with its own random flips.
    for a, b in zip(ranks[0]["norms"], ranks[1]["norms"], strict=True):
        assert torch.equal(a, b)
    padded_differs = False
    for epoch in range(epochs):
        gathered = ends[0][epoch]["scores"][0]
        assert torch.equal(gathered, ends[1][epoch]["scores"][0])
        assert gathered.shape == (129, 10) and not gathered.isnan().any()
        seen: set[int] = set()
        for rank in range(2):
            index = ends[rank][epoch]["local_index"].tolist()
            local = ends[rank][epoch]["local_scores"]
            for position, row in enumerate(index):
                if row in seen:
                    assert rank == 1 and row == 0  # the padding repeats the first row
                    padded_differs |= not torch.equal(local[position], gathered[row])
                    continue
                assert torch.equal(local[position], gathered[row]), (rank, row)
                seen.add(row)
        assert seen == set(range(129))
    assert padded_differs
    # One process labelling with those scores reaches each epoch's soft negatives.
    loss = get_loss("em_apl").make(options, _context(demo))
    state = {k: v[0] if v.dim() == 3 else v for k, v in loss.init_state(observed, heads=1,
                                                                         seed=0).items()}  # fmt: skip
    for epoch in range(1, epochs + 1):
        targets = state["pseudo_targets"][None]
        apl_label(targets, ends[0][epoch - 1]["scores"], state["unobserved"],
                  state["unobserved_counts"], 0.9, epochs - 1)  # fmt: skip
        _assert_same({"t": state["pseudo_targets"]},
                     {"t": ranks[0]["states"][epoch - 1]["pseudo_targets"]})  # fmt: skip
    labelled = ~torch.isnan(state["pseudo_targets"])
    assert labelled.any() and not (labelled & (observed != 0)).any()


# ----------------------------------------------------------------------------- resume


def _kill_after_epoch(process: subprocess.Popen, root: Path, epoch: int, timeout=300) -> Path:
    """SIGKILL ``process`` once a fine-tune's history records ``epoch`` (its last.pt is
    saved before the history line): conftest.kill_when_file_appears, for a later epoch."""
    import signal

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        for history in root.glob(f"demo/{TAG}/finetune-*/*/history.jsonl"):
            lines = history.read_text().splitlines()
            if any(json.loads(line)["epoch"] == epoch for line in lines if line.endswith("}")):
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return history.parent / "last.pt"
        time.sleep(0.02)
    raise AssertionError(f"epoch {epoch} was not recorded before the process ended")


@pytest.mark.slow
def test_ll_cp_flips_persist_through_resume(demo, runner, tmp_path):
    args = ["--loss", "ll_cp", "--loss-option", "ll_cp.delta_rel=5", "--lrs", "1e-3",
            "--epochs", 3]  # fmt: skip
    invoke(runner, _finetune_args(demo, tmp_path / "straight", *args))
    straight_run = _only_run(tmp_path / "straight" / "demo" / TAG, "finetune")
    straight = read_csv(straight_run / "results.csv")
    command = [sys.executable, "-m", "spl", *map(str, _finetune_args(demo, tmp_path / "killed",
                                                                     *args))]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=ONE_THREAD)
    last = _kill_after_epoch(process, tmp_path / "killed", epoch=2)
    run = last.parent.parent
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    saved = torch.load(last, weights_only=True)
    assert saved["state"]["epoch"] == 2
    at_kill = saved["model"]["state_flipped"]  # the checkpoint carries epoch 2's flips
    assert at_kill.any()
    invoke(runner, ["finetune", "--resume", run, "--quiet"])
    resumed = read_csv(run / "results.csv")
    timing = {"images_per_second", "data_wait_fraction"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight
    ]
    (config,) = [p for p in run.iterdir() if p.is_dir()]
    best = {
        name: torch.load(folder / config.name / "best.pt", weights_only=True)["model"]
        for name, folder in (("straight", straight_run), ("resumed", run))
    }
    assert best["straight"].keys() == best["resumed"].keys()
    for key, value in best["straight"].items():
        assert torch.equal(value, best["resumed"][key]), key
    # the flips of epoch 2 are kept in epoch 3 (or are the best epoch's own)
    flips = best["resumed"]["state_flipped"]
    assert int(straight[0]["best_epoch"]) >= 2
    assert bool((flips | at_kill).eq(flips).all()) and flips.sum() >= at_kill.sum()
    observed = load_prepared(demo).observed["uniform-p1-n0-s1200"]["trainval"]
    observed = observed[load_prepared(demo).split["train"]]
    assert not flips[torch.from_numpy(observed != 0)].any()


# ----------------------------------------------------------------------------- refusals


def _refusal_cases(command: str) -> list[tuple[list, list[str]]]:
    """(options, what the message must name) of each run refused before it starts."""
    many = "--losses" if command == "fit-linear" else "--loss"
    cases = [([many, "em_apl", "--epochs", 3, "--loss-option", "em_apl.warmup=3"],
              ["em_apl.warmup", "at or past the number of epochs (3)"])]  # fmt: skip
    for key in ("ll_r", "ll_ct", "ll_cp"):
        for value in (0, 100, -0.5):
            cases.append(([many, key, "--loss-option", f"{key}.delta_rel={value}"],
                          [f"{key}.delta_rel = {value:g} is outside its range (0, 100)"]))  # fmt: skip
    for key in ("em", "em_apl"):
        cases.append(([many, key, "--observed", NEGATIVES],
                      [f"{key} assumes single positives", repr(NEGATIVES)]))  # fmt: skip
    return cases


@pytest.mark.parametrize("command", ["fit-linear", "finetune"])
def test_bad_state_options_are_refused_before_a_run_exists(demo, runner, tmp_path, command):
    for number, (options, named) in enumerate(_refusal_cases(command)):
        out = tmp_path / f"case{number}"
        if command == "fit-linear":
            args = ["fit-linear", demo, "--features", TAG, "--out", out, "--quiet", *options]
        else:
            args = _finetune_args(demo, out, *options)
        result = invoke(runner, args, ok=False)
        for text in named:
            assert text in result.output, (options, result.output)
        assert not out.exists(), options  # no run directory


# ----------------------------------------------------------------------------- fit-linear


def _fit_since_2021(dataset: Path, out: Path) -> list:
    return ["fit-linear", dataset, "--features", TAG, "--losses", "since-2021", "--lrs", "1e-3",
            "--batch-sizes", 16, "--epochs", 12, "--loss-option", "em_apl.warmup=2",
            "--loss-option", "ll_cp.delta_rel=2", "--out", out, "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_fit_linear_since_2021_records_and_resumes(demo, runner, tmp_path):
    invoke(runner, _fit_since_2021(demo, tmp_path / "straight"))
    straight_run = _only_run(tmp_path / "straight" / "demo" / TAG, "linear")
    rows = read_csv(straight_run / "results.csv")
    assert sorted(r["loss"] for r in rows) == sorted(SINCE_2021)
    for row in rows:
        assert 0 < float(row["train_recovery_map"]) <= 100, row["loss"]
        assert 0 < float(row["test_map"]) <= 100, row["loss"]
    # the unobserved-positive histogram of every head at every epoch
    prepared = load_prepared(demo)
    train = prepared.split["train"]
    hidden = int(((prepared.labels["trainval"][train] == 1)
                  & (prepared.observed["uniform-p1-n0-s1200"]["trainval"][train] == 0)).sum())  # fmt: skip
    history = [json.loads(line) for line in (straight_run / "history.jsonl").read_text().splitlines()]  # fmt: skip
    assert sorted({h["head"] for h in history}) == sorted(r["head"] for r in rows)
    assert len(history) == 9 * 12
    for record in history:
        assert sum(record["hidden_positive_histogram"]) == hidden, record["head"]
    # the losses' state, exported with the heads: APL's soft negatives, LL-Cp's flips
    heads = torch.load(straight_run / "heads.pt", weights_only=True)
    observed = torch.from_numpy(prepared.observed["uniform-p1-n0-s1200"]["trainval"][train])
    (apl,) = [s for n, s in heads["state"].items() if n.startswith("em_apl_")]
    (llcp,) = [s for n, s in heads["state"].items() if n.startswith("ll_cp_")]
    labelled = ~torch.isnan(apl["pseudo_targets"])
    assert labelled.any() and not (labelled & (observed != 0)).any()
    assert llcp["flipped"].any() and not (llcp["flipped"] & (observed != 0)).any()
    # a run killed after its first checkpoint resumes to the same results and state
    command = [sys.executable, "-m", "spl", *map(str, _fit_since_2021(demo, tmp_path / "killed"))]
    process = subprocess.Popen(command, cwd=tmp_path, env=ONE_THREAD)
    checkpoint = kill_when_file_appears(
        process, tmp_path / "killed", f"demo/{TAG}/linear-*/checkpoint.pt", timeout=120
    )
    run = checkpoint.parent
    assert (run / "INCOMPLETE").exists() and not (run / "results.csv").exists()
    invoke(runner, ["fit-linear", "--resume", run, "--quiet"])
    assert read_csv(run / "results.csv") == rows
    resumed = torch.load(run / "heads.pt", weights_only=True)
    assert resumed["state"].keys() == heads["state"].keys()
    for name, state in heads["state"].items():
        _assert_same(state, resumed["state"][name])
    again = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert sorted(again, key=lambda h: (h["head"], h["epoch"])) == sorted(
        history, key=lambda h: (h["head"], h["epoch"])
    )
