"""Settings and the command line, both ways: ``to_args`` gives the arguments that parse back
to an equal settings object, for every settings class and every kind of field."""

import dataclasses
from pathlib import Path

import pytest

import spl.settings as settings_module
from spl.data.common import SplError
from spl.settings import (
    FinetuneSettings,
    LinearSettings,
    ObserveSettings,
    RunOptions,
    from_args,
    to_args,
)
from spl.settings_fields import cli_fields

LOSS = {
    "observed": "size-p1-s7",
    "val": "observed",
    "observed_iu": "uniform-p1-n2-s3",
    "expected_positives": 2.5,
    "scores": "clip",
    # an int, a float that `:g` would round, a bool and a tuple option, over two losses
    "loss_options": {
        "role": {"estimator_lr_multiplier": 7.0},
        "ll_cp": {"delta_rel": 1.2345678},
        "em_apl": {"warmup": 2},
    },
}
GRID = {
    **LOSS,
    "lrs": [0.5, 1.2345678e-05, 3.0],
    "batch_sizes": [4, 32],
    "seeds": [-1, 0, 7],
    "device": "cuda:1",
}
DRAW = {"num_pos": -1, "num_neg": 2, "seed": 5, "force": True}


def samples(tmp: Path) -> dict[type, dict]:
    """For each settings class, a value other than the default for every command-line field
    (files that must exist are made under ``tmp``)."""
    existing = {}
    for name in ("a.npy", "b.npy", "c.npy", "d.npy", "names.txt"):
        existing[name] = tmp / name
        existing[name].write_text("x")
    (tmp / "run").mkdir()
    files = iter(existing.values())
    s = settings_module
    return {
        s.LossSettings: LOSS,
        s.GridSettings: GRID,
        s.LinearSettings: {**GRID, "losses": ["an", "role", "em_apl", "ll_cp"], "epochs": 3,
                           "histogram_bins": 0, "loss_parts": 3, "stream_features": True,
                           "memory_budget": 3 * 2**30},
        s.FinetuneSettings: {
            **GRID, "loss": "role", "recipe": "source", "init_from": "runs/x/linear-1",
            "backbone": "efficientnet_lite0", "weights": "DEFAULT", "image_size": 64,
            "epochs": 1, "workers": 0, "amp": False, "channels_last": False,
            "cache_images": True, "sync_bn": True, "batchnorm": "frozen",
            "loss_options": {"role": {"estimator_lr_multiplier": 2.5}},
        },
        s.RunOptions: {"out": tmp / "my runs", "resume": tmp / "run", "quiet": True,
                       "run_file": tmp / "logs" / "job.run"},
        s.FitLinearOptions: {"features": "resnet50-IMAGENET1K_V1-448", "out": Path("r"),
                             "resume": tmp / "run", "quiet": True, "run_file": tmp / "f.txt",
                             "dry_run": True},
        s.DrawSettings: DRAW,
        s.ObserveSettings: {**DRAW, "bias": "semantic", "source": tmp / "coco",
                            "clicks": tmp / "clicks"},
        s.ImportSettings: {
            "train_features": next(files), "train_labels": next(files),
            "test_features": next(files), "test_labels": next(files),
            "classes_file": existing["names.txt"], "tag": "mine", "num_pos": 2, "num_neg": -1, "seed": 3,
            "split_seed": 4, "expected_positives": 1.5, "force": True,
        },
        s.PredictSettings: {"top_k": 0, "threshold": 0.25, "format": "json", "loss": "role",
                            "head": "role_lr0.001_bs8_s0", "device": "cpu", "batch_size": 3,
                            "output": tmp / "out.csv"},
        s.ReproduceSettings: {
            "tables": ["since-2021", "label-bias"], "datasets": ["coco14", "demo"],
            "root": tmp / "data", "seeds": [1, 2], "backbone": "efficientnet_lite0",
            "weights": "IMAGENET1K_TF", "image_size": 32, "runs": tmp / "r",
            "out": tmp / "t", "linear_epochs": 2, "linear_lrs": [0.25],
            "linear_batch_sizes": [4], "finetune_epochs": 1,
            "finetune_losses": ["an", "role+linearinit"], "finetune_lrs": [1e-4],
            "finetune_batch_sizes": [2, 4], "device": "cpu", "jobs": 3,
            "figure_dataset": "demo", "observed": "size", "observed_seed": 9,
            "val": "observed", "clicks": tmp / "clicks", "since_losses": ["em", "an"],
            "scores": "clip", "dry_run": True,
        },
        s.DemoSettings: {"root": tmp / "demo", "image_size": 32, "finetune_epochs": 1,
                         "device": "cpu", "seed": 4},
        s.PrepareSettings: {
            **DRAW, "source": tmp / "raw", "root": tmp / "data", "split_seed": 1,
            "val_fraction": 0.3, "expected_positives": 2.0, "drop_unlabeled": True,
            "allow_missing": True, "csv_path": tmp / "labels.csv", "dataset_name": "pets",
            "classes_file": tmp / "classes.txt", "test_fraction": 0.5, "test_seed": 2,
            "train_images": 10, "test_images": 5, "demo_seed": 1, "test_split": "test",
        },
        s.ExtractSettings: {
            "backbone": "openclip:ViT-B-16", "weights": "openai=/tmp/w.bin", "sha256": "ab12",
            "image_size": 224, "batch_size": 7, "workers": 0, "dtype": "float16",
            "device": "cuda", "decode": "pil", "amp": False, "chunk_size": 64,
            "skip_bad": True, "force": True, "progress": False, "chunk_pause": 0.125,
        },
        s.PseudoLabelSettings: {
            "scorer": "openclip:ViT-L-14-336", "weights": "laion2b", "sha256": "cd",
            "grid": 0, "prompt": "a picture, of a {}.", "class_names": existing["names.txt"],
            "image_size": 336, "normalize": "imagenet", "tag": "clip", "batch_size": 9,
            "workers": 2, "device": "cpu", "amp": False, "chunk_size": 8, "skip_bad": True,
            "force": True, "progress": False, "chunk_pause": 0.5,
        },
        s.ImportScoresSettings: {
            "train": existing["a.npy"], "test": existing["b.npy"],
            "train_tiles": existing["c.npy"], "test_tiles": existing["d.npy"],
            "tag": "theirs", "force": True,
        },
    }  # fmt: skip


def settings_classes() -> list[type]:
    return [
        obj
        for name in settings_module.__all__
        if isinstance(obj := getattr(settings_module, name), type) and dataclasses.is_dataclass(obj)
    ]


def test_every_settings_class_round_trips_through_its_command_line(tmp_path):
    table = samples(tmp_path)
    assert set(settings_classes()) == set(table)  # a new settings class needs a sample
    for cls, values in table.items():
        settings = cls(**values)
        defaults = cls()
        # the sample sets every command-line field to something other than its default
        same = [f.name for f in cli_fields(cls) if getattr(settings, f.name) == getattr(defaults, f.name)]  # fmt: skip
        assert not same, (cls.__name__, same)
        args = to_args(settings)
        assert from_args(cls, args) == settings, (cls.__name__, args)
        assert to_args(defaults) == [] and from_args(cls, []) == defaults


def test_the_arguments_are_the_flags_a_user_would_type(tmp_path):
    settings = LinearSettings(
        losses=["an", "role"], lrs=[1e-3, 1.2345678e-5], epochs=3, val="observed",
        loss_options={"role": {"estimator_lr_multiplier": 5.0}, "ll_cp": {"delta_rel": 2.0}},
    )  # fmt: skip
    assert to_args(settings) == [
        "--losses", "an,role", "--lrs", "0.001,1.2345678e-05", "--epochs", "3",
        "--val", "observed",
        "--loss-option", "role.estimator_lr_multiplier=5",
        "--loss-option", "ll_cp.delta_rel=2",
    ]  # fmt: skip
    tuned = FinetuneSettings(loss="an", amp=False, cache_images=True, batchnorm="frozen")
    assert to_args(tuned) == ["--loss", "an", "--no-amp", "--cache-images", "--batchnorm", "frozen"]
    # `always` shows default values too, in the command's order
    assert to_args(ObserveSettings(bias="size"), always=["seed"]) == [
        "--bias", "size", "--seed", "1200",
    ]  # fmt: skip
    assert to_args(RunOptions(quiet=True, run_file=tmp_path / "r")) == [
        "--quiet", "--run-file", str(tmp_path / "r"),
    ]  # fmt: skip


def test_what_no_command_line_can_say_is_refused():
    with pytest.raises(SplError, match="weights_path is set .* not a command-line setting"):
        to_args(FinetuneSettings(weights_path="/tmp/w.pth"))
    with pytest.raises(SplError, match="--epochs cannot be given as None"):
        to_args(LinearSettings(epochs=None))
    with pytest.raises(ValueError, match="no command-line setting 'epoch'"):
        to_args(LinearSettings(), always=["epoch"])
    with pytest.raises(SplError, match="holds a comma"):
        to_args(settings_module.ReproduceSettings(since_losses=["em,an"]))
