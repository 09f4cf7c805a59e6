"""`spl reproduce`: a small end-to-end reproduction on fixture datasets."""

import csv
import io
import json
from pathlib import Path

import pytest

from spl.data.demo import build_demo
from spl.data.prepared import write_prepared

from conftest import invoke

SIZE = 32
FAST = ["--backbone", "efficientnet_lite0", "--image-size", SIZE, "--linear-epochs", 3,
        "--linear-lrs", "1e-2", "--linear-batch-sizes", 16, "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two prepared datasets of digit grids: one under the name voc12 (so the paper's VOC
    numbers are printed beside it) and the demo."""
    root = tmp_path_factory.mktemp("repro")
    for name, seed in (("voc12", 1), ("demo", 0)):
        raw = build_demo(root / name, train_images=120, test_images=40, seed=seed)
        raw.name = name
        write_prepared(raw, root / name / "labels.h5")
    return root


def _reproduce(runner, root, tmp, *args, ok=True):
    return invoke(runner, ["reproduce", "--root", root, "--runs", tmp / "runs",
                           "--out", tmp / "tables", *FAST, *args], ok=ok)  # fmt: skip


def _journal(tmp: Path) -> list[dict]:
    path = tmp / "tables" / "logs" / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_dry_run_lists_cells_and_commands(root, runner, tmp_path):
    result = _reproduce(runner, root, tmp_path, "--table", "linear", "--datasets", "voc12,coco14",
                        "--dry-run")  # fmt: skip
    lines = result.output.splitlines()
    assert any(line.split()[:4] == ["linear", "voc12", "an", "missing"] for line in lines)
    assert "spl data prepare coco14 --source RAW_DIR" in result.output
    assert any("spl extract" in line and "voc12" in line for line in lines)
    assert any("spl fit-linear" in line and "--losses bce,bce_ls" in line for line in lines)
    assert not (tmp_path / "tables").exists()  # a dry run computes and writes nothing


@pytest.mark.slow
def test_cells_computed_in_parallel_skipped_when_present_and_recomputed_when_stale(
    root, runner, tmp_path
):
    args = ["--table", "linear,recovery", "--datasets", "voc12,demo", "--jobs", 2]
    _reproduce(runner, root, tmp_path, *args)
    journal = _journal(tmp_path)
    linear = [j for j in journal if j["job"].startswith("fit-linear")]
    assert len(linear) == 2 and {j["slot"] for j in linear} == {0, 1}
    first, second = sorted(linear, key=lambda j: j["start"])
    assert second["start"] < first["end"]  # the two datasets' sweeps ran at the same time
    tables = tmp_path / "tables"
    markdown = (tables / "linear.md").read_text()
    an_row = next(line for line in markdown.splitlines() if line.startswith("| AN |"))
    ours = json.loads((tables / "cells" / "linear" / "voc12" / "an.json").read_text())
    mean = ours["test_map"][0]
    assert f"{mean:.1f} / 84.2 ({mean - 84.2:+.1f})" in an_row  # ours / paper (difference)
    # CSV and JSON parse back to the same numbers
    rows = list(csv.DictReader(io.StringIO((tables / "linear.csv").read_text())))
    voc_an = next(r for r in rows if r["loss"] == "an" and r["dataset"] == "voc12")
    assert float(voc_an["mean"]) == pytest.approx(mean) and float(voc_an["paper"]) == 84.2
    assert float(voc_an["difference"]) == pytest.approx(mean - 84.2)
    data = json.loads((tables / "recovery.json").read_text())
    role = next(r for r in data["rows"] if r["loss"] == "role")
    recorded = json.loads((tables / "cells" / "recovery" / "demo" / "role.json").read_text())
    assert role["cells"]["demo"]["mean"] == pytest.approx(recorded["train_recovery_map"][0])
    assert role["cells"]["demo"]["paper"] is None and role["cells"]["voc12"]["paper"] == 90.3
    assert (tables / "figure_unobserved_positives.png").stat().st_size > 1000
    # a rerun skips every computed cell
    _reproduce(runner, root, tmp_path, *args)
    assert len(_journal(tmp_path)) == len(journal)
    # other options make the stored cells stale: listed as such, then recomputed
    dry = _reproduce(runner, root, tmp_path, "--table", "linear", "--datasets", "demo",
                     "--linear-epochs", 2, "--dry-run")  # fmt: skip
    assert "stale (epochs: 3 -> 2)" in dry.output
    _reproduce(runner, root, tmp_path, "--table", "linear", "--datasets", "demo",
               "--linear-epochs", 2)  # fmt: skip
    record = json.loads((tables / "cells" / "linear" / "demo" / "an.json").read_text())
    assert record["options"]["epochs"] == 2
    assert len(_journal(tmp_path)) == len(journal) + 1


@pytest.mark.slow
def test_finetune_table_with_linearinit_rows(root, runner, tmp_path):
    _reproduce(runner, root, tmp_path, "--table", "finetune", "--datasets", "demo",
               "--finetune-losses", "an,role+linearinit", "--finetune-lrs", "1e-4",
               "--finetune-batch-sizes", 16, "--finetune-epochs", 1)  # fmt: skip
    names = [j["job"] for j in _journal(tmp_path)]
    assert names.index("LinearInit linear phase demo role") < names.index(
        "finetune demo role+linearinit"
    )
    record = json.loads(
        (tmp_path / "tables" / "cells" / "finetune" / "demo" / "role_linearinit.json").read_text()
    )
    assert record["options"]["linear_phase"] == {"lr": 1e-3, "batch_size": 16, "epochs": 3}
    assert record["picked"][0]["init"].startswith("linear:role_lr0.001_bs16")
    markdown = (tmp_path / "tables" / "finetune.md").read_text()
    assert "| ROLE + LinearInit |" in markdown and "| AN |" in markdown


def test_bad_input_lists_the_valid_choices(root, runner, tmp_path):
    result = _reproduce(runner, root, tmp_path, "--table", "linaer", ok=False)
    assert "unknown table 'linaer'; valid: linear, finetune, recovery" in result.output
    result = _reproduce(runner, root, tmp_path, "--datasets", "voc07", ok=False)
    assert "unknown dataset 'voc07'; valid: voc12, coco14" in result.output
    result = invoke(runner, ["reproduce", "--root", root, "--backbone", "resnet5"], ok=False)
    assert "unknown backbone 'resnet5'; available: resnet50" in result.output
    result = _reproduce(runner, root, tmp_path, "--datasets", "coco14", ok=False)
    assert "not prepared: coco14" in result.output
