"""``spl data``: prepare raw datasets into ``ROOT/NAME/labels.h5`` and inspect them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spl.clitools import config_option
from spl.data.common import SplError
from spl.data.prepared import (
    add_observed_set,
    format_summary,
    labels_path,
    load_prepared,
    write_prepared,
)
from spl.data.sampling import DEFAULT_SEED, DEFAULT_VAL_FRACTION

DATASETS = ("voc12", "coco14", "nuswide", "cub", "custom", "demo")


@click.group()
def data() -> None:
    """Prepare datasets (labels, split, single-positive labels) and show their statistics."""


@data.command("prepare")
@config_option
@click.argument("name", type=click.Choice(DATASETS))
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    help="Raw dataset folder (the image folder for custom; not needed for demo).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Datasets root: writes ROOT/NAME/labels.h5.",
)
@click.option("--num-pos", default=1, show_default=True, help="Observed positives per image.")
@click.option("--num-neg", default=0, show_default=True, help="Observed negatives per image.")
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Label-sampling seed.")
@click.option("--split-seed", default=DEFAULT_SEED, show_default=True, help="Train/val seed.")
@click.option("--val-fraction", default=DEFAULT_VAL_FRACTION, show_default=True)
@click.option(
    "--expected-positives",
    type=float,
    help="k for EPR/ROLE (default: the paper's value, else the training mean).",
)
@click.option(
    "--drop-unlabeled", is_flag=True, help="Drop images with no positive label (NUS-WIDE)."
)
@click.option("--allow-missing", is_flag=True, help="Prepare even if listed images are missing.")
@click.option("--force", is_flag=True, help="Replace an existing labels.h5.")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="custom: CSV with columns image, labels (';'-separated), optional split.",
)
@click.option("--name", "dataset_name", help="custom: name of the prepared dataset folder.")
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="custom: file with one class name per line (fixes the class order).",
)
@click.option("--test-fraction", default=0.2, show_default=True, help="custom without split.")
@click.option("--test-seed", default=0, show_default=True, help="custom: seed of that split.")
@click.option("--train-images", default=2000, show_default=True, help="demo: training images.")
@click.option("--test-images", default=1000, show_default=True, help="demo: test images.")
@click.option("--demo-seed", default=0, show_default=True, help="demo: image seed.")
def prepare(
    name: str,
    source: Path | None,
    root: Path,
    num_pos: int,
    num_neg: int,
    seed: int,
    split_seed: int,
    val_fraction: float,
    expected_positives: float | None,
    drop_unlabeled: bool,
    allow_missing: bool,
    force: bool,
    csv_path: Path | None,
    dataset_name: str | None,
    classes_file: Path | None,
    test_fraction: float,
    test_seed: int,
    train_images: int,
    test_images: int,
    demo_seed: int,
) -> None:
    """Write ROOT/NAME/labels.h5 from the raw dataset NAME found under --source."""
    from spl.data import sources

    folder = dataset_name or name
    out = root / folder / "labels.h5"
    if out.exists() and not force:
        raise SplError(f"{out} already exists; pass --force to replace it")
    if name == "demo":
        from spl.data.demo import build_demo

        raw = build_demo(
            root / folder,
            train_images=train_images,
            test_images=test_images,
            seed=demo_seed,
            force=True,
        )
    else:
        if source is None:
            raise SplError(f"`spl data prepare {name}` needs --source RAW_DIR")
        if not source.is_dir():
            raise SplError(f"--source {source} is not a folder")
        if name == "custom":
            if csv_path is None:
                raise SplError(f"custom datasets need --csv. Expected {sources.CUSTOM_LAYOUT}")
            raw = sources.read_custom(
                source,
                csv_path,
                name=folder,
                test_fraction=test_fraction,
                seed=test_seed,
                classes_file=classes_file,
            )
        else:
            raw = sources.READERS[name](source)
        if not allow_missing:
            sources.check_images_exist(raw)
    if expected_positives is not None:
        raw.expected_positives = expected_positives
    sets = [(num_pos, num_neg, seed)]
    if (num_pos, num_neg) != (1, 1):
        sets.append((1, 1, seed))  # the IU row of the paper trains on 1 positive + 1 negative
    prepared = write_prepared(
        raw,
        out,
        observed_sets=sets,
        split_seed=split_seed,
        val_fraction=val_fraction,
        drop_unlabeled=drop_unlabeled,
        force=force,
    )
    click.echo(f"wrote {prepared.path}")
    click.echo(format_summary(prepared.summary()))


@data.command("info")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(dataset: Path, as_json: bool) -> None:
    """Print the statistics of a prepared dataset ROOT/NAME."""
    prepared = load_prepared(dataset)
    summary = prepared.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@data.command("observe")
@config_option
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--num-pos", default=1, show_default=True)
@click.option("--num-neg", default=0, show_default=True)
@click.option("--seed", default=DEFAULT_SEED, show_default=True)
@click.option("--force", is_flag=True, help="Recompute a set that exists.")
def observe(dataset: Path, num_pos: int, num_neg: int, seed: int, force: bool) -> None:
    """Add another observed-label set (e.g. 2 positives, other seeds) to ROOT/NAME."""
    name = add_observed_set(dataset, num_pos, num_neg, seed, force=force)
    click.echo(f"added observed set {name} to {labels_path(dataset)}")
