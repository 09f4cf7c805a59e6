"""``spl predict``: apply a fine-tuned checkpoint, or a linear head on its backbone, to images."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spl.data.common import SplError
from spl.runs import LinearRun, load_torch, read_config, read_csv


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    transform: object
    device: torch.device
    source: str


def load_predictor(
    path: Path, *, loss: str | None = None, head: str | None = None, device: str = "auto"
) -> Predictor:
    from spl.data.runtime import resolve_device
    from spl.extract.backbones import get_backbone
    from spl.fit.finetune import Classifier

    path = Path(path)
    chosen = resolve_device(device)
    if path.is_dir():
        config = read_config(path)
        if config.get("kind") == "finetune":
            return load_predictor(_selected_checkpoint(path), device=device)
        if config.get("kind") != "linear":
            raise SplError(f"{path}: not a fit-linear or finetune run directory")
        return _linear_predictor(path, config, loss, head, chosen)
    checkpoint = load_torch(path, "fine-tune checkpoint")
    if "meta" not in checkpoint or "model" not in checkpoint:
        raise SplError(f"{path} is not an spl fine-tune checkpoint (best.pt)")
    meta = checkpoint["meta"]
    backbone, _ = get_backbone(meta["backbone"], meta["weights"], meta.get("weights_path"))
    classifier = Classifier(backbone, meta["feature_dim"], len(meta["classes"]))
    state = {
        k.removeprefix("classifier."): v
        for k, v in checkpoint["model"].items()
        if k.startswith("classifier.")
    }
    classifier.load_state_dict(state)
    return Predictor(
        classifier.to(chosen).eval(), list(meta["classes"]),
        _transform(meta["image_size"], meta["mean"], meta["std"]), chosen, str(path),
    )  # fmt: skip


def _selected_checkpoint(run: Path) -> Path:
    from spl.evaluate.selection import select_best

    if not (run / "results.csv").exists():
        raise SplError(f"{run} has not finished: give a configuration's best.pt instead")
    rows = read_csv(run / "results.csv")
    pick = next(iter(select_best(rows).values()))["picked"][0]
    return run / pick["config"] / "best.pt"


def _linear_predictor(run: Path, config: dict, loss, head, device) -> Predictor:
    from spl.extract.backbones import get_backbone
    from spl.fit.finetune import Classifier

    attrs = config["feature_attrs"]
    if attrs.get("backbone") in (None, "imported"):
        raise SplError(
            f"{run} was trained on imported features: there is no backbone to apply to images"
        )
    linear = LinearRun(run)
    chosen = linear.head(head) if head is not None else linear.select(loss, _first_seed(linear))
    source = attrs.get("weights_source") or ""
    if Path(source).is_file():  # features made from a local weights file
        backbone, spec = get_backbone(attrs["backbone"], attrs["weights"], weights_path=source)
    else:
        backbone, spec = get_backbone(attrs["backbone"], attrs["weights"])
    classes = list(linear.heads_file()["classes"])
    classifier = Classifier(backbone, spec.feature_dim, len(classes))
    with torch.no_grad():
        classifier.head.weight.copy_(chosen.weight)
        classifier.head.bias.copy_(chosen.bias)
    return Predictor(
        classifier.to(device).eval(), classes,
        _transform(int(attrs["image_size"]), spec.mean, spec.std), device, f"{run}:{chosen.name}",
    )  # fmt: skip


def _first_seed(linear: LinearRun) -> int:
    """The selected head of a run with several seeds is the lowest seed's."""
    return min(int(r["seed"]) for r in linear.results)


def _transform(size: int, mean, std):
    from spl.data.images import build_transform

    return build_transform(int(size), train=False, mean=tuple(mean), std=tuple(std))


@torch.no_grad()
def predict_images(predictor: Predictor, paths: list[Path], batch_size: int = 32) -> torch.Tensor:
    """Probabilities ``[len(paths), L]``; an unreadable image stops with its path."""
    from spl.data.images import load_rgb

    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([predictor.transform(load_rgb(Path(p))) for p in chunk])
        logits = predictor.model(images.to(predictor.device))
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out)


def format_predictions(
    paths: list[Path],
    probabilities: torch.Tensor,
    classes: list[str],
    top_k: int | None,
    threshold: float | None,
    fmt: str,
) -> str:
    """Per image, classes by decreasing probability (the top k, at least ``threshold``)."""
    records = []
    for path, probs in zip(paths, probabilities, strict=True):
        order = torch.argsort(probs, descending=True).tolist()
        if top_k:
            order = order[:top_k]
        picked = [
            {"class": classes[i], "probability": round(float(probs[i]), 6)}
            for i in order
            if threshold is None or float(probs[i]) >= threshold
        ]
        records.append({"image": str(path), "predictions": picked})
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "rank", "class", "probability"])
    for record in records:
        for rank, item in enumerate(record["predictions"], 1):
            writer.writerow([record["image"], rank, item["class"], item["probability"]])
    return buffer.getvalue()
