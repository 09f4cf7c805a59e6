"""``spl fit-linear`` and ``spl import-features``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from spl.clitools import check_resume, config_option, float_list, int_list
from spl.data.common import SplError
from spl.fit.engine import PAPER_BATCH_SIZES, PAPER_LINEAR_EPOCHS, PAPER_LRS
from spl.fit.losses import parse_losses


@click.command("fit-linear")
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@click.option("--features", "tag", help="Feature tag: reads DATASET/features/TAG.h5.")
@click.option(
    "--losses",
    default="paper",
    show_default=True,
    help="'paper' (the nine of the paper's table), 'all', or a comma list (an,role,...).",
)
@click.option("--lrs", default=",".join(f"{v:g}" for v in PAPER_LRS), show_default=True)
@click.option("--batch-sizes", default=",".join(map(str, PAPER_BATCH_SIZES)), show_default=True)
@click.option("--epochs", default=PAPER_LINEAR_EPOCHS, show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma list of seeds.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Runs root: the run goes to OUT/<dataset>/<tag>/linear-<time>/.",
)
@click.option("--observed", default="uniform-p1-n0-s1200", show_default=True)
@click.option(
    "--observed-iu",
    default="uniform-p1-n1-s1200",
    show_default=True,
    help="Observed set (with negatives) that IU trains on.",
)
@click.option("--label-smoothing", default=0.1, show_default=True)
@click.option("--wan-gamma", type=float, help="WAN's weight on unobserved labels [1/(L-1)].")
@click.option("--pseudo-negative-fraction", default=0.5, show_default=True)
@click.option("--estimator-lr-multiplier", default=10.0, show_default=True)
@click.option("--expected-positives", type=float, help="k for EPR/ROLE [the dataset's].")
@click.option("--histogram-bins", default=20, show_default=True, help="0 turns histograms off.")
@click.option(
    "--resume",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Continue an interrupted run directory.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
@click.pass_context
def fit_linear(ctx: click.Context, dataset: Path | None, tag: str | None, **options) -> None:
    """Train linear heads for every loss x lr x batch size x seed on cached features.

    Defaults are the paper's protocol: 9 losses, lrs 1e-2..1e-5, batch sizes 8 and 16,
    25 epochs; per loss, the best val configuration is reported with its test mAP.
    """
    from spl.linear import LinearSettings, run_linear, summary_table
    from spl.runs import read_csv

    resume = options.pop("resume")
    quiet = options.pop("quiet")
    out = options.pop("out")
    settings = LinearSettings(
        losses=parse_losses(options["losses"]),
        lrs=float_list(options["lrs"], "--lrs"),
        batch_sizes=int_list(options["batch_sizes"], "--batch-sizes"),
        epochs=options["epochs"],
        seeds=int_list(options["seeds"], "--seeds"),
        observed=options["observed"],
        observed_iu=options["observed_iu"],
        label_smoothing=options["label_smoothing"],
        wan_gamma=options["wan_gamma"],
        pseudo_negative_fraction=options["pseudo_negative_fraction"],
        estimator_lr_multiplier=options["estimator_lr_multiplier"],
        expected_positives=options["expected_positives"],
        histogram_bins=options["histogram_bins"],
        device=options["device"],
    )
    if resume is not None:
        config = check_resume(ctx, resume, "linear", dataclasses.asdict(settings))
        settings = LinearSettings(**config["settings"])
        dataset, tag = Path(config["dataset"]), config["feature_tag"]
    elif dataset is None or tag is None:
        raise SplError("give DATASET and --features TAG (or --resume RUN_DIR)")
    for name, values in (("--epochs", [settings.epochs]), ("--batch-sizes", settings.batch_sizes)):
        if min(values) < 1:
            raise SplError(f"{name} must be positive")
    run_dir = run_linear(
        dataset, tag, settings, out, resume=resume, progress=not quiet, log=click.echo
    )
    click.echo(f"run: {run_dir}")
    click.echo(summary_table(read_csv(run_dir / "results.csv")))


@click.command("import-features")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--train-features", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True
)
@click.option(
    "--train-labels", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True
)
@click.option(
    "--test-features", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True
)
@click.option(
    "--test-labels", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True
)
@click.option(
    "--classes", "classes_file", type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("--tag", default="imported", show_default=True, help="Feature tag to write.")
@click.option("--num-pos", default=1, show_default=True)
@click.option("--num-neg", default=0, show_default=True)
@click.option("--seed", default=1200, show_default=True)
@click.option("--split-seed", default=1200, show_default=True)
@click.option("--expected-positives", type=float)
@click.option("--force", is_flag=True, help="Replace an existing labels.h5 / feature file.")
@config_option
def import_features(dataset: Path, **options) -> None:
    """Turn NumPy features + full 0/1 labels of a train and a test file into a prepared
    dataset DATASET (split and single-positive sets as for any dataset) and a feature file,
    so every loss can train on your own embeddings."""
    from spl.imported import import_arrays

    prepared, path = import_arrays(dataset, **options)
    from spl.data.prepared import format_summary

    click.echo(f"wrote {prepared.path} and {path}")
    click.echo(format_summary(prepared.summary()))
    click.echo(f"next: spl fit-linear {dataset} --features {options['tag']}")


COMMANDS = [fit_linear, import_features]
