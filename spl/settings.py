"""Each command's settings, declared once: a dataclass whose fields carry their default,
help and parser (:func:`setting`). The click options are generated from it
(:func:`click_options`), ``--config`` files are checked against it, and a run records it
in ``config.json``; defaults come from the paper's protocol (:mod:`spl.data.protocol`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import click

from spl.data import protocol
from spl.data.common import SplError

# --------------------------------------------------------------------------- parsers
# Each takes the command-line text (or a --config value) and the option's name, and
# returns the value or raises SplError naming the option.


def _numbers(text: Any, option: str, cast: type) -> list:
    kind = "integers" if cast is int else "numbers"
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = [_cast(cast, v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        raise SplError(f"{option} takes comma-separated {kind}, got {text!r}") from None
    if not values:
        raise SplError(f"{option} needs at least one value")
    return values


def _cast(cast: type, value: Any):
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if cast is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return cast(str(value).strip()) if isinstance(value, str) else cast(value)


def positive_floats(text: Any, option: str) -> list[float]:
    """Comma-separated numbers, each finite and > 0 (learning rates)."""
    values = _numbers(text, option, float)
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise SplError(f"{option} must be positive finite numbers, got {bad[0]!r}")
    return values


def positive_ints(text: Any, option: str) -> list[int]:
    values = _numbers(text, option, int)
    bad = [v for v in values if v < 1]
    if bad:
        raise SplError(f"{option} must be positive integers, got {bad[0]}")
    return values


def ints(text: Any, option: str) -> list[int]:
    return _numbers(text, option, int)


def names(text: Any, option: str) -> list[str]:
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    values = [str(v).strip() for v in items if str(v).strip()]
    if not values:
        raise SplError(f"{option} needs at least one value")
    return values


def at_least(minimum: float) -> Callable[[Any, str], Any]:
    def check(value: Any, option: str):
        if value is not None and not value >= minimum:  # NaN fails too
            raise SplError(f"{option} must be >= {minimum:g}, got {value!r}")
        return value

    return check


def positive(value: Any, option: str):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SplError(f"{option} must be a positive finite number, got {value!r}")
    return value


def loss_options(items: Any, option: str) -> dict[str, dict[str, Any]]:
    from spl.fit.losses import parse_loss_options

    if isinstance(items, dict):
        return parse_loss_options(items, where=option)
    return parse_loss_options(list(items or ()), where=option)


# --------------------------------------------------------------------------- declaring


def setting(
    default: Any = None,
    *,
    help: str,  # noqa: A002 - click's name
    parse: Callable[[Any, str], Any] | None = None,
    choices: Iterable[str] | None = None,
    flag: str | None = None,
    multiple: bool = False,
    cli: bool = True,
    show_default: bool | str = True,
    factory: Callable[[], Any] | None = None,
    path: str | None = None,
    exists: bool = False,
    required: bool = False,
    hidden: bool = False,
) -> Any:
    """A settings field: its default, help and parser (for text from the command line or a
    --config file), and how it shows on the command line (``flag``; ``path`` "file" or
    "dir" for a path, ``exists`` to require it; ``cli=False`` for a setting only code
    sets)."""
    metadata = {
        "help": help,
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "multiple": multiple,
        "cli": cli,
        "show_default": show_default,
        "path": path,
        "exists": exists,
        "required": required,
        "hidden": hidden,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields shown on the command line, those named in ``cli_order`` first."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    order = list(getattr(cls, "cli_order", ()))
    return sorted(fields, key=lambda f: order.index(f.name) if f.name in order else len(order))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(cls: type, f: dataclasses.Field) -> Any:
    kind = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _shown(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def click_options(cls: type) -> Callable:
    """Decorate a click command with one option per CLI field of the settings ``cls``."""

    def decorate(command: Callable) -> Callable:
        defaults = cls()
        for f in reversed(_cli_fields(cls)):
            meta, kind = f.metadata, _kind(cls, f)
            default = getattr(defaults, f.name)
            kwargs: dict[str, Any] = {
                "help": meta["help"],
                "show_default": meta["show_default"],
                "hidden": meta["hidden"],
            }
            flag = _flag(f)
            if kind is bool:
                names_ = [f"{flag}/--no-{flag[2:]}"] if default else [flag]
                kwargs.update(default=bool(default), is_flag=True)
                if not default:
                    kwargs["show_default"] = False
                command = click.option(*names_, f.name, **kwargs)(command)
                continue
            if meta["path"]:
                kind_ok = {"file_okay": meta["path"] == "file", "dir_okay": meta["path"] == "dir"}
                path_type = click.Path(exists=meta["exists"], path_type=Path, **kind_ok)
                kwargs.update(type=path_type, default=default, required=meta["required"])
            elif meta["multiple"]:
                kwargs.update(multiple=True, default=(), show_default=False)
            elif meta["choices"]:
                kwargs.update(type=click.Choice(meta["choices"]), default=default)
            elif kind in (int, float, str):
                kwargs.update(type=kind, default=default)
            else:
                kwargs.update(type=str, default=_shown(default))
            if default is None and not meta["multiple"]:
                kwargs["show_default"] = (
                    meta["show_default"] if meta["show_default"] is not True else False
                )
            command = click.option(flag, f.name, **kwargs)(command)
        return command

    return decorate


def parse_value(cls: type, name: str, value: Any, where: str | None = None) -> Any:
    """One field's value from the command line or a --config file, parsed and checked.
    ``where`` names the source in errors (the config file and key); the flag otherwise."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    option = where or _flag(f)
    meta, kind = f.metadata, _kind(cls, f)
    if meta.get("multiple") and value == ():
        return getattr(cls(), name)
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise SplError(f"{option} takes true or false, got {value!r}")
        return value
    if meta.get("choices") and str(value) not in meta["choices"]:
        raise SplError(f"{option}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("path"):
        return Path(value)
    if kind in (int, float):
        try:
            value = _cast(kind, value)
        except (TypeError, ValueError):
            kind_name = "an integer" if kind is int else "a number"
            raise SplError(f"{option} takes {kind_name}, got {value!r}") from None
    parse = meta.get("parse")
    if parse is not None:
        value = parse(value, option)
    return value


def settings_from(cls: type, values: dict[str, Any], sources: dict[str, str] | None = None):
    """``cls`` from click's values (strings parsed, checked; other keys ignored)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = parse_value(cls, f.name, values[f.name], (sources or {}).get(f.name))
    return cls(**out)


def config_value(cls: type, name: str, value: Any, where: str) -> Any:
    """A --config value checked as the command line's would be, the error naming the file
    and key; returned in the form click expects as a default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    parse_value(cls, name, value, where)
    if f.metadata.get("multiple"):
        if isinstance(value, dict):  # a [loss_options.<key>] table
            return tuple(f"{k}.{o}={v}" for k, table in value.items() for o, v in table.items())
        return tuple(value)
    return _shown(value)


# --------------------------------------------------------------------------- settings


@dataclass
class LossSettings:
    """Which observed labels the losses see, k, and each loss's option overrides."""

    observed: str = setting(
        protocol.OBSERVED,
        help="Observed-label set the losses train on (see `spl data info`; e.g. a biased "
        "set size-p1-s1200).",
    )
    val: str = setting(
        "full",
        choices=("full", "observed"),
        help="What selects the epoch and the configuration: the val split's full labels "
        "(the paper's) or its observed single positives (no fully labelled val set needed; "
        "the official code's val_set_variant='observed'). Test mAP always uses full labels.",
    )
    observed_iu: str = setting(
        protocol.OBSERVED_IU,
        help="Observed set with negatives, for losses that train on observed negatives (IU).",
    )
    expected_positives: float | None = setting(
        None,
        parse=positive,
        help="k, positives per image, for the losses with an expected-positive term (EPR, "
        "ROLE) [the dataset's].",
    )
    scores: str | None = setting(
        None,
        help="Scores tag: DATASET/scores/TAG.h5 (from `spl pseudo-labels` or `spl "
        "import-scores`), the vision-language model's scores the pseudo-labels of em_pl "
        "(VLPL) and gpr (AEVLP) are computed from; needed by those losses only.",
    )
    loss_options: dict = setting(
        factory=dict,
        flag="--loss-option",
        multiple=True,
        parse=loss_options,
        help="LOSS.OPTION=VALUE, e.g. role.estimator_lr_multiplier=5 (repeatable; see "
        "`spl losses` for each loss's options). In --config: a [loss_options.LOSS] table.",
    )

    def observed_for(self, trains_on: str) -> str:
        from spl.fit.losses import WITH_NEGATIVES

        return self.observed_iu if trains_on == WITH_NEGATIVES else self.observed

    def selection_labels(self, prepared, rows) -> Any:
        """The labels of the val rows that select epochs and configurations: the full ones,
        or (``--val observed``) the observed positives, as the official code's map_observed
        scores them (y = observed == 1; the set is drawn on the whole training file, before
        the split, so the val rows carry single positives)."""
        if self.val == "full":
            return prepared.labels["trainval"][rows]
        return (prepared.observed_set(self.observed)["trainval"][rows] == 1).astype("uint8")


def _losses(text: Any, option: str) -> list[str]:
    from spl.fit.losses import parse_losses

    return parse_losses(names(text, option))


def _loss(text: Any, option: str) -> str:
    from spl.fit.losses import get_loss

    return get_loss(str(text).strip()).key


@dataclass
class GridSettings(LossSettings):
    """The paper's grid: learning rates x batch sizes x seeds, for a number of epochs."""

    lrs: list[float] = setting(
        factory=lambda: list(protocol.LRS), parse=positive_floats, help="Learning rates."
    )
    batch_sizes: list[int] = setting(
        factory=lambda: list(protocol.BATCH_SIZES),
        parse=positive_ints,
        help="Batch sizes (under torchrun, global: split over the processes).",
    )
    seeds: list[int] = setting(factory=lambda: [0], parse=ints, help="Comma list of seeds.")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:1 ...")


@dataclass
class LinearSettings(GridSettings):
    """``spl fit-linear``: the sweep; defaults are the paper's protocol (paper.md s5)."""

    cli_order: ClassVar[tuple[str, ...]] = ("losses", "lrs", "batch_sizes", "epochs", "seeds")

    losses: list[str] = setting(
        factory=lambda: ["paper"],
        parse=_losses,
        show_default="paper",
        help="'paper' (the nine of the paper's table), 'all', or a comma list (an,role,...).",
    )
    epochs: int = setting(protocol.LINEAR_EPOCHS, parse=at_least(1), help="Epochs per head.")
    histogram_bins: int = setting(
        protocol.HISTOGRAM_BINS, parse=at_least(0), help="0 turns histograms off."
    )

    def __post_init__(self) -> None:
        self.losses = _losses(self.losses, "--losses")


@dataclass
class FinetuneSettings(GridSettings):
    """``spl finetune``: one loss over the paper's grid, end to end; the paper's defaults."""

    cli_order: ClassVar[tuple[str, ...]] = (
        "loss", "recipe", "init_from", "backbone", "weights", "image_size", "lrs",
        "batch_sizes", "epochs", "seeds",
    )  # fmt: skip

    loss: str | None = setting(None, parse=_loss, help="The loss to fine-tune with.")
    epochs: int = setting(protocol.FINETUNE_EPOCHS, parse=at_least(1), help="Epochs.")
    backbone: str = setting(protocol.BACKBONE, help="Backbone (see spl extract --list-backbones).")
    weights: str | None = setting(
        None,
        help="Weights id (IMAGENET1K_V1, DEFAULT, random ...) or PATH to a local state dict "
        "[the backbone's default; resnet50: IMAGENET1K_V1, the paper's].",
    )
    weights_path: str | None = setting(None, cli=False, help="A local state dict (from --weights).")
    image_size: int = setting(
        protocol.IMAGE_SIZE, parse=at_least(1), help="Images resized to S x S."
    )
    init_from: str | None = setting(
        None, help="LinearInit: start from the best head of this loss in a fit-linear run."
    )
    workers: int | None = setting(
        None, parse=at_least(0), help="Data-loading processes [cores - 1, at most 16]."
    )
    amp: bool = setting(True, help="bf16 autocast on CUDA.")
    channels_last: bool = setting(True, help="Channels-last memory format on CUDA.")
    cache_images: bool = setting(
        False, help="Decode and resize every image once into DATASET/cache/ (3*s^2 bytes each)."
    )
    sync_bn: bool = setting(False, help="Synchronise BatchNorm across processes.")
    recipe: str = setting(
        "paper",
        choices=("paper", "source"),
        help="paper: the paper's grid and protocol. source: the loss's own published recipe "
        "for the dataset (one configuration: its optimiser, lr, head lr multiplier, batch "
        "size, epochs, schedule and early stop; see docs/recipes.md).",
    )
    batchnorm: str = setting(
        "train",
        choices=("train", "frozen"),
        help="train: the paper's (statistics follow the data); frozen: keep the pretrained "
        "statistics (for data far from ImageNet).",
    )


@dataclass
class DrawSettings:
    """How single-positive labels are drawn (paper.md section 2), shared by ``spl data
    prepare`` and ``spl data observe``."""

    num_pos: int = setting(
        protocol.NUM_POSITIVES, help="Observed positives per image (-1: all of them)."
    )
    num_neg: int = setting(
        protocol.NUM_NEGATIVES, help="Observed negatives per image (-1: all of them)."
    )
    seed: int = setting(protocol.LABEL_SEED, help="Label-sampling seed.")
    force: bool = setting(False, help="Recompute a set that exists.")


@dataclass
class ObserveSettings(DrawSettings):
    """``spl data observe``: another observed-label set, uniform (the paper's) or biased
    towards large, central or often-clicked classes (COCO; docs/biased-labels.md)."""

    cli_order: ClassVar[tuple[str, ...]] = (
        "bias", "seed", "num_pos", "num_neg", "source", "clicks",
    )  # fmt: skip

    bias: str = setting(
        "uniform",
        choices=protocol.BIASES,
        help="uniform: the paper's draw. size, location, semantic: one positive per image, "
        "drawn in proportion to the class's instance area, its instances' closeness to the "
        "image centre, or its share of good crowd clicks (COCO 2014 only).",
    )
    source: Path | None = setting(
        None,
        path="dir",
        help="--bias: the COCO folder with annotations/instances_{train,val}2014.json "
        "[the folder the dataset was prepared from].",
    )
    clicks: Path | None = setting(
        None,
        path="dir",
        help="--bias semantic: the folder with COCO's crowdsourcing_annotate_category_"
        "val2014.json and crowdsourcing_instance_spotting_val2014.json.",
    )


@dataclass
class ImportSettings:
    """``spl import-features``: users' own embeddings and labels."""

    train_features: Path | None = setting(
        None, path="file", exists=True, required=True, help="[N, D] .npy of the training file."
    )
    train_labels: Path | None = setting(
        None, path="file", exists=True, required=True, help="[N, L] 0/1 .npy of the training file."
    )
    test_features: Path | None = setting(
        None, path="file", exists=True, required=True, help="[M, D] .npy of the test file."
    )
    test_labels: Path | None = setting(
        None, path="file", exists=True, required=True, help="[M, L] 0/1 .npy of the test file."
    )
    classes_file: Path | None = setting(
        None, flag="--classes", path="file", exists=True, help="Class names, one per line."
    )
    tag: str = setting("imported", help="Feature tag to write.")
    num_pos: int = setting(protocol.NUM_POSITIVES, help="Observed positives per image (-1: all).")
    num_neg: int = setting(protocol.NUM_NEGATIVES, help="Observed negatives per image (-1: all).")
    seed: int = setting(protocol.LABEL_SEED, help="Label-sampling seed.")
    split_seed: int = setting(protocol.SPLIT_SEED, help="Train/val split seed.")
    expected_positives: float | None = setting(
        None, parse=positive, help="k for EPR/ROLE [the training mean]."
    )
    force: bool = setting(False, help="Replace an existing labels.h5 / feature file.")


def _probability(value: Any, option: str):
    if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
        raise SplError(f"{option} must be a probability in [0, 1], got {value!r}")
    return value


@dataclass
class PredictSettings:
    """``spl predict``: which head, how many classes per image, where the output goes."""

    top_k: int = setting(5, parse=at_least(0), help="Classes per image (0: all).")
    threshold: float | None = setting(
        None, parse=_probability, help="Keep only classes with probability >= T."
    )
    format: str = setting("csv", choices=("csv", "json"), help="Output format.")
    loss: str | None = setting(
        None, help="Linear run: the loss whose selected head to use [best val]."
    )
    head: str | None = setting(None, help="Linear run: a head by name.")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.")
    batch_size: int = setting(32, parse=at_least(1), help="Images per batch.")
    output: Path | None = setting(None, path="file", help="Write here [stdout].")


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


def _fraction(value: Any, option: str):
    from spl.data.sampling import check_fraction

    check_fraction(value, option)
    return value


@dataclass
class PrepareSettings(DrawSettings):
    """``spl data prepare``: the raw dataset, its split and its observed-label draw."""

    source: Path | None = setting(
        None, path="dir", help="Raw dataset folder (the image folder for custom; not for demo)."
    )
    root: Path | None = setting(
        None, path="dir", required=True, help="Datasets root: writes ROOT/NAME/labels.h5."
    )
    split_seed: int = setting(protocol.SPLIT_SEED, help="Train/val split seed.")
    val_fraction: float = setting(
        protocol.VAL_FRACTION, parse=_fraction, help="Share of the training file held out as val."
    )
    expected_positives: float | None = setting(
        None,
        parse=positive,
        help="k for EPR/ROLE (default: the paper's value, else the training mean).",
    )
    drop_unlabeled: bool = setting(False, help="Drop images with no positive label (NUS-WIDE).")
    allow_missing: bool = setting(False, help="Prepare even if listed images are missing.")
    force: bool = setting(False, help="Replace an existing labels.h5.")
    csv_path: Path | None = setting(
        None,
        flag="--csv",
        path="file",
        help="custom: CSV with columns image, labels (';'-separated), optional split.",
    )
    dataset_name: str | None = setting(
        None, flag="--name", help="custom: name of the prepared dataset folder."
    )
    classes_file: Path | None = setting(
        None,
        flag="--classes",
        path="file",
        help="custom: file with one class name per line (fixes the class order); "
        "openimages: one LabelName per line, a subset of the classes.",
    )
    test_split: str = setting(
        "validation",
        choices=("validation", "test"),
        help="openimages: the official file that becomes the test split.",
    )
    test_fraction: float = setting(0.2, parse=_fraction, help="custom without split: test share.")
    test_seed: int = setting(0, help="custom: seed of that split.")
    train_images: int = setting(2000, parse=at_least(1), help="demo: training images.")
    test_images: int = setting(1000, parse=at_least(1), help="demo: test images.")
    demo_seed: int = setting(0, help="demo: image seed.")


@dataclass
class ExtractSettings:
    """``spl extract``: backbone, weights, image size and how the work runs."""

    backbone: str = setting(
        protocol.BACKBONE, help="See --list-backbones; also openclip:ARCH and timm:NAME."
    )
    weights: str | None = setting(
        None,
        help="Weights id (e.g. IMAGENET1K_V1, DEFAULT, random), PATH to a local state dict, or "
        "ID=PATH for a local copy of the weights ID [default: the backbone's; resnet50: "
        "IMAGENET1K_V1, the paper's].",
    )
    sha256: str | None = setting(
        None, help="Expected SHA-256 (or its first hex digits) of --weights PATH."
    )
    image_size: int = setting(
        protocol.IMAGE_SIZE, parse=at_least(1), help="Images are resized to S x S."
    )
    batch_size: int | None = setting(
        None, parse=at_least(1), help="[default: 128 on CUDA, 32 on the CPU]"
    )
    workers: int | None = setting(
        None, parse=at_least(0), help="DataLoader workers [default: CPUs per process - 1]."
    )
    dtype: str = setting("float32", choices=("float32", "float16"), help="Stored feature type.")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N.")
    decode: str = setting(
        "auto",
        choices=("auto", "pil", "device"),
        help="Where JPEGs are decoded: PIL in the workers, or on the device (nvJPEG on CUDA). "
        "auto: device on CUDA, pil otherwise.",
    )
    amp: bool = setting(True, help="bf16 autocast on CUDA.")
    chunk_size: int | None = setting(
        None,
        parse=at_least(1),
        help="Rows per resumable chunk [default: 512; a resumed run keeps its own].",
    )
    skip_bad: bool = setting(
        False, help="Record unreadable images as bad rows (NaN features) instead of stopping."
    )
    force: bool = setting(False, help="Extract again: replace the file, drop a partial run.")
    progress: bool = setting(True, help="Show a progress bar.")
    chunk_pause: float = setting(0.0, hidden=True, help="Seconds to wait after each chunk (tests).")


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
