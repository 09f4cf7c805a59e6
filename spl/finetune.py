"""``spl finetune``: end-to-end training over the paper's grid, with LinearInit, checkpoints,
resume and torchrun (DDP). A grid orchestrator of the same shape as ``spl.linear``: it
creates or resumes the run, builds the data and the network, runs one
:class:`spl.fit.finetune.FineTuner` per (seed, batch size, lr) and writes what they computed.

Under ``torchrun --nproc_per_node N`` the global batch is the grid's batch size: each of the
N processes takes batch_size / N images per step, DDP averages the gradients, and since
every loss is a mean over the batch's B * L entries, the update equals a single process's
with the whole batch, except for the expected-positive regulariser of EPR and ROLE (a
square of the batch mean, computed per process) and BatchNorm statistics (per process
unless --sync-bn).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from spl.data.common import SplError
from spl.data.loaders import ImageSplits
from spl.data.prepared import PreparedDataset, load_prepared
from spl.data.runtime import Processes
from spl.evaluate import paper, report
from spl.extract.backbones import BackboneSpec, backbone_tag, get_backbone
from spl.extract.features import unreadable_rows
from spl.fit.finetune import Classifier, FineTuner
from spl.fit.losses import LOSSES, WITH_NEGATIVES, Loss
from spl.fit.recipes import Recipe, source_recipe
from spl.linear import (
    check_negatives,
    check_resumed_scores,
    load_training_scores,
    loss_context,
    pseudo_label_rows,
    pseudo_labels_of,
    resolve_losses,
    scores_record,
    training_scores,
    write_pseudo_labels,
)
from spl.runs import LinearHead, LinearRun, Run, read_jsonl
from spl.settings import FinetuneSettings

RESULT_COLUMNS = [
    "config", "loss", "lr", "batch_size", "seed", "best_epoch", "val_map", "test_map",
    "test_map_paper_metric", "estimator_recovery_map", "test_p_at_1", "test_r_at_1",
    "test_p_at_3", "test_r_at_3", "init", "recipe", "epochs_trained", "observed", "val",
    "images_per_second", "data_wait_fraction",
]  # fmt: skip


def config_name(lr: float, batch_size: int, seed: int) -> str:
    return f"lr{lr:g}_bs{batch_size}_s{seed}"


def load_linear_init(
    run: Path, prepared: PreparedDataset, loss: str, tag: str, seed: int
) -> LinearHead:
    """The best head for ``loss`` in a fit-linear run, refused if the run was made for
    another dataset, backbone (weights, image size) or loss."""
    linear = LinearRun(run, option="--init-from")
    config = linear.config
    differences = []
    if config["dataset_fingerprint"] != prepared.fingerprint:
        differences.append(
            f"dataset: the run was trained on {config['dataset_name']!r} "
            f"(fingerprint {config['dataset_fingerprint']}), this is {prepared.name!r} "
            f"({prepared.fingerprint})"
        )
    if linear.feature_tag != tag:
        differences.append(
            f"backbone: the run's features are {linear.feature_tag!r}, this fine-tune "
            f"uses {tag!r} (backbone, weights and image size must match)"
        )
    if loss not in linear.losses:
        differences.append(
            f"loss: the run has no {loss!r} heads (it trained {', '.join(linear.losses)})"
        )
    if differences:
        raise SplError(f"cannot LinearInit from {run}:\n  " + "\n  ".join(differences))
    return linear.select(loss, seed)


def run_finetune(
    dataset_dir: Path,
    settings: FinetuneSettings,
    out_root: Path,
    *,
    resume: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train every (lr, batch size, seed) of the grid end to end; returns the run directory."""
    if settings.loss is None:
        raise SplError("give --loss (see `spl losses`)")
    procs = Processes.start(settings.device)
    try:
        return _run(dataset_dir, settings, out_root, resume, progress, log, procs)
    finally:
        procs.close()


def _run(dataset_dir, settings, out_root, resume, progress, log, procs) -> Path:
    prepared = load_prepared(dataset_dir)
    context = loss_context(prepared, settings)
    recipe = None
    if settings.recipe == "source":
        recipe = source_recipe(settings.loss, prepared.name)
        settings = dataclasses.replace(
            settings, lrs=[recipe.lr], batch_sizes=[recipe.batch_size], epochs=recipe.epochs
        )
    loss = resolve_losses(prepared, settings, [settings.loss], settings.epochs)[settings.loss]
    score_set = load_training_scores(prepared, settings, {settings.loss: loss})
    observed = settings.observed_for(loss.trains_on)
    if loss.trains_on == WITH_NEGATIVES:
        check_negatives(prepared, observed, [settings.loss])
    prepared.observed_set(observed)
    for bs in settings.batch_sizes:
        if bs % procs.world:
            raise SplError(
                f"batch size {bs} is the global batch: it must divide by the {procs.world} "
                "processes of this torchrun job"
            )
    _, spec = get_backbone(settings.backbone, settings.weights, settings.weights_path)
    tag = backbone_tag(settings.backbone, spec.weights, settings.image_size)
    data = ImageSplits(
        prepared, image_size=settings.image_size, mean=spec.mean, std=spec.std,
        observed=observed, excluded=unreadable_rows(prepared, tag), procs=procs,
        workers=settings.workers, cache_images=settings.cache_images,
    )  # fmt: skip
    scores = training_scores(score_set, data.rows["train"])
    if scores is not None:  # the loss computes its pseudo-labels from the training rows' scores
        loss = type(loss)(loss.options, dataclasses.replace(loss.context, scores=scores))
    pseudo = pseudo_labels_of({settings.loss: loss}, scores, data.observed())
    writes = procs.rank == 0
    if resume is None:
        run = Run.create(Path(out_root) / prepared.name / tag, "finetune", {
            "dataset": str(prepared.path.parent.resolve()),
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            "backbone_tag": tag,
            "backbone": dataclasses.asdict(spec),
            "settings": dataclasses.asdict(settings),
            "loss_options": {settings.loss: dataclasses.asdict(loss.options)},
            "recipe": None if recipe is None else dataclasses.asdict(recipe),
            "expected_positives": context.expected_positives,
            "excluded_bad_rows": {
                split: len(prepared.rows(split)[1]) - len(rows) for split, rows in data.rows.items()
            },
            "classes": prepared.classes,
            "processes": procs.world,
            "device": str(procs.device),
            "scores": scores_record(score_set, pseudo),
        }, writes=writes)  # fmt: skip
        run.at(Path(procs.broadcast(str(run.path))))
    else:
        run = Run.resume(resume, "finetune", writes=writes)
        check_resumed_scores(run, scores_record(score_set, pseudo))
    quality = pseudo_label_rows(pseudo, data.observed(), data.labels("train"), prepared.classes)
    pseudo_summary = write_pseudo_labels(run, quality, settings.scores, len(data.rows["train"]))
    results = []
    common = (run, data, settings, loss, prepared, spec)
    for seed in settings.seeds:
        init = None
        if settings.init_from:
            init = load_linear_init(Path(settings.init_from), prepared, settings.loss, tag, seed)
        for bs in settings.batch_sizes:
            for lr in settings.lrs:
                results.append(_train_config(*common, lr, bs, seed, init, progress, log, recipe))
    run.write_csv("results.csv", results, RESULT_COLUMNS)
    differences = paper.protocol_differences(
        "finetune", tag=tag, lrs=settings.lrs, batch_sizes=settings.batch_sizes,
        epochs=settings.epochs, observed=settings.observed, val=settings.val,
    )  # fmt: skip
    key = f"{settings.loss}+linearinit" if settings.init_from else settings.loss
    run.write_text(
        "summary.md",
        report.finetune_summary(
            prepared.name, tag, key, results, LOSSES, differences,
            protocol=report.protocol_text(settings.observed, settings.val),
        ) + pseudo_summary,
    )  # fmt: skip
    run.complete()
    procs.all_ok(True)
    return run.path


def _train_config(
    run: Run, data: ImageSplits, settings: FinetuneSettings, loss: Loss, prepared, spec,
    lr: float, bs: int, seed: int, init: LinearHead | None, progress: bool, log,
    recipe: Recipe | None = None,
) -> dict:  # fmt: skip
    name = config_name(lr, bs, seed)
    folder = run.path / name
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())  # computed before an interruption
    config_run = Run(folder, run.config, writes=run.writes)
    if run.writes:
        folder.mkdir(parents=True, exist_ok=True)
    procs = data.procs
    checkpoint = config_run.load("last.pt", "fine-tune checkpoint")
    best = config_run.load("best.pt", "fine-tune checkpoint") if checkpoint is not None else None
    if checkpoint is not None:
        log(f"{name}: resuming after epoch {checkpoint['state']['epoch']}")
    meta = _meta(settings, spec, prepared, lr, bs, seed, init)
    timing = {"wait": 0.0, "step": 0.0, "images": 0}
    bar = {"bar": None}

    def on_step(step: int, waited: float, seconds: float) -> None:
        timing["wait"] += waited
        timing["step"] += seconds
        timing["images"] += bs
        if bar["bar"] is not None:
            bar["bar"].update()

    def on_epoch(tuner: FineTuner, record: dict) -> None:
        if bar["bar"] is not None:
            bar["bar"].close()
            bar["bar"] = None
        if record["epoch"] == 0:
            config_run.append_history(
                [
                    {
                        "config": name,
                        "epoch": 0,
                        "val_map": record["val_map"],
                        "linear_val_map": init.val_map,
                    }
                ]  # fmt: skip
            )
        else:
            saved = {**tuner.checkpoint(), "meta": meta}
            if record["improved"]:
                config_run.save("best.pt", saved)
            config_run.save("last.pt", saved)
            busy = timing["wait"] + timing["step"]
            stats = {k: record[k] for k in ("train_loss", "steps")}
            config_run.append_history([{
                "config": name, "epoch": record["epoch"], "val_map": record["val_map"], **stats,
                "images_per_second": timing["images"] / busy if busy else None,
                "data_wait_fraction": timing["wait"] / busy if busy else None,
            }])  # fmt: skip
            best_val = tuner.progress_["best_val"]
            if run.writes:
                log(f"{name} epoch {record['epoch']}: val mAP {record['val_map']:.2f} "
                    f"(best {best_val:.2f})")  # fmt: skip
        timing.update(wait=0.0, step=0.0, images=0)
        procs.all_ok(True)
        if progress and run.writes and record["epoch"] < settings.epochs:
            from tqdm import tqdm

            bar["bar"] = tqdm(desc=f"{name} epoch {record['epoch'] + 1}", unit="step", leave=False)

    def make_classifier() -> Classifier:
        backbone, _ = get_backbone(settings.backbone, settings.weights, settings.weights_path)
        return Classifier(backbone, spec.feature_dim, prepared.num_classes)

    cuda = procs.device.type == "cuda"
    tuner = FineTuner(
        loss, lr=lr, batch_size=bs, epochs=settings.epochs, seed=seed,
        amp=settings.amp and cuda, channels_last=settings.channels_last and cuda,
        freeze_batchnorm=settings.batchnorm == "frozen", sync_batchnorm=settings.sync_bn,
        recipe=recipe,
    )  # fmt: skip
    if progress and run.writes and checkpoint is None and init is None:
        from tqdm import tqdm

        bar["bar"] = tqdm(desc=f"{name} epoch 1", unit="step", leave=False)
    tuner.fit(
        make_classifier,
        data,
        val_labels=settings.selection_labels(prepared, data.rows["val"]),
        head=None if init is None else (init.weight, init.bias),
        initial_state=None if init is None else init.state_for_rows(data.rows["train"]),
        checkpoint=checkpoint,
        best=best,
        on_epoch=on_epoch,
        on_step=on_step,
    )
    if bar["bar"] is not None:
        bar["bar"].close()
    history = [h for h in read_jsonl(folder / "history.jsonl") if h["epoch"] > 0]
    result = {
        "config": name, "loss": settings.loss, "lr": lr, "batch_size": bs, "seed": seed,
        "best_epoch": tuner.best_epoch_, "val_map": tuner.best_val_map_, **tuner.scores_,
        "init": f"linear:{init.name}" if init is not None else "imagenet",
        "recipe": settings.recipe, "epochs_trained": tuner.progress_["epoch"],
        "observed": settings.observed, "val": settings.val,
        "images_per_second": _mean([h.get("images_per_second") for h in history]),
        "data_wait_fraction": _mean([h.get("data_wait_fraction") for h in history]),
    }  # fmt: skip
    config_run.write_json("result.json", result)
    config_run.remove("last.pt")  # best.pt is the model to keep
    procs.all_ok(True)
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _meta(settings, spec: BackboneSpec, prepared, lr, bs, seed, init) -> dict:
    """What `spl predict` and a LinearInit check need to use a checkpoint on its own."""
    return {
        "backbone": settings.backbone,
        "weights": spec.weights,
        "weights_path": settings.weights_path,
        "image_size": settings.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "feature_dim": spec.feature_dim,
        "classes": list(prepared.classes),
        "dataset_name": prepared.name,
        "dataset_fingerprint": prepared.fingerprint,
        "loss": settings.loss,
        "lr": lr,
        "batch_size": bs,
        "seed": seed,
        "init": None if init is None else str(init.run),
    }
