"""``spl reproduce`` and ``spl demo``: the paper's tables in batch, and the bundled demo."""

from __future__ import annotations

from pathlib import Path

import click

from spl.clitools import config_option, float_list, int_list
from spl.data.common import SplError
from spl.fit.engine import PAPER_BATCH_SIZES, PAPER_LINEAR_EPOCHS, PAPER_LRS


def _choices(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in valid]
    if unknown or not items:
        raise SplError(
            f"unknown {what} {unknown[0] if unknown else text!r}; valid: {', '.join(valid)}"
        )
    return items


@click.command("reproduce")
@click.option("--table", "tables", default="all", show_default=True,
              help="linear, finetune, recovery or all (comma list allowed).")  # fmt: skip
@click.option("--datasets", default="voc12,coco14,nuswide,cub", show_default=True)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Datasets root holding ROOT/<dataset>/labels.h5.")  # fmt: skip
@click.option("--seeds", default="0", show_default=True)
@click.option("--backbone", default="resnet50", show_default=True)
@click.option("--weights", help="Backbone weights id or PATH [the backbone's default].")
@click.option("--image-size", default=448, show_default=True)
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True)  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("tables"),
              show_default=True, help="Where tables, cell records and logs go.")  # fmt: skip
@click.option("--linear-epochs", default=PAPER_LINEAR_EPOCHS, show_default=True)
@click.option("--linear-lrs", default=",".join(f"{v:g}" for v in PAPER_LRS), show_default=True)
@click.option("--linear-batch-sizes", default=",".join(map(str, PAPER_BATCH_SIZES)),
              show_default=True)  # fmt: skip
@click.option("--finetune-epochs", default=10, show_default=True)
@click.option("--finetune-losses", help="Rows of the fine-tuned table [all eleven].")
@click.option("--finetune-lrs", default=",".join(f"{v:g}" for v in PAPER_LRS), show_default=True)
@click.option("--finetune-batch-sizes", default=",".join(map(str, PAPER_BATCH_SIZES)),
              show_default=True)  # fmt: skip
@click.option("--device", default="auto", show_default=True)
@click.option("--jobs", type=int, help="Parallel jobs [one per GPU, else 1].")
@click.option("--figure-dataset", help="Dataset of the histogram figure [coco14 if present].")
@click.option("--dry-run", is_flag=True, help="List the cells, their state and the commands.")
@config_option
def reproduce_command(tables, datasets, root, seeds, backbone, weights, image_size, runs, out,
                      linear_epochs, linear_lrs, linear_batch_sizes, finetune_epochs, finetune_losses, finetune_lrs,
                      finetune_batch_sizes, device, jobs, figure_dataset, dry_run):  # fmt: skip
    """Compute every missing cell of the paper's tables and write them beside the paper's
    numbers (Markdown, CSV, JSON) with the unobserved-positive histogram figure."""
    from spl.fit.losses import LOSSES, PAPER_LOSSES
    from spl.reproduce import DATASETS, LINEARINIT, TABLES, Plan, reproduce

    table_list = list(TABLES) if tables == "all" else _choices(tables, TABLES, "table")
    dataset_list = _choices(datasets, DATASETS, "dataset")
    from spl.extract.backbones import list_backbones

    if backbone not in list_backbones():
        raise SplError(f"unknown backbone {backbone!r}; available: {', '.join(list_backbones())}")
    rows = [*PAPER_LOSSES, *(f"{k}+linearinit" for k in LINEARINIT)]
    valid_rows = tuple([*LOSSES, *(f"{k}+linearinit" for k in LINEARINIT)])
    plan = Plan(
        tables=table_list, datasets=dataset_list, root=root, runs=runs, out=out,
        seeds=int_list(seeds, "--seeds"), backbone=backbone, weights=weights,
        image_size=image_size, linear_epochs=linear_epochs,
        linear_lrs=float_list(linear_lrs, "--linear-lrs"),
        linear_batch_sizes=int_list(linear_batch_sizes, "--linear-batch-sizes"),
        finetune_losses=_choices(finetune_losses, valid_rows, "loss") if finetune_losses else rows,
        finetune_lrs=float_list(finetune_lrs, "--finetune-lrs"),
        finetune_batch_sizes=int_list(finetune_batch_sizes, "--finetune-batch-sizes"),
        finetune_epochs=finetune_epochs, device=device, jobs=jobs or _default_jobs(),
        figure_dataset=figure_dataset,
    )  # fmt: skip
    result = reproduce(plan, dry_run=dry_run, log=click.echo)
    if dry_run:
        click.echo(result["text"])
        return
    for path in result["written"]:
        if path.suffix == ".md":
            click.echo(path.read_text())
    if result["figure"]:
        click.echo(f"figure: {result['figure']}")


def _default_jobs() -> int:
    import torch

    return max(1, torch.cuda.device_count())


@click.command("demo")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True)  # fmt: skip
@click.option("--image-size", default=64, show_default=True)
@click.option("--finetune-epochs", default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the demo images.")
@config_option
def demo_command(root: Path, image_size: int, finetune_epochs: int, device: str, seed: int) -> None:
    """The whole pipeline on the bundled digits, offline: prepare, extract EfficientNet-Lite0
    features, train every loss of the linear table, fine-tune the LinearInit rows briefly,
    print the tables and write the figure."""
    from spl.demo import run_demo

    run_demo(root, image_size=image_size, finetune_epochs=finetune_epochs, device=device,
             seed=seed, log=click.echo)  # fmt: skip


COMMANDS = [reproduce_command, demo_command]
