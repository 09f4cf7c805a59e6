"""``spl fit-linear``, ``spl import-features`` and ``spl losses``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from spl.clitools import check_resume, config_option, settings_from_cli
from spl.data.common import SplError
from spl.settings import (
    FitLinearOptions,
    ImportSettings,
    LinearSettings,
    click_options,
    settings_from,
)


@click.command("fit-linear")
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@click_options(FitLinearOptions)
@click_options(LinearSettings)
@config_option(LinearSettings)
@click.pass_context
def fit_linear(ctx: click.Context, dataset: Path | None, **options) -> None:
    """Train linear heads for every loss x lr x batch size x seed on cached features.

    Defaults are the paper's protocol: 9 losses, lrs 1e-2..1e-5, batch sizes 8 and 16,
    25 epochs; per loss, the best val configuration is reported with its test mAP.
    Under torchrun (one process per GPU) the sweep's (seed, batch size) groups are spread
    over the processes and rank 0 writes the run a single process writes.
    """
    from spl.evaluate.report import linear_table
    from spl.fit.losses import LOSSES
    from spl.linear import run_linear
    from spl.linear_shards import check_loss_parts
    from spl.runs import read_csv

    run = settings_from_cli(ctx, FitLinearOptions, options)
    settings = settings_from_cli(ctx, LinearSettings, options)
    tag = run.features
    if run.resume is not None:
        config = check_resume(ctx, run.resume, "linear", settings)
        settings = settings_from(LinearSettings, config["settings"])
        dataset, tag = Path(config["dataset"]), config["feature_tag"]
    elif dataset is None or tag is None:
        raise SplError("give DATASET and --features TAG (or --resume RUN_DIR)")
    else:  # its range depends on --losses; checked again (named as a flag) in run_linear
        check_loss_parts(settings.loss_parts, settings.losses, _given_as(ctx, "loss_parts"))
    if run.dry_run:
        from spl.linear_plan import plan_of_run

        click.echo(plan_of_run(dataset, tag, settings).text())
        return
    run_dir = run_linear(
        dataset, tag, settings, run.out, resume=run.resume, progress=not run.quiet,
        log=click.echo, run_file=run.run_file,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it once
        click.echo(f"run: {run_dir}")
        click.echo(linear_table(read_csv(run_dir / "results.csv"), LOSSES))


def _given_as(ctx: click.Context, name: str) -> str:
    """How a message names a setting: the --config file and key it came from, or its flag."""
    from click.core import ParameterSource

    config = ctx.meta.get("spl_config_file")
    if config and ctx.get_parameter_source(name) == ParameterSource.DEFAULT_MAP:
        return f"{config}: {name}"
    return "--" + name.replace("_", "-")


@click.command("import-features")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click_options(ImportSettings)
@config_option(ImportSettings)
@click.pass_context
def import_features(ctx: click.Context, dataset: Path, **options) -> None:
    """Turn NumPy features + full 0/1 labels of a train and a test file into a prepared
    dataset DATASET (split and single-positive sets as for any dataset) and a feature file,
    so every loss can train on your own embeddings."""
    from spl.data.prepared import format_summary
    from spl.imported import import_arrays

    settings = settings_from_cli(ctx, ImportSettings, options)
    prepared, path = import_arrays(dataset, **dataclasses.asdict(settings))
    click.echo(f"wrote {prepared.path} and {path}")
    click.echo(format_summary(prepared.summary()))
    click.echo(f"next: spl fit-linear {dataset} --features {settings.tag}")


@click.command("losses")
def losses_command() -> None:
    """List every loss: its key, title, what it trains on, and its options with defaults."""
    from spl.fit.losses import LOSSES, describe_options

    for key, loss in LOSSES.items():
        paper = "paper" if loss.in_paper else "     "
        seen = loss.trains_on + (", full labels" if loss.reads_labels else "")
        seen += ", a vision-language model's scores (--scores)" if loss.reads_scores else ""
        click.echo(f"{key:<11} {paper} {loss.title:<11} {loss.labels_seen:<18} {seen}")
        click.echo(f"{'':<12}options: {describe_options(loss)}")


COMMANDS = [fit_linear, import_features, losses_command]
