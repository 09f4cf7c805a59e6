"""``spl extract``: backbone features of a prepared dataset into ``features/<tag>.h5``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from spl.clitools import config_option, settings_from_cli
from spl.data.common import SplError
from spl.settings import ExtractSettings, click_options

_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@click.command("extract")
@click.argument("dataset", required=False, type=click.Path(file_okay=False, path_type=Path))
@click_options(ExtractSettings)
@click.option("--list-backbones", is_flag=True, help="List the backbones and their weights.")
@config_option(ExtractSettings)
@click.pass_context
def extract(ctx: click.Context, dataset: Path | None, list_backbones: bool, **options) -> None:
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

    result = extract_features(dataset, log=click.echo, **run_values(ctx, ExtractSettings, options))
    if result.status == "written":
        report_bad(result.bad, "NaN features; fit-linear and finetune leave them out")


def run_values(ctx: click.Context, cls: type, options: dict) -> dict:
    """The keyword arguments of an image pass (extract, pseudo-labels) from its settings:
    ``--weights`` split into an id and a file, ``--sha256`` as the expected hash."""
    values = dataclasses.asdict(settings_from_cli(ctx, cls, options))
    values["weights"], values["weights_path"] = _split_weights(values.pop("weights"))
    values["expected_sha256"] = values.pop("sha256")
    return values


def report_bad(bad: dict[str, list[tuple[int, str]]], what: str) -> None:
    """Say how many images an image pass recorded as bad rows, and list the first ten."""
    count = sum(len(rows) for rows in bad.values())
    if not count:
        return
    click.echo(f"{count} unreadable images recorded as bad rows ({what}):")
    listed = [text for rows in bad.values() for _, text in rows]
    for text in listed[:10]:
        click.echo(f"  {text}")
    if count > 10:
        click.echo(f"  ... and {count - 10} more (the file's bad/trainval and bad/test)")


def _split_weights(weights: str | None) -> tuple[str | None, Path | None]:
    """``--weights`` names a weights id, a local file, or ``ID=PATH``: a local file that
    holds the weights ``ID`` (e.g. ``openai=~/dl/open_clip_model.safetensors``)."""
    if weights is None:
        return None, None
    declared, sep, rest = weights.partition("=")
    if sep and declared and "/" not in declared and rest and not Path(weights).is_file():
        path = Path(rest).expanduser()
        if not path.is_file():
            raise SplError(f"weights file {path} not found")
        return declared, path
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
        "one is known), or --weights ID=PATH for a local copy of the weights ID. The feature "
        "file's tag is <backbone>-<weights>-<image size>, with ':' as '-' (e.g. "
        "openclip-ViT-B-16-openai-224, timm-resnet50-a1_in1k-224)."
    )


COMMANDS = [extract]
