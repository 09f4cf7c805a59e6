"""`spl finetune --recipe source`: each release's recipe as methods.md gives it, the optimiser
it builds, its early-stop rule, and a run that trains with it."""

import json

import pytest
import torch
from torch import nn

from spl.data.common import SplError
from spl.fit.finetune import Classifier, Trainable, make_optimizer
from spl.fit.losses import Context, get_loss
from spl.fit.recipes import PAPER_RECIPE, RECIPES, EarlyStop, source_recipe
from spl.runs import read_csv

# (loss, dataset) -> (lr, batch size, epochs, optimiser, head lr multiplier, weight decay)
# from methods.md: EM section 1, LargeLoss section 3 (issue #4's per-dataset table), GR
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
    invoke(runner, ["data", "prepare", "demo", "--root", tmp_path, "--train-images", 80,
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
    last = torch.load(run / row["config"] / "best.pt", weights_only=True)
    lrs = sorted({g["lr"] for g in last["optimizer"]["param_groups"]})
    assert lrs == [recipe.lr, recipe.lr * 10]  # the head at 10 x lr: the recipe was applied
    history = [json.loads(line) for line in (run / row["config"] / "history.jsonl").read_text()
               .splitlines()]  # fmt: skip
    maps = [h["val_map"] for h in history if h["epoch"] >= 1]
    stopped = int(row["epochs_trained"]) < recipe.epochs
    # it stopped exactly when GR's rule (best - current > 2) first held, or ran every epoch
    assert stopped == any(recipe.early_stop.stop(maps[: i + 1]) for i in range(len(maps)))
