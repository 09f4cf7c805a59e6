"""``spl pseudo-labels``: a vision-language model's scores of every image against class
prompts, written to ``ROOT/NAME/scores/<tag>.h5`` (:mod:`spl.extract.scores`).

For each image: the cosine similarity of the image tower's embedding with each prompt's
text embedding ("a photo of a {class}."), for the whole image and for each tile of a g x g
grid of non-overlapping tiles (:func:`spl.extract.images.tile_boxes`, as AEVLP cuts them). A
worker decodes each image once and resizes the whole image and every tile to ``s x s``
(``transforms.Resize((s, s))``, bilinear, as the releases do); the image tower sees them
in one batch. The prompts' text features are computed once per run, in float32. The pass
is the feature extractor's (:func:`spl.extract.passes.run_image_pass`): chunked, resumable,
atomic, sharded under torchrun, bf16 autocast on CUDA for the image tower.

What this does not do: the releases recompute their labels every batch from flipped,
ImageNet-normalised training crops, and AEVLP adds to the text features the output of a
graph network that is randomly initialised and never trained. Here the scores are fixed
per image (no flip), the prompts' text features alone are used, and the normalisation is
CLIP's unless ``normalize="imagenet"`` (the releases' inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spl.data.common import SplError
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD
from spl.data.prepared import SOURCES, PreparedDataset
from spl.data.runtime import Processes
from spl.extract.backbones import BackboneSpec
from spl.extract.chunks import Assembly
from spl.extract.images import Batch, ImageFiles, image_paths
from spl.extract.passes import (
    ChunkedPass,
    ExtractResult,
    PassOptions,
    Target,
    check_run_options,
    run_image_pass,
)
from spl.extract.run import FeatureStep

DEFAULT_SCORER = "openclip:ViT-B-16"  # AEVLP's; VLPL's is openclip:ViT-L-14-336
DEFAULT_PROMPT = "a photo of a {}."
DEFAULT_GRID = 4
NORMALIZATIONS = ("clip", "imagenet")
TILES = (
    "g x g non-overlapping tiles, row by row from the top left (tile k: row k // g, column "
    "k % g), each width // g x height // g pixels of the decoded image (as AEVLP cuts them)"
)
# Settings a resumed run and a finished file must share with this run.
_RESUME_KEYS = (
    "scorer",
    "weights",
    "weights_sha256",
    "prompt",
    "class_names",
    "grid",
    "image_size",
    "normalize",
    "transform",
    "compute",
    "dataset_fingerprint",
)
_SAME_FILE_KEYS = ("scorer", "weights", "prompt", "class_names", "grid", "image_size", "normalize")


def scores_tag(scorer: str, weights: str, image_size: int, grid: int, normalize: str) -> str:
    """``openclip-ViT-B-16-openai-224-g4``; ``-imagenet`` when not CLIP's normalisation."""
    from spl.extract.backbones import backbone_tag
    from spl.extract.features import check_tag

    tag = backbone_tag(scorer, weights, image_size)
    if grid:
        tag += f"-g{int(grid)}"
    if normalize != "clip":
        tag += f"-{normalize}"
    return check_tag(tag)


def prompts_for(prompt: str, class_names: Sequence[str]) -> list[str]:
    """The prompt with each class name in its one ``{}``."""
    if prompt.count("{}") != 1:
        raise SplError(f"--prompt {prompt!r} must hold one {{}} where the class name goes")
    try:
        return [prompt.format(name) for name in class_names]
    except (IndexError, KeyError, ValueError) as exc:
        raise SplError(f"--prompt {prompt!r}: {exc}; write literal braces as {{{{ }}}}") from exc


def read_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Class names for the prompts, one a line, in the dataset's class order."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SplError(f"cannot read class names from {path}: {exc}") from exc
    if len(names) != len(classes):
        raise SplError(
            f"{path} names {len(names)} classes; the dataset has {len(classes)} "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}), one a line"
        )
    return names


class CosineScores(nn.Module):
    """Image tower plus fixed text features: ``[B, 3, s, s]`` -> cosine similarities ``[B, L]``.

    The normalisation and the product run in float32 outside autocast (a bf16 image tower
    on CUDA is the only reduced-precision part)."""

    def __init__(self, image_tower: nn.Module, text_features: torch.Tensor) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.register_buffer("text", text_features.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.image_tower(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(embedding.float(), dim=-1) @ self.text.T


class ScoreStep(FeatureStep):
    """A :class:`Batch` of images ``[B, s, s, 3]`` or of images and their tiles
    ``[B, 1 + g*g, s, s, 3]`` in, ``{"scores": [B, L], "tiles": [B, g*g, L]}`` out: every
    view of the batch goes through the image tower in one call."""

    def __init__(
        self,
        image_tower: nn.Module,
        text_features: torch.Tensor,
        spec,
        image_size: int,
        device: torch.device,
        *,
        amp: bool = True,
    ) -> None:
        super().__init__(
            CosineScores(image_tower, text_features), spec, image_size, device, amp=amp
        )

    @property
    def compute(self) -> str:
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        return (
            f"{self.device.type} {precision.get(self.amp_dtype, 'float32')} image tower, "
            "channels_last; float32 text tower and cosines"
        )

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> tuple[dict[str, torch.Tensor], list[str]]:
        images = batch.images
        if images.dim() == 4:  # no tiles
            images = images[:, None]
        count, views = images.shape[:2]
        flat = Batch(images.reshape(count * views, *images.shape[2:]), batch.index, batch.errors)
        x, _ = self.images(flat)
        cosines = self.features(x).reshape(count, views, -1)
        out = {"scores": cosines[:, 0]}
        if views > 1:
            out["tiles"] = cosines[:, 1:]
        return out, list(batch.errors)


@torch.inference_mode()
def text_features(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The prompts' L2-normalised text embeddings ``[L, E]``, float32 (once per run)."""
    return F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)


def score_images(
    dataset_dir: Path | str,
    *,
    scorer: str = DEFAULT_SCORER,
    weights: str | None = None,
    weights_path: Path | str | None = None,
    expected_sha256: str | None = None,
    grid: int = DEFAULT_GRID,
    prompt: str = DEFAULT_PROMPT,
    class_names: Path | Sequence[str] | None = None,
    image_size: int | None = None,
    normalize: str = "clip",
    tag: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    amp: bool = True,
    chunk_size: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    chunk_pause: float = 0.0,
) -> ExtractResult:
    """Write ``ROOT/NAME/scores/<tag>.h5`` for the prepared dataset ``dataset_dir``.

    ``scorer`` ``openclip:ARCH`` with ``weights`` (an open_clip tag such as ``openai``,
    ``random``, or a name for ``weights_path``); ``grid`` g (0: the whole image only);
    ``image_size`` [the model's own]; ``normalize`` ``clip`` (the model's preprocessing
    config) or ``imagenet`` (the releases' inputs); ``class_names`` (a file or a list) the
    names the prompts use [the dataset's]; ``tag`` [from scorer, weights, size, grid and
    normalisation]. Resumes an interrupted run; does nothing when the file exists with the
    same settings (``force`` redoes it). Under torchrun every rank scores its share.
    """
    from spl.extract.backbones import resolve_weights
    from spl.extract.libraries import OPENCLIP, import_library
    from spl.extract.scores import scores_path

    arch = _check_scorer(scorer, normalize, grid)

    def plan(prepared: PreparedDataset, procs: Processes) -> Target:
        names = _class_names(class_names, prepared)
        prompts = prompts_for(prompt, names)
        entry, chosen, path, digest = resolve_weights(
            scorer, weights, weights_path, True, expected_sha256
        )
        open_clip = import_library(OPENCLIP)
        size = _model_image_size(open_clip, arch) if image_size is None else image_size
        check_run_options(size, chunk_size)
        name = tag or scores_tag(entry.name, chosen, size, grid, normalize)
        planned = {
            "scorer": entry.name,
            "weights": chosen,
            "prompt": prompt,
            "class_names": names,
            "grid": int(grid),
            "image_size": int(size),
            "normalize": normalize,
        }
        final = scores_path(prepared.path.parent, name)

        def build() -> ChunkedPass:
            from spl.extract.libraries import openclip_model

            model, spec = openclip_model(arch, chosen, path, digest, size)
            if normalize == "imagenet":
                spec = dataclasses.replace(spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            text = text_features(
                model.to(procs.device).eval(), _tokens(open_clip, arch, prompts), procs.device
            )
            step = ScoreStep(model.visual, text, spec, size, procs.device, amp=amp)
            attrs = _attrs(prepared, planned, name, spec, prompts, text, step.compute)
            return _score_pass(prepared, final, attrs, step, text, force=force)

        same = {k: planned[k] for k in _SAME_FILE_KEYS}
        return Target(final, name, build, same=same, redo="--force scores again")

    options = PassOptions(batch_size, workers, chunk_size, skip_bad, force, progress, chunk_pause)
    return run_image_pass(dataset_dir, plan, device=device, options=options, log=log)


def _check_scorer(scorer: str, normalize: str, grid: int) -> str:
    """Refuse bad scorer settings before any work; the open_clip architecture of ``scorer``."""
    from spl.extract.libraries import OPENCLIP, split_name

    prefixed = split_name(scorer)
    if prefixed is None or prefixed[0] != OPENCLIP:
        raise SplError(
            f"unknown scorer {scorer!r}: use openclip:ARCH, an open_clip architecture "
            "(e.g. openclip:ViT-B-16, AEVLP's; openclip:ViT-L-14-336, VLPL's)"
        )
    if normalize not in NORMALIZATIONS:
        raise SplError(f"--normalize {normalize}: use one of {', '.join(NORMALIZATIONS)}")
    if grid < 0:
        raise SplError(f"--grid {grid} must be 0 (no tiles) or more")
    return prefixed[1]


def _class_names(
    class_names: Path | str | Sequence[str] | None, prepared: PreparedDataset
) -> list[str]:
    """The names the prompts use: the dataset's, a file's (one a line) or a list."""
    if class_names is None:
        return list(prepared.classes)
    if isinstance(class_names, str | Path):
        return read_class_names(Path(class_names), prepared.classes)
    return list(class_names)


def _model_image_size(open_clip, arch: str) -> int:
    """The input size of an open_clip architecture's image tower."""
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def _tokens(open_clip, arch: str, prompts: list[str]) -> torch.Tensor:
    try:
        return open_clip.get_tokenizer(arch)(prompts)
    except Exception as exc:  # e.g. a Hugging Face tokenizer not in the cache offline
        raise SplError(f"cannot get the tokenizer of open_clip {arch}: {exc}") from exc


def _attrs(
    prepared: PreparedDataset,
    planned: dict,
    tag: str,
    spec: BackboneSpec,
    prompts: list[str],
    text: torch.Tensor,
    compute: str,
) -> dict:
    """The scores file's attributes: the planned settings, then what the run found."""
    size, grid = planned["image_size"], planned["grid"]
    transform = {
        "resize": [size, size],
        "interpolation": "bilinear",
        "crop": None,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "decode": "PIL, once per image (whole image and tiles), in the workers",
        "tiles": TILES if grid else None,
    }
    return {
        **planned,
        "tag": tag,
        "weights_sha256": spec.sha256 or "",
        "weights_source": spec.source,
        "classes": list(prepared.classes),
        "prompts": prompts,
        "tiles": TILES if grid else "",
        "transform": transform,
        "compute": compute,
        "text_feature_dim": int(text.shape[1]),
        "dataset_name": prepared.name,
        "dataset_fingerprint": prepared.fingerprint,
    }


def _score_pass(
    prepared: PreparedDataset,
    final: Path,
    attrs: dict,
    step: ScoreStep,
    text: torch.Tensor,
    *,
    force: bool,
) -> ChunkedPass:
    """Every image and its tiles, decoded once in the workers, through ``step``, to a
    scores file (float32) that keeps the prompts' text features too."""
    from spl.extract.scores import ScoresWriter

    files = ImageFiles(image_paths(prepared), attrs["image_size"], "pil", grid=attrs["grid"])
    text_array = text.cpu().numpy()

    def write(assembly: Assembly) -> None:
        shapes = assembly.shapes["scores"]
        rows = {src: shapes[src][0] for src in SOURCES}
        tiles = "tiles" in assembly.shapes
        with ScoresWriter(
            final, rows, shapes["trainval"][1], attrs, tiles=tiles, force=force
        ) as out:
            for source, arrays in assembly.blocks():
                out.append(source, arrays["scores"], arrays.get("tiles"))
            out.finish(assembly.bad_rows, text_array)

    per_batch = 1024 if step.cuda else 64  # views (image and tiles) per model call
    return ChunkedPass(
        final,
        {k: attrs[k] for k in _RESUME_KEYS},
        files,
        step,
        "float32",
        "the scorer gave NaN or infinite scores",
        write,
        batch_size=max(1, per_batch // files.views),
        attrs=attrs,
        done="scored",
    )
