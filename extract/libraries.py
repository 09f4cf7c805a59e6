"""Backbones from optional libraries: ``openclip:ARCH`` (open_clip) and ``timm:NAME`` (timm).

Both are registry entries like torchvision's (:mod:`spl.extract.backbones`), made on demand
from the name, because each library has hundreds of models:

- ``openclip:ARCH`` (extra ``spl[vlm]``): the image tower of an open_clip model, its
  projected embedding (``model.visual(x)``, what ``encode_image`` returns before
  normalisation). Weights ids are open_clip's pretrained tags for ARCH (``openai``,
  ``laion2b_s34b_b88k``, ...; downloaded by open_clip into its cache), ``random``, or a local
  file. :func:`openclip_model` gives the whole model (both towers) to the scorer of
  ``spl pseudo-labels``.
- ``timm:NAME`` (extra ``spl[timm]``): any timm model, its pooled pre-logits feature
  (``forward_head(forward_features(x), pre_logits=True)``: the classifier is reset to
  identity). Weights ids are timm's pretrained tags of the architecture (``timm:resnet50``
  takes ``a1_in1k``, ...; ``timm:resnet50.a1_in1k`` names the tag in the name), ``random``,
  or a local file.

Normalisation comes from the library: open_clip's preprocessing config of the model and tag
(CLIP's mean/std for OpenAI and most LAION weights), timm's pretrained config of the tag.
A local file carries no tag: ``TAG=PATH`` (``--weights openai=PATH``) says which tag it
holds, so that its normalisation, activation (QuickGELU for OpenAI's weights) and name are
the tag's; a plain ``PATH`` is named ``file-<sha256[:12]>`` and uses the architecture's
defaults. Tags whose files the libraries fetch are downloaded on first use; offline that
fails with a message naming the file to fetch elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from spl.data.common import SplError, sha256_file

OPENCLIP = "openclip"
TIMM = "timm"
# prefix -> (the extra that installs it, the module, what it is)
PREFIXES = {
    OPENCLIP: ("vlm", "open_clip", "open_clip_torch"),
    TIMM: ("timm", "timm", "timm"),
}


def split_name(name: str) -> tuple[str, str] | None:
    """``openclip:ViT-B-16`` -> ``("openclip", "ViT-B-16")``; None for other names."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise SplError(f"backbone {name!r} names no model: e.g. {prefix}:{_example(prefix)}")
        return prefix, rest
    return None


def _example(prefix: str) -> str:
    return {OPENCLIP: "ViT-B-16", TIMM: "resnet50"}[prefix]


def import_library(prefix: str):
    """The library behind ``prefix``, or a SplError naming the extra that installs it."""
    extra, module, package = PREFIXES[prefix]
    try:
        return __import__(module)
    except ImportError as exc:
        raise SplError(
            f"{prefix}: backbones need the optional extra: pip install 'spl[{extra}]' "
            f"(the package {package})"
        ) from exc


def tag_name(name: str) -> str:
    """The part of a feature or scores tag that names a prefixed backbone:
    ``openclip:ViT-B-16`` -> ``openclip-ViT-B-16``, ``timm:resnet50.a1_in1k`` -> ``timm-resnet50``
    (the timm tag is the weights id)."""
    prefix, rest = split_name(name)
    if prefix == TIMM:
        rest = rest.partition(".")[0]
    return f"{prefix}-{rest}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The libraries log a warning for every random init and chat on stdout; keep it out of
    the command's output (errors still raise)."""
    loggers = [logging.getLogger(), logging.getLogger("timm"), logging.getLogger("open_clip")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _brief(exc: Exception, limit: int = 400) -> str:
    """An exception's text on one line, cut short (a state-dict mismatch lists every key)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# --- open_clip ---------------------------------------------------------------------------


def openclip_entry(name: str):
    from spl.extract.backbones import _Entry

    open_clip = import_library(OPENCLIP)
    arch = split_name(name)[1]
    if arch not in open_clip.list_models():
        raise SplError(
            f"open_clip has no architecture {arch!r} (e.g. ViT-B-16, ViT-B-32, ViT-L-14-336, "
            "RN50; `python -c 'import open_clip; print(open_clip.list_models())'` lists them)"
        )
    tags = tuple(open_clip.list_pretrained_tags_by_model(arch))
    default = "openai" if "openai" in tags else (tags[0] if tags else "")
    return _Entry(
        name=f"{OPENCLIP}:{arch}",
        default_weights=default,
        weights=tags,
        build=lambda weights, path, digest, image_size=None: _openclip_backbone(
            arch, weights, path, digest, image_size
        ),
        checksums=dict,  # the libraries fetch several file formats per tag: no one checksum
        note="open_clip image tower, projected embedding (extra: spl[vlm])",
    )


def openclip_model(
    arch: str, weights: str, path: Path | None, digest: str | None, image_size: int | None = None
):
    """The whole open_clip model (both towers, eval mode) and its :class:`BackboneSpec`
    (feature_dim: the joint embedding's; mean/std: the model's preprocessing config)."""
    from spl.extract.backbones import RANDOM, RANDOM_SEED, BackboneSpec, _seeded

    open_clip = import_library(OPENCLIP)
    config = open_clip.get_model_config(arch)
    native = config["vision_cfg"].get("image_size", 224)
    native = native if isinstance(native, int) else native[0]
    kwargs: dict = {}
    if image_size is not None and int(image_size) != native:
        kwargs["force_image_size"] = int(image_size)
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, weights) if weights != RANDOM else {}
    if tag_cfg.get("quick_gelu"):
        # The tag's own activation, also when its file comes from --weights TAG=PATH (open_clip
        # warns and keeps the architecture's GELU otherwise: other features).
        kwargs["force_quick_gelu"] = True
    if weights == RANDOM:
        source = f"open_clip {arch}, random init (seed {RANDOM_SEED})"
    elif path is None:
        path, digest = _openclip_download(open_clip, arch, weights, tag_cfg)
        source = f"open_clip {arch} {weights} ({path})"
    else:
        source = str(path)
    try:
        with _quiet():
            model = _seeded(
                lambda: open_clip.create_model(
                    arch, pretrained=str(path) if path is not None else None, **kwargs
                )
            )
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as exc:
        raise SplError(
            f"cannot build open_clip {arch} with {source}: {_brief(exc)}"
            + (
                ". TorchScript files (OpenAI's .pt) are not read: use the tag's safetensors "
                "file from Hugging Face"
                if "TorchScript" in str(exc)
                else ""
            )
        ) from exc
    if tag_cfg.get("quick_gelu"):
        source += " (QuickGELU)"
    mean, std = _openclip_normalisation(open_clip, model, tag_cfg)
    dim = int(config["embed_dim"])
    spec = BackboneSpec(f"{OPENCLIP}:{arch}", weights, dim, mean, std, digest, source)
    return model.eval(), spec


def _openclip_normalisation(open_clip, model, tag_cfg: dict):
    """The tag's mean/std; else the model's preprocessing config (open_clip >= 2.24), its
    legacy attributes, or CLIP's (OpenAI's) constants."""
    getter = getattr(open_clip, "get_model_preprocess_cfg", None)
    config = dict(getter(model)) if getter is not None else {}
    pairs = []
    for key, legacy, constant in (
        ("mean", "image_mean", open_clip.OPENAI_DATASET_MEAN),
        ("std", "image_std", open_clip.OPENAI_DATASET_STD),
    ):
        value = tag_cfg.get(key) or config.get(key) or getattr(model.visual, legacy, None)
        pairs.append(tuple(float(v) for v in (value or constant)))
    return pairs[0], pairs[1]


def _openclip_backbone(arch, weights, path, digest, image_size):
    model, spec = openclip_model(arch, weights, path, digest, image_size)
    return model.visual, spec


def _openclip_download(open_clip, arch: str, weights: str, tag_cfg: dict) -> tuple[Path, str]:
    """open_clip's own download of a pretrained tag (into its cache); (file, SHA-256)."""
    where = _openclip_where(tag_cfg)
    try:
        with _quiet():
            target = open_clip.pretrained.download_pretrained(tag_cfg)
    except Exception as exc:  # network and hub errors come in many types
        raise SplError(
            f"cannot get open_clip weights {arch} {weights} ({exc}). On a machine without "
            f"internet, download {where} elsewhere and pass --weights {weights}=PATH (keeps the "
            f"tag's name, normalisation and activation) or --weights PATH"
        ) from exc
    if not target:
        raise SplError(f"open_clip knows no file for {arch} {weights}; pass --weights PATH")
    return Path(target), sha256_file(target)


def _openclip_where(tag_cfg: dict) -> str:
    hub = tag_cfg.get("hf_hub", "")
    if hub:  # 'org/repo/' (the default file names) or 'org/repo/file'
        model_id, _, filename = hub.rpartition("/")
        files = filename or "open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
        return f"{files} from https://huggingface.co/{model_id}"
    return tag_cfg.get("url") or "its weights file"


# --- timm --------------------------------------------------------------------------------


def timm_entry(name: str):
    from spl.extract.backbones import _Entry

    timm = import_library(TIMM)
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(split_name(name)[1])
    if not timm.is_model(arch):
        raise SplError(
            f"timm has no model {arch!r} (`python -c 'import timm; print(timm.list_models(\"res*\"))'`"
            " lists them)"
        )
    tags = tuple(n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*"))
    if tag and tag not in tags:
        raise SplError(f"timm model {arch} has no pretrained tag {tag!r}; known: {', '.join(tags)}")
    default = tag or (getattr(get_pretrained_cfg(arch), "tag", None) or (tags[0] if tags else ""))
    return _Entry(
        name=f"{TIMM}:{arch}",
        default_weights=default,
        weights=(tag,) if tag else tags,
        build=lambda weights, path, digest, image_size=None: _timm_backbone(
            arch, weights, path, digest, image_size
        ),
        checksums=dict,
        note="timm, pooled pre-logits feature (extra: spl[timm])",
    )


def _timm_backbone(arch, weights, path, digest, image_size):
    from spl.extract.backbones import RANDOM, RANDOM_SEED, BackboneSpec, _seeded

    timm = import_library(TIMM)
    from timm.models import get_pretrained_cfg

    known = weights != RANDOM and weights in {
        n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")
    }
    full_name = f"{arch}.{weights}" if known else arch
    cfg = get_pretrained_cfg(full_name)
    kwargs: dict = {}
    if image_size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = int(image_size)  # ViTs and the like are built for one size
    if weights == RANDOM:
        source = f"timm {arch}, random init (seed {RANDOM_SEED})"
        with _quiet():
            model = _seeded(lambda: _timm_create(timm, arch, pretrained=False, **kwargs))
    else:
        if path is None:
            path, digest = _timm_download(full_name, cfg, weights)
            source = f"timm {full_name} ({path})"
        else:
            source = str(path)
        # With the checkpoint's own classifier the load is strict: a file of another model
        # is an error, not a silently partial load. The classifier is dropped below.
        overlay = {"file": str(path)}
        try:
            with _quiet():
                model = _seeded(
                    lambda: _timm_create(
                        timm, full_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
                    )
                )
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as exc:
            raise SplError(f"{source} does not fit timm {full_name}: {_brief(exc)}") from exc
    model.reset_classifier(0)
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    from spl.data.images import IMAGENET_MEAN, IMAGENET_STD

    mean = tuple(float(v) for v in pretrained.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pretrained.get("std", IMAGENET_STD))
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model, BackboneSpec(f"{TIMM}:{arch}", weights, dim, mean, std, digest, source)


def _timm_create(timm, name: str, **kwargs):
    """``timm.create_model``; a model that takes no ``img_size`` is built at its own size."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        if "img_size" not in kwargs or "img_size" not in str(exc):
            raise
        kwargs.pop("img_size")
        return timm.create_model(name, **kwargs)


def _timm_download(full_name: str, cfg, weights: str) -> tuple[Path, str]:
    """The file timm would fetch for a tag (Hugging Face hub, else its URL); (file, SHA-256)."""
    hub = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    where = f"model.safetensors from https://huggingface.co/{hub}" if hub else (url or "its file")
    try:
        if hub:
            from huggingface_hub import hf_hub_download

            repo, _, revision = hub.partition("@")
            error: Exception | None = None
            for filename in ("model.safetensors", "pytorch_model.bin"):
                try:
                    target = hf_hub_download(repo, filename, revision=revision or None)
                    break
                except Exception as exc:  # the next name, then the error
                    error = exc
            else:
                raise error
        elif url:
            from timm.models._hub import download_cached_file

            target = download_cached_file(url, check_hash=True, progress=True)
        else:
            raise SplError(f"timm knows no file for {full_name}")
    except SplError:
        raise
    except Exception as exc:  # network and hub errors come in many types
        raise SplError(
            f"cannot get timm weights {full_name} ({exc}). On a machine without internet, "
            f"download {where} elsewhere and pass --weights {weights}=PATH (keeps the tag's "
            "name and normalisation) or --weights PATH"
        ) from exc
    return Path(target), sha256_file(target)


def describe() -> list[dict[str, str]]:
    """Rows for ``spl extract --list-backbones``: the prefixes."""
    return [
        {
            "name": "openclip:ARCH",
            "default_weights": "openai",
            "weights": "open_clip's tags of ARCH, random",
            "note": "open_clip image tower, projected embedding; e.g. openclip:ViT-B-16 "
            "(extra: spl[vlm])",
        },
        {
            "name": "timm:NAME",
            "default_weights": "timm's default tag",
            "weights": "timm's tags of NAME, random",
            "note": "any timm model, pooled pre-logits; e.g. timm:resnet50 (extra: spl[timm])",
        },
    ]


def module_version(prefix: str) -> str:
    try:
        return str(import_library(prefix).__version__)
    except SplError:
        return ""
