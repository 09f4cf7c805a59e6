"""``spl finetune`` and ``spl predict``."""

from __future__ import annotations

from pathlib import Path

import click

from spl.clitools import check_resume, config_option, explicit_options, settings_from_cli
from spl.data.common import SplError
from spl.settings import FinetuneSettings, PredictSettings, click_options


@click.command("finetune")
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@click_options(FinetuneSettings)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Runs root: OUT/<dataset>/<backbone tag>/finetune-<time>/.")  # fmt: skip
@click.option("--resume", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Continue an interrupted fine-tune run.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bars.")
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

    resume, quiet, out = options.pop("resume"), options.pop("quiet"), options.pop("out")
    settings = settings_from_cli(ctx, FinetuneSettings, options)
    if resume is not None:
        config = check_resume(ctx, resume, "finetune", settings)
        settings = FinetuneSettings(**config["settings"])
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
        weights = settings.weights
        if weights is not None and Path(weights).is_file():  # a local state dict
            settings.weights, settings.weights_path = None, str(Path(weights).resolve())
    run_dir = run_finetune(
        dataset, settings, out, resume=resume, progress=not quiet, log=click.echo
    )
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
