"""``spl extract``: backbone features of a prepared dataset into ``features/<tag>.h5``."""

from __future__ import annotations

from pathlib import Path

import click

from spl.clitools import config_option
from spl.data.common import SplError

_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@click.command("extract")
@config_option
@click.argument("dataset", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--backbone", default="resnet50", show_default=True, help="See --list-backbones.")
@click.option(
    "--weights",
    help="Weights id (e.g. IMAGENET1K_V1, DEFAULT, random) or PATH to a local state dict "
    "[default: the backbone's; resnet50: IMAGENET1K_V1, the paper's].",
)
@click.option("--sha256", help="Expected SHA-256 (or its first hex digits) of --weights PATH.")
@click.option("--image-size", default=448, show_default=True, help="Images are resized to S x S.")
@click.option("--batch-size", type=int, help="[default: 128 on CUDA, 32 on the CPU]")
@click.option("--workers", type=int, help="DataLoader workers [default: CPUs per process - 1].")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Stored feature type.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--decode",
    type=click.Choice(["auto", "pil", "device"]),
    default="auto",
    show_default=True,
    help="Where JPEGs are decoded: PIL in the workers, or on the device (nvJPEG on CUDA). "
    "auto: device on CUDA, pil otherwise.",
)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option(
    "--chunk-size",
    type=int,
    help="Rows per resumable chunk [default: 512; a resumed run keeps its own].",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Record unreadable images as bad rows (NaN features) instead of stopping.",
)
@click.option("--force", is_flag=True, help="Extract again: replace the file, drop a partial run.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--list-backbones", is_flag=True, help="List the backbones and their weights.")
@click.option("--chunk-pause", type=float, default=0.0, hidden=True)  # tests kill a run midway
def extract(
    dataset: Path | None,
    backbone: str,
    weights: str | None,
    sha256: str | None,
    image_size: int,
    batch_size: int | None,
    workers: int | None,
    dtype: str,
    device: str,
    decode: str,
    amp: bool,
    chunk_size: int | None,
    skip_bad: bool,
    force: bool,
    progress: bool,
    list_backbones: bool,
    chunk_pause: float,
) -> None:
    """Write DATASET/features/<backbone>-<weights>-<size>.h5 for the prepared DATASET.

    Resumes an interrupted run; does nothing when the file is complete (--force redoes it).
    Under `torchrun --nproc_per_node N spl extract ...` every process extracts its share.
    """
    if list_backbones:
        _print_backbones()
        return
    if dataset is None:
        raise SplError("give the prepared dataset folder: spl extract ROOT/NAME --backbone ...")
    from spl.extract.run import extract_features

    weights_id, weights_path = _split_weights(weights)
    result = extract_features(
        dataset,
        backbone=backbone,
        weights=weights_id,
        weights_path=weights_path,
        expected_sha256=sha256,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        device=device,
        decode=decode,
        amp=amp,
        chunk_size=chunk_size,
        skip_bad=skip_bad,
        force=force,
        progress=progress,
        log=click.echo,
        chunk_pause=chunk_pause,
    )
    if result.status != "written":
        return
    count = sum(len(rows) for rows in result.bad.values())
    if count:
        click.echo(
            f"{count} unreadable images recorded as bad rows (NaN features; fit-linear and "
            "finetune leave them out):"
        )
        listed = [text for rows in result.bad.values() for _, text in rows]
        for text in listed[:10]:
            click.echo(f"  {text}")
        if count > 10:
            click.echo(f"  ... and {count - 10} more (the file's bad/trainval and bad/test)")


def _split_weights(weights: str | None) -> tuple[str | None, Path | None]:
    """``--weights`` names either a weights id or a local file."""
    if weights is None:
        return None, None
    path = Path(weights).expanduser()
    if path.is_file() or "/" in weights or path.suffix in _WEIGHT_FILE_SUFFIXES:
        if not path.is_file():
            raise SplError(f"weights file {path} not found")
        return None, path
    return weights, None


def _print_backbones() -> None:
    from spl.extract.backbones import describe_backbones

    rows = describe_backbones()
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'backbone':<{width}}  {'default weights':<24}  other weights / note")
    for row in rows:
        others = [w for w in row["weights"].split(", ") if w != row["default_weights"]]
        note = f"  ({row['note']})" if row["note"] else ""
        click.echo(
            f"{row['name']:<{width}}  {row['default_weights']:<24}  {', '.join(others)}{note}"
        )
    click.echo(
        "Any backbone also takes --weights PATH (a local state dict, checked by SHA-256 when "
        "one is known). The feature file's tag is <backbone>-<weights>-<image size>."
    )


COMMANDS = [extract]
