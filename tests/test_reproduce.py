"""`spl reproduce`: a small end-to-end reproduction on fixture datasets."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spl.data.demo import build_demo
from spl.data.prepared import write_prepared

from conftest import invoke


def read_csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


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


# ----------------------------------------------------------------------------- since 2021


@pytest.mark.slow
def test_since_2021_table_pairs_linear_and_source_recipe_cells(root, runner, tmp_path):
    result = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                        "--since-losses", "em,an", "--finetune-lrs", "1e-4",
                        "--finetune-batch-sizes", 16, "--finetune-epochs", 1)  # fmt: skip
    tables = tmp_path / "tables"
    jobs = {j["job"] for j in _journal(tmp_path)}
    assert {"finetune voc12 em+source", "finetune voc12 an"} <= jobs
    assert "| EM |" in result.output
    em_log = next((tables / "logs").glob("finetune-voc12-em-source*.log")).read_text()
    assert "--recipe source" in em_log.splitlines()[0] and "--lrs" not in em_log.splitlines()[0]
    linear = json.loads((tables / "cells" / "linear" / "voc12" / "em.json").read_text())
    tuned = json.loads((tables / "cells" / "finetune" / "voc12" / "em_source.json").read_text())
    from spl.fit.recipes import source_recipe

    assert tuned["options"]["recipe"]["lr"] == source_recipe("em", "voc12").lr
    data = json.loads((tables / "since-2021.json").read_text())
    em = next(r for r in data["rows"] if r["loss"] == "em")
    assert em["cells"]["voc12/linear"]["mean"] == pytest.approx(linear["test_map"][0])
    assert em["cells"]["voc12/linear"]["paper"] is None  # nobody publishes linear probes
    assert em["cells"]["voc12/finetune"]["mean"] == pytest.approx(tuned["test_map"][0])
    assert em["cells"]["voc12/finetune"]["paper"] == 89.09  # EM's published VOC number
    an = next(r for r in data["rows"] if r["loss"] == "an")
    assert an["cells"]["voc12/linear"]["paper"] == 84.2 and an["recipe"] == "paper"
    assert an["cells"]["voc12/finetune"]["paper"] == 85.1
    markdown = (tables / "since-2021.md").read_text()
    assert "| EM |" in markdown and "/ 89.1 (" in markdown and "Protocol:" in markdown
    # everything is done: a rerun plans nothing
    again = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                       "--since-losses", "em,an", "--finetune-lrs", "1e-4",
                       "--finetune-batch-sizes", 16, "--finetune-epochs", 1, "--dry-run")  # fmt: skip
    assert "Every cell is done." in again.output


def test_since_2021_dry_run_plans_every_method_with_its_recipe(root, runner, tmp_path):
    from spl.fit.losses import SINCE_2021

    result = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                        "--dry-run")  # fmt: skip
    lines = result.output.splitlines()
    (sweep,) = [line for line in lines if "spl fit-linear" in line]
    assert f"--losses {','.join([*SINCE_2021, 'an', 'role'])} " in sweep  # one pass
    for key in SINCE_2021:
        (command,) = [line for line in lines if "finetune /" in line and f"--loss {key} " in line]
        assert "--recipe source" in command and "--epochs" not in command
    (an,) = [line for line in lines if "spl finetune" in line and "--loss an " in line]
    assert "--recipe" not in an and "--epochs 10" in an


# ----------------------------------------------------------------------------- protocols


def _biased_coco(tmp_path) -> Path:
    """A prepared coco14 with random instances (areas, boxes) on 90 + 40 images, and click
    files: every biased draw can be made from it."""
    from rawfixtures import COCO_CATEGORIES, write_clicks, write_coco

    rng = np.random.RandomState(0)
    phases, clicks = {}, []
    for phase, ids in (("train2014", range(1, 91)), ("val2014", range(500, 540))):
        images, annotations = [], []
        for image_id in ids:
            images.append((image_id, 40, 30))
            for category in rng.choice([1, 3, 18], size=rng.randint(1, 4), replace=False):
                x, y = rng.randint(0, 30), rng.randint(0, 20)
                annotations.append({"image_id": image_id, "category_id": int(category),
                                    "area": float(rng.randint(1, 300)),
                                    "bbox": [x, y, 10, 10]})  # fmt: skip
                if phase == "val2014":
                    clicks.append((image_id, int(category), rng.rand(), rng.rand()))
        phases[phase] = {"images": images, "annotations": annotations}
    write_coco(tmp_path / "raw", phases, COCO_CATEGORIES)
    names = ["crowdsourcing_annotate_category_val2014.json",
             "crowdsourcing_instance_spotting_val2014.json"]  # fmt: skip
    write_clicks(tmp_path / "clicks", {name: clicks for name in names})
    invoke(CliRunner(), ["data", "prepare", "coco14", "--source", tmp_path / "raw",
                         "--root", tmp_path / "root"])  # fmt: skip
    return tmp_path / "root"


def test_other_protocols_are_planned_with_their_observed_set_and_val(root, runner, tmp_path):
    coco_root = _biased_coco(tmp_path)
    result = invoke(runner, ["reproduce", "--root", coco_root, "--runs", tmp_path / "runs",
                             "--out", tmp_path / "tables", *FAST, "--table", "linear",
                             "--datasets", "coco14", "--observed", "size", "--val", "observed",
                             "--dry-run"])  # fmt: skip
    lines = result.output.splitlines()
    assert any("spl data observe" in line and "--bias size --seed 1200" in line for line in lines)
    (sweep,) = [line for line in lines if "spl fit-linear" in line]
    assert "--observed size-p1-s1200 --val observed" in sweep
    assert "iu," not in sweep  # IU's negatives come from the uniform set: not under a bias
    assert any(line.startswith("linear    coco14   an") and "[size-p1-s1200.val-observed]" in line
               for line in lines)  # fmt: skip
    refused = invoke(runner, ["reproduce", "--root", coco_root, *FAST, "--table", "linear",
                              "--datasets", "coco14", "--observed", "semantic", "--dry-run"],
                     ok=False)  # fmt: skip
    assert "--observed semantic needs --clicks DIR" in refused.output
    refused = _reproduce(runner, root, tmp_path, "--table", "label-bias", "--datasets", "voc12",
                         "--dry-run", ok=False)  # fmt: skip
    assert "--table label-bias needs coco14 among --datasets" in refused.output


@pytest.mark.slow
def test_label_bias_table_lays_the_draws_side_by_side(runner, tmp_path):
    from spl.data.prepared import load_prepared

    coco_root = _biased_coco(tmp_path)
    invoke(runner, ["reproduce", "--root", coco_root, "--runs", tmp_path / "runs",
                    "--out", tmp_path / "tables", *FAST, "--table", "label-bias,linear",
                    "--datasets", "coco14", "--clicks", tmp_path / "clicks"])  # fmt: skip
    prepared = load_prepared(coco_root / "coco14")
    sets = {"uniform": "uniform-p1-n0-s1200", "size": "size-p1-s1200",
            "location": "location-p1-s1200", "semantic": "semantic-p1-s1200"}  # fmt: skip
    assert set(sets.values()) <= set(prepared.observed)  # the observe jobs added them
    tables = tmp_path / "tables"
    data = json.loads((tables / "label-bias.json").read_text())
    assert data["datasets"] == list(sets) and data["dataset"] == "coco14"
    assert [r["loss"] for r in data["rows"]] == ["an", "an_ls", "wan", "epr", "role"]
    for row in data["rows"]:
        for kind, name in sets.items():
            folder = tables / "cells" / (f"{name}.val-full" if kind != "uniform" else "")
            record = json.loads((folder / "linear" / "coco14" / f"{row['loss']}.json").read_text())
            assert record["observed"] == name
            assert row["cells"][kind]["mean"] == pytest.approx(record["test_map"][0])
            run = read_csv_rows(Path(record["run"]) / "results.csv")
            assert {r["observed"] for r in run} == {name}
    # the uniform column is the linear table's cell: computed once
    linear = json.loads((tables / "linear.json").read_text())
    an = next(r for r in linear["rows"] if r["loss"] == "an")
    assert an["cells"]["coco14"]["mean"] == data["rows"][0]["cells"]["uniform"]["mean"]
    markdown = (tables / "label-bias.md").read_text()
    assert "| loss | uniform |" in markdown.replace("uniform, paper's ranking", "")
    assert "size `size-p1-s1200`" in markdown
    fits = [j for j in _journal(tmp_path) if j["job"].startswith("fit-linear")]
    assert len(fits) == 4  # one sweep per observed set


def test_the_demo_trains_the_methods_since_the_paper_in_its_linear_sweep(tmp_path):
    from spl.demo import demo_plan
    from spl.fit.losses import PAPER_LOSSES, SINCE_2021
    from spl.reproduce import reproduce

    plan = demo_plan(tmp_path, image_size=64, finetune_epochs=3, device="cpu")
    planned = reproduce(plan, dry_run=True)
    linear = [c.loss for c in planned["cells"] if c.table == "linear"]
    assert linear == [*PAPER_LOSSES, *SINCE_2021]
    (sweep,) = [j for j in planned["jobs"] if j.kind == "linear" and not j.key]
    command = sweep.command({})
    assert command[command.index("--losses") + 1] == ",".join([*PAPER_LOSSES, *SINCE_2021])
    assert command[command.index("--epochs") + 1] == "25"  # the paper's protocol in full


def test_since_2021_with_scores_adds_the_vision_language_rows(root, runner, tmp_path):
    result = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                        "--scores", "clip", "--dry-run")  # fmt: skip
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["finetune", "voc12", "gpr+source"] for line in lines)
    (sweep,) = [line for line in lines if "spl fit-linear" in line]
    assert ",em_pl,gpr,an,role " in sweep and "--scores clip" in sweep
    (vlpl,) = [line for line in lines if "spl finetune" in line and "--loss em_pl " in line]
    assert "--scores clip" in vlpl and "--recipe source" in vlpl
    (em,) = [line for line in lines if "spl finetune" in line and "--loss em " in line]
    assert "--scores" not in em  # only the rows that read the scores get them
    assert f"spl pseudo-labels {root / 'voc12'} --tag clip" in result.output  # it is missing
    refused = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                         "--scores", "clip", ok=False)  # fmt: skip
    assert "scores/clip.h5 not found" in refused.output and "spl pseudo-labels" in refused.output
    refused = _reproduce(runner, root, tmp_path, "--table", "since-2021", "--datasets", "voc12",
                         "--since-losses", "em_pl,an", "--dry-run", ok=False)  # fmt: skip
    assert "em_pl train on a vision-language model's pseudo-labels: pass --scores TAG" in (
        refused.output
    )


# ----------------------------------------------------------------------------- jobs


def test_a_biased_draw_on_a_dataset_without_instance_annotations_is_refused(root, runner, tmp_path):
    for observed, name in (("size", "size-p1-s1200"), ("location-p1-s7", "location-p1-s7")):
        result = _reproduce(runner, root, tmp_path, "--observed", observed, "--datasets", "demo",
                            "--dry-run", ok=False)  # fmt: skip
        assert f"--observed {observed}: demo has no observed set '{name}'" in result.output
        assert "reads COCO 2014's instance annotations, which only coco14 has" in result.output
    # a set whose name says nothing of how to draw it is refused as well, before anything runs
    result = _reproduce(runner, root, tmp_path, "--observed", "mine", "--datasets", "demo",
                        "--table", "linear", ok=False)  # fmt: skip
    assert "observed set 'mine' is not in" in result.output and "spl data observe" in result.output
    assert not (tmp_path / "tables").exists()


def test_the_plans_other_settings_are_checked(root, tmp_path):
    from spl.data.common import SplError
    from spl.reproduce import Plan

    with pytest.raises(SplError, match="'epochs' is not a setting of `spl finetune` the plan"):
        Plan(root=root, finetune_options={"epochs": 3})  # the plan's --finetune-epochs sets it
    with pytest.raises(SplError, match=r"finetune_options\['batchnorm'\]: 'sideways' is not one"):
        Plan(root=root, finetune_options={"batchnorm": "sideways"})
    with pytest.raises(SplError, match="extract_options.* those are: amp, batch_size"):
        Plan(root=root, extract_options={"bakbone": "resnet18"})
    plan = Plan(root=root, finetune_options={"batchnorm": "frozen"})
    assert plan.finetune_extra == ["--batchnorm", "frozen"]  # as the cells of earlier versions


def _commands():
    from spl.commands_data import observe
    from spl.commands_extract import extract
    from spl.commands_finetune import finetune
    from spl.commands_fit import fit_linear
    from spl.settings import (
        ExtractSettings,
        FinetuneSettings,
        FitLinearOptions,
        LinearSettings,
        ObserveSettings,
        RunOptions,
    )

    return {"observe": (observe, ObserveSettings, None),
            "extract": (extract, ExtractSettings, None),
            "linear": (fit_linear, LinearSettings, FitLinearOptions),
            "finetune": (finetune, FinetuneSettings, RunOptions)}  # fmt: skip


def test_each_job_is_its_settings_and_its_command_parses_back_to_them(root, runner, tmp_path):
    """The command line of every kind of job, read by the command's own parser, gives the
    job's settings back (nothing is written by hand)."""
    from spl.reproduce import Plan, reproduce
    from spl.settings_fields import settings_from

    coco_root = _biased_coco(tmp_path)
    plan = Plan(tables=["linear", "finetune", "since-2021"], datasets=["coco14"], root=coco_root,
                runs=tmp_path / "runs", out=tmp_path / "tables", backbone="efficientnet_lite0",
                image_size=SIZE, observed="size", val="observed", seeds=[0, 1],
                finetune_losses=["an", "role+linearinit"], since_losses=["em", "an"],
                finetune_options={"batchnorm": "frozen", "cache_images": True}, device="cpu")  # fmt: skip
    jobs = reproduce(plan, dry_run=True)["jobs"]
    assert {j.kind for j in jobs} == {"observe", "extract", "linear", "finetune"}
    runs = {j.key: str(tmp_path / "linear-run") for j in jobs if j.key}
    for job in jobs:
        command, cls, options_cls = _commands()[job.kind]
        args = job.command(runs)
        start = 3 + (2 if job.kind == "observe" else 1)  # python -m spl VERB
        assert args[start] == str(job.target)
        ctx = command.make_context(command.name, args[start:])
        assert settings_from(cls, ctx.params) == job.settings_for(runs), job.name
        if options_cls is not None:
            options = settings_from(options_cls, ctx.params)
            assert options == job.options and options.run_file.parent == plan.out / "logs"
    (tuned,) = [j for j in jobs if j.init_key]
    assert tuned.settings_for(runs).init_from == str(tmp_path / "linear-run")
    assert tuned.settings_for(runs).batchnorm == "frozen"
    (draw,) = [j for j in jobs if j.kind == "observe"]
    assert (draw.settings.bias, draw.settings.seed) == ("size", 1200)


def test_an_interrupted_run_is_resumed_when_its_settings_equal_the_jobs(root, runner, tmp_path):
    import dataclasses
    import shlex
    import shutil

    from spl.reproduce import Plan, reproduce
    from spl.reproduce_jobs import interrupted_run, plan_jobs
    from spl.reproduce_plan import plan_cells
    from spl.runs import mark_incomplete

    shutil.copytree(root / "demo", tmp_path / "data" / "demo")
    plan = Plan(tables=["linear"], datasets=["demo"], linear_losses=["an", "role"],
                root=tmp_path / "data", runs=tmp_path / "runs", out=tmp_path / "tables",
                backbone="efficientnet_lite0", image_size=SIZE, linear_epochs=2,
                linear_lrs=[1e-2], linear_batch_sizes=[16], device="cpu")  # fmt: skip
    invoke(runner, ["extract", plan.root / "demo", "--backbone", "efficientnet_lite0",
                    "--image-size", SIZE, "--device", "cpu", "--workers", 0, "--no-progress"])  # fmt: skip
    (job,) = plan_jobs(plan, plan_cells(plan))
    # the same sweep, started by hand: its flags spelt and ordered otherwise
    invoke(runner, ["fit-linear", plan.root / "demo", "--features", plan.tag, "--quiet",
                    "--out", plan.runs, "--losses", "an,role", "--device", "cpu", "--epochs", 2,
                    "--lrs", "0.010", "--batch-sizes", 16])  # fmt: skip
    (run,) = (plan.runs / "demo" / plan.tag).iterdir()
    recorded = json.loads((run / "config.json").read_text())["command"]
    assert recorded != shlex.join(["spl", *job.command({})[3:]])
    assert interrupted_run(plan, job, {}) is None  # it finished
    mark_incomplete(run, "linear")
    assert interrupted_run(plan, job, {}) == run
    other = dataclasses.replace(job, settings=dataclasses.replace(job.settings, epochs=3))
    assert interrupted_run(plan, other, {}) is None  # other settings: a new run
    result = reproduce(plan, log=lambda _: None)
    log = (plan.out / "logs" / "fit-linear-demo--an-role.log").read_text().splitlines()
    assert log[0].endswith(f"fit-linear --resume {run} --quiet --run-file {job.run_file}")
    assert job.run_file.read_text() == f"{run}\n"
    assert [c.record["run"] for c in result["cells"]] == [str(run), str(run)]
    assert list((plan.runs / "demo" / plan.tag).iterdir()) == [run]
    assert not (run / "INCOMPLETE").exists()


def test_paper_agreement_reads_the_findings_off_the_cells():
    """The demo prints these lines: BCE above AN agrees with the paper, below disagrees;
    ROLE's recovery is compared with AN's."""
    from spl.reproduce import paper_agreement
    from spl.reproduce_plan import Cell

    def cell(table, loss, **record):
        return Cell(table, "demo", loss, {}, record=record, status="done")

    cells = [cell("linear", "bce", test_map=[70.2]), cell("linear", "an", test_map=[60.4])]
    assert paper_agreement(cells) == [
        "demo: full-label BCE 70.2 vs single-positive AN 60.4 test mAP: agrees with the paper "
        "(BCE above AN)"
    ]
    cells[0].record["test_map"] = [50.0]
    assert "DISAGREES with" in paper_agreement(cells)[0]
    # recovery cells without a history file: the recovery mAP line alone
    cells += [
        cell("recovery", "role", train_recovery_map=[73.1], picked=[{"head": "h"}], run="/no"),
        cell("recovery", "an", train_recovery_map=[73.7], picked=[{"head": "h"}], run="/no"),
    ]
    lines = paper_agreement(cells)
    assert lines[-1] == (
        "demo: training-set recovery mAP: ROLE 73.1 vs AN 73.7 (ROLE below AN; the paper has "
        "ROLE above AN on all four datasets)"
    )
