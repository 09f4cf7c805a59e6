"""``spl finetune`` and ``spl predict``."""

from __future__ import annotations

from pathlib import Path

import click

from spl.clitools import check_resume, config_option, float_list, int_list
from spl.data.common import SplError
from spl.fit.engine import PAPER_BATCH_SIZES, PAPER_LRS
from spl.fit.losses import LOSSES


@click.command("finetune")
@click.argument("dataset", type=click.Path(path_type=Path), required=False)
@click.option("--loss", type=click.Choice(list(LOSSES)), help="The loss to fine-tune with.")
@click.option(
    "--init-from",
    type=click.Path(file_okay=False, exists=True),
    help="LinearInit: start from the best head of this loss in a fit-linear run.",
)
@click.option("--backbone", default="resnet50", show_default=True)
@click.option(
    "--weights",
    help="Weights id (IMAGENET1K_V1, DEFAULT, random ...) or PATH to a local state dict "
    "[the backbone's default; resnet50: IMAGENET1K_V1, the paper's].",
)
@click.option("--image-size", default=448, show_default=True)
@click.option("--lrs", default=",".join(f"{v:g}" for v in PAPER_LRS), show_default=True)
@click.option("--batch-sizes", default=",".join(map(str, PAPER_BATCH_SIZES)), show_default=True,
              help="Global batch sizes (split over torchrun processes).")  # fmt: skip
@click.option("--epochs", default=10, show_default=True)
@click.option("--seeds", default="0", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, help="Data-loading processes [cores - 1, at most 16].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Runs root: OUT/<dataset>/<backbone tag>/finetune-<time>/.")  # fmt: skip
@click.option("--observed", default="uniform-p1-n0-s1200", show_default=True)
@click.option("--observed-iu", default="uniform-p1-n1-s1200", show_default=True)
@click.option("--label-smoothing", default=0.1, show_default=True)
@click.option("--wan-gamma", type=float)
@click.option("--pseudo-negative-fraction", default=0.5, show_default=True)
@click.option("--estimator-lr-multiplier", default=10.0, show_default=True)
@click.option("--expected-positives", type=float)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--cache-images", is_flag=True,
              help="Decode and resize every image once into DATASET/cache/ (3*s^2 bytes each).")  # fmt: skip
@click.option("--sync-bn", is_flag=True, help="Synchronise BatchNorm across processes.")
@click.option("--batchnorm", type=click.Choice(["train", "frozen"]), default="train",
              show_default=True,
              help="train: the paper's (statistics follow the data); frozen: keep the "
              "pretrained statistics (for data far from ImageNet).")  # fmt: skip
@click.option("--resume", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Continue an interrupted fine-tune run.")  # fmt: skip
@click.option("--quiet", is_flag=True)
@config_option
@click.pass_context
def finetune(ctx: click.Context, dataset: Path | None, **options) -> None:
    """Fine-tune the whole network end to end over the paper's grid (10 epochs), plain or
    from a linear head (LinearInit), and report the best-val configuration's test mAP.

    Multi-GPU: torchrun --nproc_per_node N -m spl finetune ... (batch sizes are global).
    """
    from spl.finetune import FinetuneSettings, run_finetune, summary_table
    from spl.runs import read_csv

    resume, quiet, out = options.pop("resume"), options.pop("quiet"), options.pop("out")
    options["lrs"] = float_list(options["lrs"], "--lrs")
    options["batch_sizes"] = int_list(options["batch_sizes"], "--batch-sizes")
    options["seeds"] = int_list(options["seeds"], "--seeds")
    if resume is not None:
        config = check_resume(ctx, resume, "finetune", options)
        settings = FinetuneSettings(**config["settings"])
        dataset = Path(config["dataset"])
    else:
        if dataset is None or options["loss"] is None:
            raise SplError("give DATASET and --loss (or --resume RUN_DIR)")
        weights = options["weights"]
        if weights is not None and Path(weights).is_file():  # a local state dict
            options["weights"], options["weights_path"] = None, str(Path(weights).resolve())
        settings = FinetuneSettings(**options)
    if settings.epochs < 1 or min(settings.batch_sizes) < 1:
        raise SplError("--epochs and --batch-sizes must be positive")
    run_dir = run_finetune(
        dataset, settings, out, resume=resume, progress=not quiet, log=click.echo
    )
    if (run_dir / "results.csv").exists():
        click.echo(f"run: {run_dir}")
        click.echo(summary_table(read_csv(run_dir / "results.csv")))


@click.command("predict")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=int, default=5, show_default=True, help="Classes per image (0: all).")
@click.option("--threshold", type=float, help="Keep only classes with probability >= T.")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.option("--loss", help="Linear run: the loss whose selected head to use [best val].")
@click.option("--head", "head_name", help="Linear run: a head by name.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here [stdout]."
)
@config_option
def predict_command(
    model: Path, images, top_k, threshold, fmt, loss, head_name, device, batch_size, output
):
    """Class probabilities for IMAGE files from MODEL: a fine-tune best.pt (or its run
    folder), or a fit-linear run directory (its head on top of the run's backbone)."""
    from spl.predict import format_predictions, load_predictor, predict_images

    predictor = load_predictor(model, loss=loss, head=head_name, device=device)
    probabilities = predict_images(predictor, list(images), batch_size=batch_size)
    text = format_predictions(list(images), probabilities, predictor.classes, top_k, threshold, fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        from spl.data.common import write_text_atomic

        write_text_atomic(output, text)


COMMANDS = [finetune, predict_command]
