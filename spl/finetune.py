"""``spl finetune``: end-to-end training over the paper's grid, with LinearInit, checkpoints,
resume and torchrun (DDP). A grid orchestrator of the same shape as ``spl.linear``: it
resolves what the run trains on (:func:`spl.training.training_inputs`), builds the image
splits, creates or resumes the run (:func:`spl.training.open_run`), runs one
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
from dataclasses import dataclass
from pathlib import Path

from spl.data.common import SplError
from spl.data.loaders import ImageSplits
from spl.data.prepared import PreparedDataset, load_prepared
from spl.data.runtime import Processes
from spl.evaluate import paper, report
from spl.extract.backbones import (
    BackboneSpec,
    backbone_tag,
    build_resolved,
    get_backbone,
    resolve_weights,
)
from spl.extract.features import unreadable_rows
from spl.fit.finetune import Classifier, FineTuner
from spl.fit.losses import LOSSES, Loss
from spl.fit.recipes import Recipe, source_recipe
from spl.runs import LinearHead, LinearRun, Run, read_jsonl
from spl.settings import FinetuneSettings
from spl.training import TrainingInputs, open_run, training_inputs, write_pseudo_labels

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


def resolved_settings(settings: FinetuneSettings, dataset: str) -> FinetuneSettings:
    """The settings a fine-tune runs with and records: with ``--recipe source``, the
    release's lr, batch size and epochs for ``dataset``; ``--weights PATH`` (a local state
    dict) as the resolved ``weights_path``. Resolving recorded settings gives them back
    unchanged, so that ``spl reproduce`` recognises an interrupted run of its job."""
    changes: dict = {}
    if settings.recipe == "source":
        recipe = source_recipe(settings.loss, dataset)
        changes.update(lrs=[recipe.lr], batch_sizes=[recipe.batch_size], epochs=recipe.epochs)
    if settings.weights is not None and Path(settings.weights).is_file():
        changes.update(weights=None, weights_path=str(Path(settings.weights).resolve()))
    return dataclasses.replace(settings, **changes)


def run_finetune(
    dataset_dir: Path,
    settings: FinetuneSettings,
    out_root: Path,
    *,
    resume: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run_file: Path | None = None,
) -> Path:
    """Train every (lr, batch size, seed) of the grid end to end; returns the run directory
    (also written to ``run_file``, as soon as the run exists)."""
    if settings.loss is None:
        raise SplError("give --loss (see `spl losses`)")
    procs = Processes.start(settings.device)
    try:
        grid = _prepare(dataset_dir, settings, out_root, resume, run_file, procs)
        results = [_train_config(grid, *config, progress, log) for config in grid.configs()]
        _write_results(grid, results)
        grid.run.complete()
        procs.all_ok(True)
        return grid.run.path
    finally:
        procs.close()


@dataclass
class FinetuneGrid:
    """One fine-tune run: what every configuration of its grid trains with."""

    run: Run
    inputs: TrainingInputs
    data: ImageSplits
    spec: BackboneSpec
    tag: str
    recipe: Recipe | None
    inits: dict[int, LinearHead | None]  # per seed, the LinearInit head (--init-from)
    pseudo_summary: str  # the summary.md section on the pseudo-labels

    @property
    def settings(self) -> FinetuneSettings:
        return self.inputs.settings

    @property
    def loss(self) -> Loss:
        return self.inputs.losses[self.settings.loss]

    def configs(self):
        """(lr, batch size, seed, LinearInit head) of each configuration, in the grid's order."""
        for seed in self.settings.seeds:
            for bs in self.settings.batch_sizes:
                for lr in self.settings.lrs:
                    yield lr, bs, seed, self.inits[seed]


def _prepare(dataset_dir, settings, out_root, resume, run_file, procs) -> FinetuneGrid:
    """Resolve and check what the run trains on, build the image splits, and create or
    resume the run."""
    prepared = load_prepared(dataset_dir)
    settings = resolved_settings(settings, prepared.name)
    recipe = source_recipe(settings.loss, prepared.name) if settings.recipe == "source" else None
    weights = resolve_weights(
        settings.backbone, settings.weights, settings.weights_path, True, None
    )
    tag = backbone_tag(settings.backbone, weights[1], settings.image_size)
    inputs = training_inputs(
        prepared, settings, [settings.loss], unreadable_rows(prepared, tag), processes=procs.world
    )
    _, spec = build_resolved(weights)
    data = ImageSplits(
        prepared, image_size=settings.image_size, mean=spec.mean, std=spec.std,
        observed=inputs.observed_sets[inputs.losses[settings.loss].trains_on],
        excluded=inputs.excluded, procs=procs, workers=settings.workers,
        cache_images=settings.cache_images,
    )  # fmt: skip
    inputs = inputs.with_excluded(data.excluded)  # the image cache may have found more
    inits = {
        seed: None
        if settings.init_from is None
        else load_linear_init(Path(settings.init_from), prepared, settings.loss, tag, seed)
        for seed in settings.seeds
    }
    record = inputs.record(
        {"backbone_tag": tag, "backbone": dataclasses.asdict(spec)},
        runtime={"processes": procs.world, "device": str(procs.device)},
        extra={"recipe": None if recipe is None else dataclasses.asdict(recipe)},
    )
    parent = Path(out_root) / prepared.name / tag
    run = open_run(
        inputs, parent, "finetune", record, resume=resume, run_file=run_file, procs=procs
    )
    pseudo_summary = write_pseudo_labels(run, inputs)
    return FinetuneGrid(run, inputs, data, spec, tag, recipe, inits, pseudo_summary)


def _write_results(grid: FinetuneGrid, results: list[dict]) -> None:
    settings, prepared = grid.settings, grid.inputs.prepared
    grid.run.write_csv("results.csv", results, RESULT_COLUMNS)
    differences = paper.protocol_differences(
        "finetune", tag=grid.tag, lrs=settings.lrs, batch_sizes=settings.batch_sizes,
        epochs=settings.epochs, observed=settings.observed, val=settings.val,
    )  # fmt: skip
    key = f"{settings.loss}+linearinit" if settings.init_from else settings.loss
    grid.run.write_text(
        "summary.md",
        report.finetune_summary(
            prepared.name, grid.tag, key, results, LOSSES, differences,
            protocol=report.protocol_text(settings.observed, settings.val),
        ) + grid.pseudo_summary,
    )  # fmt: skip


def _train_config(
    grid: FinetuneGrid, lr: float, bs: int, seed: int, init: LinearHead | None, progress: bool,
    log: Callable[[str], None],
) -> dict:  # fmt: skip
    """One configuration, trained (or resumed) to its result row."""
    name = config_name(lr, bs, seed)
    folder = grid.run.path / name
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())  # computed before an interruption
    run = Run(folder, grid.run.config, writes=grid.run.writes)
    if run.writes:
        folder.mkdir(parents=True, exist_ok=True)
    checkpoint = run.load("last.pt", "fine-tune checkpoint")
    best = run.load("best.pt", "fine-tune checkpoint") if checkpoint is not None else None
    if checkpoint is not None:
        log(f"{name}: resuming after epoch {checkpoint['state']['epoch']}")
    settings, procs = grid.settings, grid.data.procs
    recorder = _EpochRecorder(
        run, name, _meta(grid, lr, bs, seed, init), bs, init, settings.epochs, procs,
        progress and run.writes, log,
    )  # fmt: skip
    cuda = procs.device.type == "cuda"
    tuner = FineTuner(
        grid.loss, lr=lr, batch_size=bs, epochs=settings.epochs, seed=seed,
        amp=settings.amp and cuda, channels_last=settings.channels_last and cuda,
        freeze_batchnorm=settings.batchnorm == "frozen", sync_batchnorm=settings.sync_bn,
        recipe=grid.recipe,
    )  # fmt: skip
    if checkpoint is None and init is None:
        recorder.open_bar(1)  # a LinearInit run opens it after its epoch 0
    prepared = grid.inputs.prepared

    def make_classifier() -> Classifier:
        backbone, _ = get_backbone(settings.backbone, settings.weights, settings.weights_path)
        return Classifier(backbone, grid.spec.feature_dim, prepared.num_classes)

    tuner.fit(
        make_classifier,
        grid.data,
        val_labels=grid.inputs.selection_labels,
        head=None if init is None else (init.weight, init.bias),
        initial_state=None if init is None else init.state_for_rows(grid.inputs.rows["train"]),
        checkpoint=checkpoint,
        best=best,
        on_epoch=recorder.on_epoch,
        on_step=recorder.on_step,
    )
    recorder.close_bar()
    result = _result(grid, tuner, name, lr, bs, seed, init, read_jsonl(folder / "history.jsonl"))
    run.write_json("result.json", result)
    run.remove("last.pt")  # best.pt is the model to keep
    procs.all_ok(True)
    return result


class _EpochRecorder:
    """What a configuration writes as it trains: per epoch the checkpoints (best.pt,
    last.pt) and the history row with its throughput; and the progress bar of each epoch."""

    def __init__(
        self, run: Run, name: str, meta: dict, batch_size: int, init: LinearHead | None,
        epochs: int, procs: Processes, progress: bool, log: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.run, self.name, self.meta, self.batch_size = run, name, meta, batch_size
        self.init, self.epochs, self.procs = init, epochs, procs
        self.progress, self.log = progress, log
        self.timing = {"wait": 0.0, "step": 0.0, "images": 0}
        self.bar = None

    def open_bar(self, epoch: int) -> None:
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(desc=f"{self.name} epoch {epoch}", unit="step", leave=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_step(self, step: int, waited: float, seconds: float) -> None:
        self.timing["wait"] += waited
        self.timing["step"] += seconds
        self.timing["images"] += self.batch_size
        if self.bar is not None:
            self.bar.update()

    def on_epoch(self, tuner: FineTuner, record: dict) -> None:
        self.close_bar()
        if record["epoch"] == 0:  # the LinearInit head on the pretrained backbone
            self.run.append_history([{"config": self.name, "epoch": 0, "val_map": record["val_map"],
                                      "linear_val_map": self.init.val_map}])  # fmt: skip
        else:
            self._checkpoint(tuner, record)
        self.timing.update(wait=0.0, step=0.0, images=0)
        self.procs.all_ok(True)
        if record["epoch"] < self.epochs:
            self.open_bar(record["epoch"] + 1)

    def _checkpoint(self, tuner: FineTuner, record: dict) -> None:
        saved = {**tuner.checkpoint(), "meta": self.meta}
        if record["improved"]:
            self.run.save("best.pt", saved)
        self.run.save("last.pt", saved)
        timing = self.timing
        busy = timing["wait"] + timing["step"]
        stats = {k: record[k] for k in ("train_loss", "steps")}
        self.run.append_history([{
            "config": self.name, "epoch": record["epoch"], "val_map": record["val_map"], **stats,
            "images_per_second": timing["images"] / busy if busy else None,
            "data_wait_fraction": timing["wait"] / busy if busy else None,
        }])  # fmt: skip
        if self.run.writes:
            self.log(f"{self.name} epoch {record['epoch']}: val mAP {record['val_map']:.2f} "
                     f"(best {tuner.progress_['best_val']:.2f})")  # fmt: skip


def _result(grid: FinetuneGrid, tuner: FineTuner, name: str, lr: float, bs: int, seed: int,
            init: LinearHead | None, history: list[dict]) -> dict:  # fmt: skip
    """A configuration's row of results.csv (and its result.json)."""
    settings = grid.settings
    trained = [h for h in history if h["epoch"] > 0]
    return {
        "config": name, "loss": settings.loss, "lr": lr, "batch_size": bs, "seed": seed,
        "best_epoch": tuner.best_epoch_, "val_map": tuner.best_val_map_, **tuner.scores_,
        "init": f"linear:{init.name}" if init is not None else "imagenet",
        "recipe": settings.recipe, "epochs_trained": tuner.progress_["epoch"],
        "observed": settings.observed, "val": settings.val,
        "images_per_second": _mean([h.get("images_per_second") for h in trained]),
        "data_wait_fraction": _mean([h.get("data_wait_fraction") for h in trained]),
    }  # fmt: skip


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _meta(grid: FinetuneGrid, lr: float, bs: int, seed: int, init: LinearHead | None) -> dict:
    """What `spl predict` and a LinearInit check need to use a checkpoint on its own."""
    settings, spec, prepared = grid.settings, grid.spec, grid.inputs.prepared
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
