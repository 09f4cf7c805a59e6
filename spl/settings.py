"""Each command's settings, declared once: a dataclass whose fields carry their default,
help and parser (:func:`~spl.settings_fields.setting`). The click options are generated
from it, ``--config`` files are checked against it, a run records it in ``config.json``,
and :func:`~spl.settings_fields.to_args` gives the command line back; defaults come from
the paper's protocol (:mod:`spl.data.protocol`). The declaring machinery is in
:mod:`spl.settings_fields`, the settings of ``spl reproduce`` and ``spl demo`` in
:mod:`spl.settings_reproduce`; both are importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from spl.data import protocol
from spl.data.common import SplError
from spl.memory_plan import ByteSize, parse_size
from spl.settings_fields import (
    at_least,
    click_options,
    config_value,
    from_args,
    ints,
    loss_options,
    names,
    parse_value,
    positive,
    positive_floats,
    positive_ints,
    setting,
    settings_from,
    to_args,
)
from spl.settings_reproduce import (
    BIAS_KINDS,
    DATASETS,
    MORE_TABLES,
    TABLES,
    DemoSettings,
    ReproduceSettings,
)

__all__ = [
    # the declaring machinery (spl.settings_fields)
    "at_least", "click_options", "config_value", "from_args", "ints", "loss_options", "names",
    "parse_value", "positive", "positive_floats", "positive_ints", "setting", "settings_from",
    "to_args",
    # spl reproduce and spl demo (spl.settings_reproduce)
    "BIAS_KINDS", "DATASETS", "MORE_TABLES", "TABLES", "DemoSettings", "ReproduceSettings",
    # the commands' settings
    "DrawSettings", "ExtractSettings", "FinetuneSettings", "FitLinearOptions", "GridSettings",
    "ImportScoresSettings", "ImportSettings", "LinearSettings", "LossSettings",
    "ObserveSettings", "PredictSettings", "PrepareSettings", "PseudoLabelSettings",
    "RunOptions",
]  # fmt: skip

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
    """``spl fit-linear``: the sweep; defaults are the paper's protocol (docs/protocol.md s5)."""

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
    loss_parts: int = setting(
        1,
        parse=at_least(1),
        help="Train each (seed, batch size) group's losses as this many engine groups, of "
        "about equal work (1 to the number of losses), so that more torchrun processes can "
        "share a sweep. Moves the last bits of the results (a group's width enters its "
        "arithmetic); a run is the same whatever the number of processes.",
    )
    # fit-linear's batch sizes are never split over torchrun's processes (GridSettings' help
    # says how finetune's are): each is its own engine group, trained whole by one process.
    batch_sizes: list[int] = setting(
        factory=lambda: list(protocol.BATCH_SIZES), parse=positive_ints, help="Batch sizes."
    )
    stream_features: bool = setting(
        False,
        help="Read the features from the feature file a batch at a time (a background "
        "thread reads ahead) whatever the memory budget; the same numbers as resident.",
    )
    memory_budget: ByteSize | None = setting(
        None,
        parse=parse_size,
        show_default="80% of the RAM on a CPU, 90% of the GPU's memory on CUDA",
        help="Memory the sweep may hold (8GiB, 512MiB, 2.5GB or bytes; > 0): what does not "
        "fit streams (features first, then labels read per batch); a sweep that cannot fit "
        "is refused before it starts, naming what to reduce (see --dry-run). On a CPU the "
        "torchrun processes of one machine share it.",
    )

    def __post_init__(self) -> None:
        self.losses = _losses(self.losses, "--losses")
        self.memory_budget = parse_size(self.memory_budget, "memory_budget")


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


def _run_file(value: Any, option: str) -> Path | None:
    """A file the run's path is written to: not a folder, in a folder (or one to create)."""
    if value is None:
        return None
    path = Path(value)
    if path.name in ("", ".", "..") or path.is_dir():
        raise SplError(
            f"{option} {str(value)!r} is a folder; give a file path (the run directory's path "
            "is written there)"
        )
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise SplError(f"{option} {value}: {parent} is a file, not a folder")
    return path


@dataclass
class RunOptions:
    """Where a training command's run goes, and how it says so; not recorded with the run's
    settings (they do not change what it computes)."""

    out: Path = setting(
        Path("runs"),
        path="dir",
        help="Runs root: the run goes to OUT/<dataset>/<tag>/<kind>-<time>/.",
    )
    resume: Path | None = setting(
        None, path="dir", exists=True, help="Continue an interrupted run directory."
    )
    quiet: bool = setting(False, help="No progress bars.")
    run_file: Path | None = setting(
        None,
        path="file",
        parse=_run_file,
        help="Write the run directory's path to FILE as soon as the run exists (created or "
        "resumed): how a script (and `spl reproduce`) learns where the run went.",
    )


@dataclass
class FitLinearOptions(RunOptions):
    """``spl fit-linear``'s :class:`RunOptions` and the feature file it trains on."""

    cli_order: ClassVar[tuple[str, ...]] = ("features",)

    features: str | None = setting(None, help="Feature tag: reads DATASET/features/TAG.h5.")
    dry_run: bool = setting(
        False,
        help="Print the memory plan (each item, its bytes, resident or streamed) and exit "
        "without a run.",
    )


@dataclass
class DrawSettings:
    """How single-positive labels are drawn (docs/protocol.md section 2), shared by ``spl data
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
