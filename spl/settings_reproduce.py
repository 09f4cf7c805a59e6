"""The settings of ``spl reproduce`` and ``spl demo`` (see :mod:`spl.settings`): which
tables, datasets and seeds, and the grids of both stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spl.data import protocol
from spl.data.common import SplError
from spl.settings_fields import at_least, ints, names, positive_floats, positive_ints, setting

TABLES = ("linear", "finetune", "recovery")  # the paper's; `--table all`
MORE_TABLES = ("since-2021", "label-bias")
DATASETS = (*protocol.PAPER_DATASETS, "demo")
BIAS_KINDS = protocol.BIASES  # the label-bias table's columns, in order


def _tables(text: Any, option: str) -> list[str]:
    items = names(text, option)
    if items == ["all"]:
        return list(TABLES)
    return _one_of((*TABLES, *MORE_TABLES), "table")(text, option)


def _since_rows(text: Any, option: str) -> list[str] | None:
    from spl.fit.losses import LOSSES

    if text is None or text == "":
        return None
    return _one_of(tuple(LOSSES), "loss")(text, option)


def _one_of(valid: tuple[str, ...], what: str):
    def parse(text: Any, option: str) -> list[str]:
        items = names(text, option)
        unknown = [t for t in items if t not in valid]
        if unknown:
            raise SplError(f"unknown {what} {unknown[0]!r}; valid: {', '.join(valid)}")
        return list(dict.fromkeys(items))

    return parse


def _table_rows(text: Any, option: str) -> list[str] | None:
    from spl.fit.losses import LOSSES

    if text is None or text == "":
        return None
    valid = (*LOSSES, *(f"{k}+linearinit" for k in protocol.LINEARINIT))
    return _one_of(valid, "loss")(text, option)


@dataclass
class ReproduceSettings:
    """``spl reproduce``: which tables, datasets and seeds; the grids of both stages."""

    tables: list[str] = setting(
        factory=lambda: list(TABLES),
        parse=_tables,
        flag="--table",
        show_default="all",
        help="linear, finetune, recovery (all: these three, the paper's), since-2021 (the "
        "methods since the paper, linear and fine-tuned with each release's recipe, beside "
        "their published numbers) or label-bias (COCO: uniform / size / location / semantic "
        "single positives side by side); comma list allowed.",
    )
    datasets: list[str] = setting(
        factory=lambda: list(protocol.PAPER_DATASETS),
        parse=_one_of(DATASETS, "dataset"),
        help="Datasets (their columns).",
    )
    root: Path | None = setting(
        None, path="dir", required=True, help="Datasets root holding ROOT/<dataset>/labels.h5."
    )
    seeds: list[int] = setting(factory=lambda: [0], parse=ints, help="Comma list of seeds.")
    backbone: str = setting(protocol.BACKBONE, help="Backbone of the features and fine-tuning.")
    weights: str | None = setting(
        None, help="Backbone weights id or PATH [the backbone's default]."
    )
    image_size: int = setting(
        protocol.IMAGE_SIZE, parse=at_least(1), help="Images resized to S x S."
    )
    runs: Path = setting(Path("runs"), path="dir", help="Runs root.")
    out: Path = setting(Path("tables"), path="dir", help="Where tables, cell records and logs go.")
    linear_epochs: int = setting(protocol.LINEAR_EPOCHS, parse=at_least(1), help="Linear epochs.")
    linear_lrs: list[float] = setting(
        factory=lambda: list(protocol.LRS), parse=positive_floats, help="Linear learning rates."
    )
    linear_batch_sizes: list[int] = setting(
        factory=lambda: list(protocol.BATCH_SIZES), parse=positive_ints, help="Linear batch sizes."
    )
    finetune_epochs: int = setting(
        protocol.FINETUNE_EPOCHS, parse=at_least(1), help="Fine-tuning epochs."
    )
    finetune_losses: list[str] | None = setting(
        None, parse=_table_rows, help="Rows of the fine-tuned table [all eleven]."
    )
    finetune_lrs: list[float] = setting(
        factory=lambda: list(protocol.LRS), parse=positive_floats, help="Fine-tuning lrs."
    )
    finetune_batch_sizes: list[int] = setting(
        factory=lambda: list(protocol.BATCH_SIZES),
        parse=positive_ints,
        help="Fine-tuning batch sizes.",
    )
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.")
    jobs: int | None = setting(None, parse=at_least(1), help="Parallel jobs [one per GPU, else 1].")
    figure_dataset: str | None = setting(
        None, help="Dataset of the histogram figure [coco14 if present]."
    )
    observed: str = setting(
        "uniform",
        help="Observed single positives the tables are made under: uniform (the paper's "
        "set), size, location or semantic (a biased draw, COCO; added with `spl data "
        "observe --bias` when missing), or any observed-set name in labels.h5.",
    )
    observed_seed: int = setting(
        protocol.LABEL_SEED, help="Seed of the biased draws (--observed size|location|semantic)."
    )
    val: str = setting(
        "full",
        choices=("full", "observed"),
        help="Select epochs and configurations on the val split's full labels (the paper's) "
        "or its observed single positives.",
    )
    clicks: Path | None = setting(
        None,
        path="dir",
        help="COCO's crowdsourced click files, for the semantic draw (--observed semantic; "
        "the label-bias table's semantic column).",
    )
    since_losses: list[str] | None = setting(
        None,
        parse=_since_rows,
        help="Rows of the since-2021 table [its nine methods, AN, ROLE; with --scores also "
        "VLPL (em_pl) and AEVLP (gpr)].",
    )
    scores: str | None = setting(
        None,
        help="Scores tag (ROOT/<dataset>/scores/TAG.h5, from `spl pseudo-labels`) for the "
        "rows that train on a vision-language model's pseudo-labels (VLPL, AEVLP).",
    )
    dry_run: bool = setting(False, help="List the cells, their state and the commands.")


@dataclass
class DemoSettings:
    """``spl demo``: the bundled digits end to end."""

    root: Path = setting(Path("demo-output"), path="dir", help="Where everything goes.")
    image_size: int = setting(64, parse=at_least(1), help="Images resized to S x S.")
    finetune_epochs: int = setting(
        3, parse=at_least(1), help="Epochs of each LinearInit fine-tune."
    )
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.")
    seed: int = setting(0, help="Seed of the demo images.")
