"""`spl finetune --recipe source`: each release's recipe as docs/methods.md gives it, the optimiser
it builds, its early-stop rule, and a run that trains with it."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from spl.data import protocol
from spl.data.common import SplError
from spl.data.loaders import ImageSplits, steps_per_epoch, train_batches
from spl.data.prepared import load_prepared
from spl.extract.features import unreadable_rows
from spl.fit.finetune import Classifier, FineTuner, Trainable, make_optimizer
from spl.fit.losses import Context, get_loss
from spl.fit.recipes import PAPER_RECIPE, RECIPES, EarlyStop, source_recipe
from spl.runs import read_csv

# (loss, dataset) -> (lr, batch size, epochs, optimiser, head lr multiplier, weight decay)
# from docs/methods.md: EM section 1, LargeLoss section 3 (issue #4's per-dataset table), GR
# section 4, the robust-loss release section 5, VLPL section 8, AEVLP section 9.
RELEASES = {
    ("em", "voc12"): (1e-5, 8, 10, "adam", 1.0, 0.0),
    ("em_apl", "coco14"): (1e-5, 16, 10, "adam", 1.0, 0.0),
    ("em", "nuswide"): (1e-5, 16, 10, "adam", 1.0, 0.0),
    ("em", "cub"): (1e-4, 8, 10, "adam", 1.0, 0.0),
    ("ll_r", "voc12"): (5e-3, 16, 10, "sgd", 10.0, 1e-3),
    ("ll_ct", "coco14"): (1e-5, 16, 10, "adam", 10.0, 0.0),
    ("ll_cp", "nuswide"): (1e-5, 16, 10, "adam", 10.0, 0.0),
    ("ll_r", "cub"): (7.5e-5, 16, 10, "adam", 10.0, 0.0),
    ("gr", "voc12"): (1e-5, 8, 8, "adam", 10.0, 0.0),
    ("gr", "cub"): (1e-5, 8, 8, "adam", 10.0, 0.0),
    ("hill", "voc12"): (1e-4, 128, 31, "adam", 1.0, 1e-4),
    ("splc", "coco14"): (1e-4, 128, 31, "adam", 1.0, 1e-4),
    ("asl", "cub"): (1e-4, 128, 31, "adam", 1.0, 1e-4),
    ("em_pl", "voc12"): (1e-5, 8, 10, "adam", 1.0, 0.0),
    ("em_pl", "cub"): (1e-4, 8, 10, "adam", 1.0, 0.0),
    ("gpr", "voc12"): (1e-5, 8, 8, "adam", 10.0, 0.0),
    ("gpr", "coco14"): (1e-5, 16, 8, "adam", 10.0, 0.0),
    ("gpr", "nuswide"): (1e-5, 16, 10, "adam", 10.0, 0.0),
    ("gpr", "cub"): (1e-5, 8, 10, "adam", 10.0, 0.0),
}


@pytest.mark.parametrize(("loss", "dataset"), list(RELEASES))
def test_source_recipes_are_the_releases(loss, dataset):
    recipe = source_recipe(loss, dataset)
    got = (recipe.lr, recipe.batch_size, recipe.epochs, recipe.optimizer,
           recipe.head_lr_multiplier, recipe.weight_decay)  # fmt: skip
    assert got == RELEASES[(loss, dataset)]


def test_recipe_schedules_and_stops():
    rl = source_recipe("hill", "voc12")
    # OneCycleLR laid out for 80 epochs, stopped after 31 (RL:train.py)
    assert (rl.schedule, rl.schedule_epochs, rl.pct_start) == ("onecycle", 80, 0.2)
    assert source_recipe("ll_r", "voc12").momentum == 0.9
    assert source_recipe("ll_r", "voc12").decay_all
    assert source_recipe("em", "voc12").early_stop == EarlyStop(patience=1)
    assert source_recipe("ll_cp", "coco14").early_stop == EarlyStop(max_drop=3.0)
    assert source_recipe("gr", "coco14").early_stop == EarlyStop(max_drop=2.0)
    assert source_recipe("gpr", "coco14").early_stop == EarlyStop(max_drop=2.0, patience=2)
    assert source_recipe("em_pl", "coco14").early_stop == EarlyStop()  # commented out
    # another dataset takes VOC's recipe
    assert source_recipe("ll_r", "pets") == source_recipe("ll_r", "voc12")
    assert PAPER_RECIPE.early_stop == EarlyStop() and PAPER_RECIPE.head_lr_multiplier == 1
    with pytest.raises(SplError, match="an has no published recipe of its own"):
        source_recipe("an", "voc12")
    assert set(RECIPES) == {"em", "em_apl", "ll_r", "ll_ct", "ll_cp", "gr", "hill", "splc",
                            "asl", "em_pl", "gpr"}  # fmt: skip


# Whether each source's train loader keeps the last partial batch (docs/recipes.md section
# 6): every release since the paper builds its train DataLoader with drop_last=False (the
# robust-loss release leaves DataLoader's default, False); the paper's code drops it.
KEEPS_PARTIAL_BATCH = {
    "em": "SPML-AckTheUnknown main.py initialize_training_run", "em_apl": "the same main.py",
    "ll_r": "LargeLossMatters train.py run_train", "ll_ct": "the same", "ll_cp": "the same",
    "gr": "GRLoss train.py run_train", "hill": "robust-loss-mlml train.py main (the default)",
    "splc": "the same", "asl": "the same", "em_pl": "VLPL main_clip.py initialize_training_run",
    "gpr": "AEVLP train.py run_train",
}  # fmt: skip


def test_each_recipe_batches_as_its_source_loader():
    assert set(KEEPS_PARTIAL_BATCH) == set(RECIPES)
    for loss in RECIPES:
        for dataset in ("voc12", "coco14", "nuswide", "cub", "pets"):
            assert source_recipe(loss, dataset).drop_last is False, (loss, dataset)
    assert PAPER_RECIPE.drop_last is True


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_the_train_batches_of_every_process(world, drop_last):
    """Each process's batches of an epoch as the fine-tuner's loader deals them: the same
    number of steps on every process, floor(N / B) or ceil(N / B); every step's shares equal
    (the kept last batch padded with fewer than `world` repeated rows); every row once."""
    for rows, batch in ((129, 6), (130, 12), (128, 24), (5, 6), (6, 6), (17, 12)):
        dealt = [
            [list(b) for b in train_batches(rows, batch, seed=4, epoch=2, world=world, rank=r,
                                            drop_last=drop_last)]
            for r in range(world)
        ]  # fmt: skip
        steps = rows // batch if drop_last else math.ceil(rows / batch)
        assert [len(d) for d in dealt] == [steps] * world, (rows, batch)
        assert steps_per_epoch(rows, batch, world=world, drop_last=drop_last) == steps
        for step in range(steps):
            shares = [len(d[step]) for d in dealt]
            assert len(set(shares)) == 1 and (step < steps - 1) <= (shares[0] == batch // world)
        seen = [row for d in dealt for b in d for row in b]
        if drop_last:
            assert len(seen) == len(set(seen)) == steps * batch
        else:
            assert set(seen) == set(range(rows)) and len(seen) - rows < world
        if world == 1:  # the kept epoch is the dropped one and its last partial batch
            other = [list(b) for b in train_batches(rows, batch, seed=4, epoch=2,
                                                    drop_last=not drop_last)]  # fmt: skip
            kept, dropped = (other, dealt[0]) if drop_last else (dealt[0], other)
            assert kept[: len(dropped)] == dropped and len(kept) - len(dropped) in (0, 1)


def _tiny_classifier(num_classes: int) -> Classifier:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    return Classifier(backbone, 4, num_classes)


def _image_splits(dataset) -> ImageSplits:
    prepared = load_prepared(dataset)
    return ImageSplits(
        prepared, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        observed=protocol.OBSERVED, excluded=unreadable_rows(prepared), workers=0,
    )  # fmt: skip


@pytest.mark.parametrize(("loss", "recipe"), [("gr", "source"), ("gr", "paper"), ("em", "source")])
def test_a_recipe_run_takes_its_sources_steps_per_epoch(demo_small, loss, recipe):
    """A real fine-tuning run: ceil(N / B) steps an epoch under a release's recipe (the last
    partial batch trained on), floor(N / B) under the paper's."""
    data = _image_splits(demo_small)
    prepared, rows, batch = data.prepared, len(data.datasets["train"]), 24
    assert rows % batch
    chosen = source_recipe(loss, prepared.name) if recipe == "source" else PAPER_RECIPE
    made = get_loss(loss).make(context=Context(prepared.num_classes, 1.5, prepared.name))
    steps: list[int] = []
    tuner = FineTuner(made, lr=1e-3, batch_size=batch, epochs=2, recipe=chosen).fit(
        lambda: _tiny_classifier(prepared.num_classes), data,
        on_step=lambda step, waited, seconds: steps.append(step),
    )  # fmt: skip
    expected = math.ceil(rows / batch) if recipe == "source" else rows // batch
    trained = [h["steps"] for h in tuner.history_]
    assert trained == [expected] * len(trained) and len(steps) == expected * len(trained)


def test_one_cycle_is_laid_out_over_the_kept_batches(demo_small):
    """The robust-loss release's OneCycleLR spans 80 epochs of len(train_loader) steps, its
    loader keeping the partial batch: 80 ceil(N / B)."""
    data = _image_splits(demo_small)
    prepared, rows, batch = data.prepared, len(data.datasets["train"]), 24
    made = get_loss("hill").make(context=Context(prepared.num_classes, 1.5, prepared.name))
    recipe = source_recipe("hill", prepared.name)
    tuner = FineTuner(made, lr=1e-3, batch_size=batch, epochs=1, recipe=recipe).fit(
        lambda: _tiny_classifier(prepared.num_classes), data
    )
    assert tuner.scheduler_.total_steps == 80 * math.ceil(rows / batch) != 80 * (rows // batch)
    assert tuner.scheduler_.last_epoch == math.ceil(rows / batch)  # one step per batch
    assert np.isfinite(tuner.best_val_map_)


@pytest.mark.parametrize(
    ("rule", "history", "stops"),
    [
        (EarlyStop(patience=1), [50.0, 51.0], False),
        (EarlyStop(patience=1), [50.0, 51.0, 51.0], True),  # equal does not improve
        (EarlyStop(patience=1), [50.0, 49.0], True),
        (EarlyStop(max_drop=2.0), [50.0, 48.5, 48.1], False),
        (EarlyStop(max_drop=2.0), [50.0, 48.5, 47.9], True),  # more than 2 below the best
        (EarlyStop(max_drop=3.0), [60.0, 57.0], False),  # exactly 3: not more than 3
        (EarlyStop(max_drop=2.0, patience=2), [50.0, 49.5, 49.9], True),
        (EarlyStop(max_drop=2.0, patience=2), [50.0, 49.5, 50.1], False),
        (EarlyStop(), [50.0, 10.0, 5.0], False),
    ],
)
def test_early_stop_rules(rule, history, stops):
    assert rule.stop(history) is stops


def _trainable(loss_key: str) -> Trainable:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())  # fmt: skip
    classifier = Classifier(backbone, 4, 5)
    loss = get_loss(loss_key).make(context=Context(5, 1.5))
    observed = torch.zeros(10, 5)
    observed[torch.arange(10), torch.arange(10) % 5] = 1
    return Trainable(classifier, loss, loss.init_state(observed, heads=1, seed=0))


def _groups(optimizer):
    return sorted((g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"]))
                  for g in optimizer.param_groups)  # fmt: skip


def test_optimiser_groups_follow_the_recipe():
    head_weights, head_bias = 4 * 5, 5
    conv_weights, rest = 3 * 4 * 3 * 3, 4 + 4 + 4  # conv bias, BatchNorm weight and bias
    # the paper: one Adam at one lr over everything
    paper = make_optimizer(_trainable("an"), 1e-4, PAPER_RECIPE)
    assert isinstance(paper, torch.optim.Adam)
    assert _groups(paper) == [(1e-4, 0, conv_weights + rest + head_weights + head_bias)]
    assert paper.defaults["betas"] == (0.9, 0.999) and paper.defaults["eps"] == 1e-8
    # GR: the head at 10 x lr
    gr = make_optimizer(_trainable("gr"), 1e-5, source_recipe("gr", "voc12"))
    assert _groups(gr) == sorted([(1e-5, 0.0, conv_weights), (1e-5, 0.0, rest),
                                  (1e-4, 0.0, head_weights), (1e-4, 0.0, head_bias)])  # fmt: skip
    # LargeLoss on VOC: SGD with momentum, weight decay on every parameter, head at 10 x lr
    ll = make_optimizer(_trainable("ll_r"), 5e-3, source_recipe("ll_r", "voc12"))
    assert isinstance(ll, torch.optim.SGD) and ll.defaults["momentum"] == 0.9
    assert _groups(ll) == sorted([(5e-3, 1e-3, conv_weights + rest),
                                  (5e-2, 1e-3, head_weights + head_bias)])  # fmt: skip
    # the robust-loss release: decay on weights only, not on biases and norms
    rl = make_optimizer(_trainable("hill"), 1e-4, source_recipe("hill", "voc12"))
    assert _groups(rl) == sorted([(1e-4, 1e-4, conv_weights), (1e-4, 0.0, rest),
                                  (1e-4, 1e-4, head_weights), (1e-4, 0.0, head_bias)])  # fmt: skip
    # ROLE's estimator keeps its own multiplier whatever the recipe
    role = make_optimizer(_trainable("role"), 1e-4, PAPER_RECIPE)
    assert (1e-3, 0.0, 10 * 5) in _groups(role)


@pytest.mark.slow
def test_finetune_with_the_source_recipe_trains_with_it(tmp_path, runner):
    from conftest import invoke

    size, tag = 32, "efficientnet_lite0-IMAGENET1K_TF-32"
    invoke(runner, ["data", "prepare", "demo", "--root", tmp_path, "--train-images", 85,
                    "--test-images", 30])  # fmt: skip
    dataset = tmp_path / "demo"
    args = ["finetune", dataset, "--loss", "gr", "--recipe", "source", "--backbone",
            "efficientnet_lite0", "--image-size", size, "--device", "cpu", "--workers", 0,
            "--out", tmp_path / "runs", "--quiet"]  # fmt: skip
    refused = invoke(runner, [*args, "--lrs", "1e-3"], ok=False)
    assert "--lrs" in refused.output and "source" in refused.output
    invoke(runner, args)
    (run,) = (tmp_path / "runs" / "demo" / tag).iterdir()
    (row,) = read_csv(run / "results.csv")
    recipe = source_recipe("gr", "demo")
    assert (float(row["lr"]), int(row["batch_size"])) == (recipe.lr, recipe.batch_size)
    assert row["recipe"] == "source" and 1 <= int(row["epochs_trained"]) <= recipe.epochs
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["head_lr_multiplier"] == 10.0
    assert config["recipe"]["drop_last"] is False  # GR's loader keeps the partial batch
    last = torch.load(run / row["config"] / "best.pt", weights_only=True)
    lrs = sorted({g["lr"] for g in last["optimizer"]["param_groups"]})
    assert lrs == [recipe.lr, recipe.lr * 10]  # the head at 10 x lr: the recipe was applied
    history = [json.loads(line) for line in (run / row["config"] / "history.jsonl").read_text()
               .splitlines()]  # fmt: skip
    rows = len(load_prepared(dataset).split["train"])
    assert rows % recipe.batch_size  # a partial last batch, trained on
    assert {h["steps"] for h in history if h["epoch"] >= 1} == {math.ceil(rows / recipe.batch_size)}
    maps = [h["val_map"] for h in history if h["epoch"] >= 1]
    stopped = int(row["epochs_trained"]) < recipe.epochs
    # it stopped exactly when GR's rule (best - current > 2) first held, or ran every epoch
    assert stopped == any(recipe.early_stop.stop(maps[: i + 1]) for i in range(len(maps)))
