"""``spl data``: prepare raw datasets into ``ROOT/NAME/labels.h5`` and inspect them."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from spl.clitools import config_option, settings_from_cli
from spl.data.common import SplError
from spl.data.labels import count_values
from spl.data.prepared import (
    add_observed_set,
    format_summary,
    labels_path,
    load_prepared,
    write_prepared,
)
from spl.settings import ObserveSettings, PrepareSettings, click_options

DATASETS = ("voc12", "coco14", "nuswide", "cub", "custom", "openimages", "demo")


@click.group()
def data() -> None:
    """Prepare datasets (labels, split, single-positive labels) and show their statistics."""


@data.command("prepare")
@click.argument("name", type=click.Choice(DATASETS))
@click_options(PrepareSettings)
@config_option(PrepareSettings)
@click.pass_context
def prepare(ctx: click.Context, name: str, **options) -> None:
    """Write ROOT/NAME/labels.h5 from the raw dataset NAME found under --source."""
    from spl.data import sources
    from spl.data.sampling import check_observed_counts

    settings = settings_from_cli(ctx, PrepareSettings, options)
    # Checked before a large raw dataset is read or demo images are written.
    check_observed_counts(settings.num_pos, settings.num_neg)
    if settings.test_split != "validation" and name != "openimages":
        raise SplError(
            f"--test-split is read by openimages only; {name} has one official test file"
        )
    source, root, force = settings.source, settings.root, settings.force
    num_pos, num_neg, seed = settings.num_pos, settings.num_neg, settings.seed

    folder = settings.dataset_name or name
    out = root / folder / "labels.h5"
    if out.exists() and not force:
        raise SplError(f"{out} already exists; pass --force to replace it")
    if name == "demo":
        from spl.data.demo import build_demo

        raw = build_demo(
            root / folder,
            train_images=settings.train_images,
            test_images=settings.test_images,
            seed=settings.demo_seed,
            force=True,
        )
    else:
        if source is None:
            raise SplError(f"`spl data prepare {name}` needs --source RAW_DIR")
        if not source.is_dir():
            raise SplError(f"--source {source} is not a folder")
        if name == "custom":
            if settings.csv_path is None:
                raise SplError(f"custom datasets need --csv. Expected {sources.CUSTOM_LAYOUT}")
            raw = sources.read_custom(
                source,
                settings.csv_path,
                name=folder,
                test_fraction=settings.test_fraction,
                seed=settings.test_seed,
                classes_file=settings.classes_file,
            )
        elif name == "openimages":
            from spl.data.openimages import read_openimages

            raw = read_openimages(
                source, classes_file=settings.classes_file, test_split=settings.test_split
            )
        else:
            raw = sources.READERS[name](source)
        if not settings.allow_missing:
            sources.check_images_exist(raw)
    if settings.expected_positives is not None:
        raw.expected_positives = settings.expected_positives
    sets = [(num_pos, num_neg, seed)]
    if (num_pos, num_neg) != (1, 1):
        sets.append((1, 1, seed))  # the IU row of the paper trains on 1 positive + 1 negative
    prepared = write_prepared(
        raw,
        out,
        observed_sets=sets,
        split_seed=settings.split_seed,
        val_fraction=settings.val_fraction,
        drop_unlabeled=settings.drop_unlabeled,
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
@click.argument("dataset", type=click.Path(path_type=Path))
@click_options(ObserveSettings)
@config_option(ObserveSettings)
@click.pass_context
def observe(ctx: click.Context, dataset: Path, **options) -> None:
    """Add another observed-label set to ROOT/NAME: other counts or seeds (uniform), or one
    positive drawn with a bias (--bias size|location|semantic, COCO 2014; see
    docs/biased-labels.md). Train on it with --observed NAME."""
    settings = settings_from_cli(ctx, ObserveSettings, options)
    name = add_observed_set(
        dataset,
        settings.num_pos,
        settings.num_neg,
        settings.seed,
        bias=settings.bias,
        source=settings.source,
        clicks=settings.clicks,
        force=settings.force,
    )
    click.echo(f"added observed set {name} to {labels_path(dataset)}")
    if settings.bias != "uniform":
        prepared = load_prepared(dataset)
        for src, observed in prepared.observed_set(name).items():
            rows = np.arange(observed.shape[0])
            drawn = count_values(observed, rows)["positives_per_class"]
            top = ", ".join(
                f"{prepared.classes[c]} {int(drawn[c])}" for c in drawn.argsort()[::-1][:5]
            )
            click.echo(f"  {src}: {int(drawn.sum())} images; most drawn: {top}")
        click.echo(f"  train on it with --observed {name}")
