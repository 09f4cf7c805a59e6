"""``spl finetune`` and ``spl predict``."""

from __future__ import annotations

from pathlib import Path

import click

from spl.clitools import check_resume, config_option, explicit_options, settings_from_cli
from spl.data.common import SplError
from spl.settings import (
    FinetuneSettings,
    PredictSettings,
    RunOptions,
    click_options,
    settings_from,
)


@click.command("finetune")
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@click_options(FinetuneSettings)
@click_options(RunOptions)
@config_option(FinetuneSettings)
@click.pass_context
def finetune(ctx: click.Context, dataset: Path | None, **options) -> None:
    """Fine-tune the whole network end to end over the paper's grid (10 epochs), plain or
    from a linear head (LinearInit), and report the best-val configuration's test mAP.

    Multi-GPU: torchrun --nproc_per_node N -m spl finetune ... (batch sizes are global).
    """
    from spl.evaluate.report import finetune_table
    from spl.finetune import run_finetune
    from spl.fit.losses import LOSSES
    from spl.runs import read_csv

    run = settings_from_cli(ctx, RunOptions, options)
    settings = settings_from_cli(ctx, FinetuneSettings, options)
    if run.resume is not None:
        config = check_resume(ctx, run.resume, "finetune", settings)
        settings = settings_from(FinetuneSettings, config["settings"])
        dataset = Path(config["dataset"])
    else:
        if dataset is None or settings.loss is None:
            raise SplError("give DATASET and --loss (or --resume RUN_DIR)")
        fixed = sorted(explicit_options(ctx) & {"lrs", "batch_sizes", "epochs"})
        if settings.recipe == "source" and fixed:
            flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
            raise SplError(
                f"--recipe source uses the release's own lr, batch size and epochs: drop {flags} "
                "(or use --recipe paper for the paper's grid)"
            )
    run_dir = run_finetune(
        dataset, settings, run.out, resume=run.resume, progress=not run.quiet, log=click.echo,
        run_file=run.run_file,
    )  # fmt: skip
    if (run_dir / "results.csv").exists():
        click.echo(f"run: {run_dir}")
        click.echo(finetune_table(read_csv(run_dir / "results.csv"), LOSSES))


@click.command("predict")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click_options(PredictSettings)
@config_option(PredictSettings)
@click.pass_context
def predict_command(ctx: click.Context, model: Path, images, **options) -> None:
    """Class probabilities for IMAGE files from MODEL: a fine-tune best.pt (or its run
    folder), or a fit-linear run directory (its head on top of the run's backbone)."""
    from spl.predict import format_predictions, load_predictor, predict_images

    settings = settings_from_cli(ctx, PredictSettings, options)
    predictor = load_predictor(
        model, loss=settings.loss, head=settings.head, device=settings.device
    )
    probabilities = predict_images(predictor, list(images), batch_size=settings.batch_size)
    text = format_predictions(
        list(images), probabilities, predictor.classes, settings.top_k, settings.threshold,
        settings.format,
    )  # fmt: skip
    if settings.output is None:
        click.echo(text, nl=False)
    else:
        from spl.data.common import write_text_atomic

        write_text_atomic(settings.output, text)


COMMANDS = [finetune, predict_command]
