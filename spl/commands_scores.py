"""``spl pseudo-labels`` and ``spl import-scores``: the scores file ``scores/<tag>.h5``
(design.md, contract 2b) from a vision-language model, or from users' own arrays."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click

from spl.clitools import config_option, settings_from_cli
from spl.commands_extract import _split_weights
from spl.settings import at_least, click_options, setting


@dataclass
class PseudoLabelSettings:
    """``spl pseudo-labels``: scorer, weights, prompt, tiles, input and how the work runs."""

    scorer: str = setting(
        "openclip:ViT-B-16",
        help="openclip:ARCH, an open_clip architecture (AEVLP's ViT-B-16; VLPL's ViT-L-14-336).",
    )
    weights: str | None = setting(
        None,
        help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b88k; fetched by open_clip), "
        "random, PATH to a local file, or TAG=PATH for a local copy of a tag's file [openai].",
    )
    sha256: str | None = setting(
        None, help="Expected SHA-256 (or its first hex digits) of --weights PATH."
    )
    grid: int = setting(
        4, parse=at_least(0), help="Tiles: a g x g grid of non-overlapping tiles (0: none)."
    )
    prompt: str = setting("a photo of a {}.", help="Prompt; {} becomes the class name.")
    class_names: Path | None = setting(
        None,
        path="file",
        exists=True,
        help="Class names for the prompts, one a line in the dataset's class order "
        "[the dataset's].",
    )
    image_size: int | None = setting(
        None,
        parse=at_least(1),
        help="The image and each tile are resized to S x S [the model's own: 224 for ViT-B-16].",
    )
    normalize: str = setting(
        "clip",
        choices=("clip", "imagenet"),
        help="clip: the model's own mean/std (open_clip's config); imagenet: ImageNet's, as "
        "the VLPL and AEVLP releases feed CLIP.",
    )
    tag: str | None = setting(
        None, help="Name of the scores file [e.g. openclip-ViT-B-16-openai-224-g4]."
    )
    batch_size: int | None = setting(
        None,
        parse=at_least(1),
        help="Images per batch, each with its tiles [1024 views on CUDA, 64 on the CPU].",
    )
    workers: int | None = setting(
        None, parse=at_least(0), help="DataLoader workers [default: CPUs per process - 1]."
    )
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.")
    amp: bool = setting(True, help="bf16 autocast of the image tower on CUDA.")
    chunk_size: int | None = setting(
        None,
        parse=at_least(1),
        help="Rows per resumable chunk [default: 512; a resumed run keeps its own].",
    )
    skip_bad: bool = setting(
        False, help="Record unreadable images as bad rows (NaN scores) instead of stopping."
    )
    force: bool = setting(False, help="Score again: replace the file, drop a partial run.")
    progress: bool = setting(True, help="Show a progress bar.")
    chunk_pause: float = setting(0.0, hidden=True, help="Seconds to wait after each chunk (tests).")


@dataclass
class ImportScoresSettings:
    """``spl import-scores``: scores computed elsewhere, in the prepared dataset's row order."""

    train: Path | None = setting(
        None,
        path="file",
        exists=True,
        required=True,
        help="[N, L] .npy: scores of the trainval file's rows (train and val splits).",
    )
    test: Path | None = setting(
        None, path="file", exists=True, required=True, help="[M, L] .npy: the test file's."
    )
    train_tiles: Path | None = setting(
        None, path="file", exists=True, help="[N, g*g, L] .npy: tile scores, row by row."
    )
    test_tiles: Path | None = setting(
        None, path="file", exists=True, help="[M, g*g, L] .npy: the test file's tile scores."
    )
    tag: str = setting("imported", help="Name of the scores file.")
    force: bool = setting(False, help="Replace an existing scores file.")


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

    settings = settings_from_cli(ctx, PseudoLabelSettings, options)
    values = dataclasses.asdict(settings)
    values["weights"], values["weights_path"] = _split_weights(values.pop("weights"))
    values["expected_sha256"] = values.pop("sha256")
    result = score_images(dataset, log=click.echo, **values)
    if result.status != "written":
        return
    _report_bad(result.bad, "NaN scores")


def _report_bad(bad: dict[str, list[tuple[int, str]]], what: str) -> None:
    count = sum(len(rows) for rows in bad.values())
    if not count:
        return
    click.echo(f"{count} unreadable images recorded as bad rows ({what}):")
    listed = [text for rows in bad.values() for _, text in rows]
    for text in listed[:10]:
        click.echo(f"  {text}")
    if count > 10:
        click.echo(f"  ... and {count - 10} more (the file's bad/trainval and bad/test)")


@click.command("import-scores")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click_options(ImportScoresSettings)
@config_option(ImportScoresSettings)
@click.pass_context
def import_scores_command(ctx: click.Context, dataset: Path, **options) -> None:
    """Write DATASET/scores/<tag>.h5 from scores computed elsewhere (NumPy arrays in the
    prepared dataset's row order), in the format `spl pseudo-labels` writes."""
    from spl.extract.scores import import_scores

    settings = settings_from_cli(ctx, ImportScoresSettings, options)
    path = import_scores(dataset, **dataclasses.asdict(settings))
    click.echo(f"wrote {path}")


COMMANDS = [pseudo_labels, import_scores_command]
