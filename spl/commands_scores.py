"""``spl pseudo-labels`` and ``spl import-scores``: the scores file ``scores/<tag>.h5``
(docs/architecture.md, contract 2b) from a vision-language model, or from users' own arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from spl.clitools import config_option, settings_from_cli
from spl.commands_extract import report_bad, run_values
from spl.settings import ImportScoresSettings, PseudoLabelSettings, click_options


@click.command("pseudo-labels")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click_options(PseudoLabelSettings)
@config_option(PseudoLabelSettings)
@click.pass_context
def pseudo_labels(ctx: click.Context, dataset: Path, **options) -> None:
    """Write DATASET/scores/<tag>.h5: a vision-language model's cosine similarity of every
    image, and of each tile of a grid, with each class prompt (the input of VLPL's and
    AEVLP's pseudo-labels; the rules that turn them into labels apply at training).

    Resumes an interrupted run; does nothing when the file is complete (--force redoes it).
    Under `torchrun --nproc_per_node N spl pseudo-labels ...` every process scores its share.
    """
    from spl.extract.scorer import score_images

    result = score_images(dataset, log=click.echo, **run_values(ctx, PseudoLabelSettings, options))
    if result.status == "written":
        report_bad(result.bad, "NaN scores")


@click.command("import-scores")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click_options(ImportScoresSettings)
@config_option(ImportScoresSettings)
@click.pass_context
def import_scores_command(ctx: click.Context, dataset: Path, **options) -> None:
    """Write DATASET/scores/<tag>.h5 from scores computed elsewhere (NumPy arrays in the
    prepared dataset's row order), in the format `spl pseudo-labels` writes."""
    from spl.imported import import_scores

    settings = settings_from_cli(ctx, ImportScoresSettings, options)
    path = import_scores(dataset, **dataclasses.asdict(settings))
    click.echo(f"wrote {path}")


COMMANDS = [pseudo_labels, import_scores_command]
