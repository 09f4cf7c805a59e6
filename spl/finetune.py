"""``spl finetune``: end-to-end training over the paper's grid, with LinearInit, checkpoints,
resume and torchrun (DDP).

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
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spl.data.common import SplError, write_json_atomic
from spl.data.prepared import PreparedDataset, load_prepared
from spl.evaluate import paper
from spl.evaluate.metrics import average_precision, mean_average_precision, precision_recall_at_k
from spl.evaluate.selection import format_mean_std, select_best
from spl.extract.backbones import DEFAULT_BACKBONE, BackboneSpec, backbone_tag, get_backbone
from spl.fit.engine import PAPER_BATCH_SIZES, PAPER_LRS
from spl.fit.finetune import (
    Classifier,
    LabelEstimator,
    Trainable,
    TrainSettings,
    check_loss,
    gather_by_index,
    make_optimizer,
    predict,
    train_epoch,
)
from spl.fit.losses import LOSSES, estimator_from_probabilities, estimator_init
from spl.runs import (
    append_jsonl,
    command_line,
    load_torch,
    mark_complete,
    new_run_dir,
    now,
    read_config,
    save_torch,
    write_config,
    write_csv,
)
from spl.settings import LossSettings

PAPER_FINETUNE_EPOCHS = 10
RESULT_COLUMNS = [
    "config", "loss", "lr", "batch_size", "seed", "best_epoch", "val_map", "test_map",
    "estimator_recovery_map", "test_p_at_1", "test_r_at_1", "test_p_at_3", "test_r_at_3",
    "init", "images_per_second", "data_wait_fraction",
]  # fmt: skip


@dataclass
class FinetuneSettings(LossSettings):
    """One fine-tuning sweep; defaults are the paper's protocol."""

    loss: str = "an"
    lrs: list[float] = field(default_factory=lambda: list(PAPER_LRS))
    batch_sizes: list[int] = field(default_factory=lambda: list(PAPER_BATCH_SIZES))
    epochs: int = PAPER_FINETUNE_EPOCHS
    seeds: list[int] = field(default_factory=lambda: [0])
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    weights_path: str | None = None
    image_size: int = 448
    init_from: str | None = None
    workers: int | None = None
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    cache_images: bool = False
    sync_bn: bool = False
    batchnorm: str = "train"  # the paper's; "frozen" keeps the pretrained statistics


def config_name(lr: float, batch_size: int, seed: int) -> str:
    return f"lr{lr:g}_bs{batch_size}_s{seed}"


def bad_rows(prepared: PreparedDataset) -> dict[str, np.ndarray]:
    """Rows that extraction recorded as unreadable images (``--skip-bad``), in any feature
    file of the dataset: fine-tuning leaves them out of every split."""
    import h5py

    out = {"trainval": set(), "test": set()}
    for path in sorted((prepared.path.parent / "features").glob("*.h5")):
        try:
            with h5py.File(path, "r") as h5:
                for source in out:
                    if f"bad/{source}" in h5:
                        out[source].update(int(r) for r in h5[f"bad/{source}"][()])
        except OSError:
            continue
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


# --------------------------------------------------------------------------- LinearInit


@dataclass
class LinearInit:
    """The head (and ROLE estimates) a LinearInit fine-tune starts from."""

    run: Path
    head: str
    weight: torch.Tensor
    bias: torch.Tensor
    val_map: float
    estimates: torch.Tensor | None  # [N_train, L] probabilities for `train_rows`
    train_rows: np.ndarray


def load_linear_init(
    run: Path, prepared: PreparedDataset, loss: str, tag: str, seed: int
) -> LinearInit:
    """The best head for ``loss`` in a fit-linear run, refused if the run was made for
    another dataset, backbone (weights, image size) or loss."""
    from spl.runs import read_csv

    run = Path(run)
    config = read_config(run)
    if config.get("kind") != "linear":
        raise SplError(f"--init-from {run} is not a fit-linear run directory")
    if not (run / "results.csv").exists() or (run / "INCOMPLETE").exists():
        raise SplError(f"--init-from {run} has not finished; resume it first")
    differences = []
    if config["dataset_fingerprint"] != prepared.fingerprint:
        differences.append(
            f"dataset: the run was trained on {config['dataset_name']!r} "
            f"(fingerprint {config['dataset_fingerprint']}), this is {prepared.name!r} "
            f"({prepared.fingerprint})"
        )
    if config["feature_tag"] != tag:
        differences.append(
            f"backbone: the run's features are {config['feature_tag']!r}, this fine-tune "
            f"uses {tag!r} (backbone, weights and image size must match)"
        )
    rows = [r for r in read_csv(run / "results.csv") if r["loss"] == loss]
    if not rows:
        trained = sorted({r["loss"] for r in read_csv(run / "results.csv")})
        differences.append(f"loss: the run has no {loss!r} heads (it trained {', '.join(trained)})")
    if differences:
        raise SplError(f"cannot LinearInit from {run}:\n  " + "\n  ".join(differences))
    same_seed = [r for r in rows if int(r["seed"]) == seed] or rows
    best = max(same_seed, key=lambda r: float(r["val_map"]))
    heads = load_torch(run / "heads.pt", "fit-linear heads file")
    names = [f"{h['loss']}_lr{h['lr']:g}_bs{h['batch_size']}_s{h['seed']}" for h in heads["heads"]]
    index = names.index(best["head"])
    estimates = heads["estimates"].get(best["head"]) if loss == "role" else None
    return LinearInit(
        run=run,
        head=best["head"],
        weight=heads["weight"][index],
        bias=heads["bias"][index],
        val_map=float(best["val_map"]),
        estimates=estimates,
        train_rows=heads["train_rows"].numpy(),
    )


def initial_estimator(
    observed: np.ndarray, train_rows: np.ndarray, seed: int, init: LinearInit | None
) -> torch.Tensor:
    """ROLE's starting logits: carried over from the linear phase with LinearInit
    (theta = logit(clip(Ytilde, 1e-5, 1 - 1e-5))), else the paper's initialisation."""
    from spl.fit.engine import estimator_generator

    theta = estimator_init(torch.from_numpy(observed.astype(np.float32)), estimator_generator(seed))
    if init is not None and init.estimates is not None:
        position = {int(r): i for i, r in enumerate(init.train_rows)}
        missing = [int(r) for r in train_rows if int(r) not in position]
        if missing:
            raise SplError(
                f"{init.run}: its label estimates lack {len(missing)} training rows of this "
                f"fine-tune (e.g. trainval row {missing[0]}); the splits differ"
            )
        carried = init.estimates[[position[int(r)] for r in train_rows]]
        theta = estimator_from_probabilities(carried.float())
    return theta


# --------------------------------------------------------------------------- the run


class _Data:
    """Datasets and loaders of one run, shared by its configurations."""

    def __init__(self, prepared, settings, spec: BackboneSpec, procs, observed_set) -> None:
        from spl.data.images import ImageDataset, build_transform

        self.prepared, self.settings, self.procs = prepared, settings, procs
        exclude = bad_rows(prepared)
        size = settings.image_size
        self.mean, self.std = spec.mean, spec.std
        if settings.cache_images:
            from spl.data.cache import CachedImageDataset, build_cache

            procs.together(
                lambda: build_cache(prepared, size, workers=self.workers, progress=procs.rank == 0),
                everyone=False,
            )
            self.datasets = {
                split: CachedImageDataset(
                    prepared,
                    split,
                    size,
                    observed_set=observed_set if split == "train" else None,
                    exclude_rows=exclude[prepared.rows(split)[0]],
                )
                for split in ("train", "val", "test")
            }
        else:
            self.datasets = {
                split: ImageDataset(
                    prepared,
                    split,
                    build_transform(size, train=split == "train", mean=spec.mean, std=spec.std),
                    observed_set=observed_set if split == "train" else None,
                    exclude_rows=exclude[prepared.rows(split)[0]],
                )
                for split in ("train", "val", "test")
            }
        self.rows = {split: ds.rows for split, ds in self.datasets.items()}

    @property
    def workers(self) -> int:
        from spl.extract.run import default_workers

        if self.settings.workers is not None:
            return self.settings.workers
        return default_workers(self.procs.world)

    def prepare(self, train: bool, generator=None) -> Callable | None:
        if not self.settings.cache_images:
            return None
        from spl.data.cache import device_transform

        return lambda images: device_transform(
            images, train=train, mean=self.mean, std=self.std, generator=generator
        )

    def train_loader(self, batch_size: int, seed: int, epoch: int):
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler
        from torch.utils.data.distributed import DistributedSampler

        dataset = self.datasets["train"]
        world = self.procs.world
        if world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=self.procs.rank, shuffle=True, seed=seed,
                drop_last=True,
            )  # fmt: skip
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(_mix(seed, epoch))
            sampler = RandomSampler(dataset, generator=generator)
        per_process = batch_size // world
        batches = BatchSampler(sampler, per_process, drop_last=True)
        return DataLoader(
            dataset, batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.procs.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip

    def eval_loader(self, split: str, batch_size: int):
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        dataset = self.datasets[split]
        sampler = None
        if self.procs.world > 1:
            # pads with repeated rows to equal shares; gather_by_index puts each on its row
            sampler = DistributedSampler(
                dataset, num_replicas=self.procs.world, rank=self.procs.rank, shuffle=False
            )
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
            pin_memory=self.procs.device.type == "cuda",
        )  # fmt: skip

    def logits(self, model, split: str, batch_size: int) -> torch.Tensor:
        s = self.settings
        cuda = self.procs.device.type == "cuda"
        index, logits = predict(
            model, self.eval_loader(split, batch_size), self.procs.device,
            amp=s.amp and cuda, channels_last=s.channels_last and cuda,
            prepare=self.prepare(train=False),
        )  # fmt: skip
        return gather_by_index(index, logits, len(self.datasets[split]), self.procs.world)


def _mix(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
    from spl.extract.run import Processes

    check_loss(settings.loss)
    procs = Processes.start(settings.device)
    try:
        return _run(dataset_dir, settings, out_root, resume, progress, log, procs)
    finally:
        procs.close()


def _run(dataset_dir, settings, out_root, resume, progress, log, procs) -> Path:
    prepared = load_prepared(dataset_dir)
    observed_set = settings.observed_iu if settings.loss == "iu" else settings.observed
    if LOSSES[settings.loss].needs_observed_negatives:
        params = prepared.observed_params.get(observed_set)
        if params is None or params.get("num_neg", 0) == 0:
            raise SplError(
                f"iu trains on observed negatives: {prepared.path} needs an observed set with "
                f"negatives as --observed-iu (has {', '.join(prepared.observed)})"
            )
    prepared.observed_set(observed_set)
    for bs in settings.batch_sizes:
        if bs % procs.world:
            raise SplError(
                f"batch size {bs} is the global batch: it must divide by the {procs.world} "
                "processes of this torchrun job"
            )
    _, spec = get_backbone(settings.backbone, settings.weights, settings.weights_path)
    tag = backbone_tag(settings.backbone, spec.weights, settings.image_size)
    data = _Data(prepared, settings, spec, procs, observed_set)
    train_observed = prepared.observed_set(observed_set)["trainval"][data.rows["train"]]
    if resume is None:
        run_dir = None
        if procs.rank == 0:
            run_dir = new_run_dir(Path(out_root) / prepared.name / tag, "finetune")
            write_config(run_dir, {
                "kind": "finetune",
                "dataset": str(prepared.path.parent.resolve()),
                "dataset_name": prepared.name,
                "dataset_fingerprint": prepared.fingerprint,
                "backbone_tag": tag,
                "backbone": dataclasses.asdict(spec),
                "settings": dataclasses.asdict(settings),
                "loss_options": settings.loss_options(prepared).to_dict(),
                "classes": prepared.classes,
                "processes": procs.world,
                "device": str(procs.device),
                "started": now(),
                "command": command_line(),
            })  # fmt: skip
        run_dir = Path(_broadcast(str(run_dir), procs))
    else:
        run_dir = Path(resume)
    results = []
    for seed in settings.seeds:
        init = None
        if settings.init_from:
            init = load_linear_init(Path(settings.init_from), prepared, settings.loss, tag, seed)
        for bs in settings.batch_sizes:
            for lr in settings.lrs:
                result = _train_config(
                    run_dir, data, settings, prepared, spec, train_observed, lr, bs, seed, init,
                    procs, progress, log,
                )  # fmt: skip
                results.append(result)
    if procs.rank == 0:
        write_csv(run_dir / "results.csv", results, RESULT_COLUMNS)
        (run_dir / "summary.md").write_text(
            summary_markdown(prepared.name, tag, settings.loss, results, bool(settings.init_from))
        )
        config = read_config(run_dir)
        config["finished"] = now()
        write_config(run_dir, config)
        mark_complete(run_dir)
    procs.all_ok(True)
    return run_dir


def _broadcast(value: str, procs) -> str:
    if procs.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train_config(
    run_dir, data, settings, prepared, spec, train_observed, lr, bs, seed, init, procs,
    progress, log,
) -> dict:  # fmt: skip
    name = config_name(lr, bs, seed)
    folder = run_dir / name
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())  # computed before an interruption
    folder.mkdir(parents=True, exist_ok=True)
    device = procs.device
    cuda = device.type == "cuda"
    options = settings.loss_options(prepared)
    torch.manual_seed(_mix(seed, 0))
    backbone, _ = get_backbone(settings.backbone, settings.weights, settings.weights_path)
    classifier = Classifier(backbone, spec.feature_dim, prepared.num_classes)
    if init is not None:
        with torch.no_grad():
            classifier.head.weight.copy_(init.weight)
            classifier.head.bias.copy_(init.bias)
    estimator = None
    if settings.loss == "role":
        estimator = LabelEstimator(
            initial_estimator(train_observed, data.rows["train"], seed, init)
        )
    trainable = Trainable(classifier, estimator).to(device)
    if settings.channels_last and cuda:
        trainable = trainable.to(memory_format=torch.channels_last)
    if settings.sync_bn and procs.world > 1:
        trainable = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainable)
    optimizer = make_optimizer(
        trainable.classifier, trainable.estimator, lr, settings.estimator_lr_multiplier
    )
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": 0}
    last = folder / "last.pt"
    if last.exists():
        checkpoint = load_torch(last, "fine-tune checkpoint")
        trainable.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        log(f"{name}: resuming after epoch {state['epoch']}")
    model = trainable
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(trainable, device_ids=[device.index] if cuda else None)
    train_settings = TrainSettings(
        loss=settings.loss, lr=lr, options=options, amp=settings.amp and cuda,
        channels_last=settings.channels_last and cuda,
        freeze_batchnorm=settings.batchnorm == "frozen",
    )  # fmt: skip
    meta = _meta(settings, spec, prepared, lr, bs, seed, init)
    val_labels = prepared.labels["trainval"][data.rows["val"]]
    if state["epoch"] == 0 and init is not None:
        # Epoch 0: the untouched LinearInit model, to show where fine-tuning starts.
        val0 = _map(data.logits(trainable.classifier, "val", bs), val_labels)
        if procs.rank == 0:
            row = {"config": name, "epoch": 0, "val_map": val0, "linear_val_map": init.val_map}
            append_jsonl(folder / "history.jsonl", [row])
    pseudo = None
    while state["epoch"] < settings.epochs:
        epoch = state["epoch"] + 1
        torch.manual_seed(_mix(seed, epoch))  # augmentation and dropout of this epoch
        if settings.loss == "pseudo_neg":
            from spl.fit.engine import pseudo_negative_mask

            pseudo = pseudo_negative_mask(
                tuple(train_observed.shape), options.pseudo_negative_fraction, seed, epoch
            ).to(device)
        loader = data.train_loader(bs, seed, epoch)
        timing = {"wait": 0.0, "step": 0.0, "images": 0}
        bar = _bar(progress and procs.rank == 0, len(loader), f"{name} epoch {epoch}")

        def on_step(step, waited, seconds, bar=bar, timing=timing, per=bs // procs.world):
            timing["wait"] += waited
            timing["step"] += seconds
            timing["images"] += per * procs.world
            if bar is not None:
                bar.update()

        generator = None
        if settings.cache_images:
            generator = torch.Generator(device=device).manual_seed(_mix(seed, epoch))
        stats = train_epoch(
            model, optimizer, loader, train_settings, device, pseudo_negatives=pseudo,
            prepare=data.prepare(train=True, generator=generator), on_step=on_step,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        val_logits = data.logits(trainable.classifier, "val", bs)
        val_map = _map(val_logits, val_labels)
        improved = val_map > state["best_val"]
        state = {
            "epoch": epoch,
            "best_val": max(val_map, state["best_val"]),
            "best_epoch": epoch if improved else state["best_epoch"],
        }
        if procs.rank == 0:
            checkpoint = {
                "model": trainable.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
                "rng": _rng_state(),
                "meta": meta,
            }
            if improved:
                save_torch(folder / "best.pt", checkpoint)
            save_torch(last, checkpoint)
            busy = timing["wait"] + timing["step"]
            append_jsonl(folder / "history.jsonl", [{
                "config": name, "epoch": epoch, "val_map": val_map, **stats,
                "images_per_second": timing["images"] / busy if busy else None,
                "data_wait_fraction": timing["wait"] / busy if busy else None,
            }])  # fmt: skip
            log(f"{name} epoch {epoch}: val mAP {val_map:.2f} (best {state['best_val']:.2f})")
        procs.all_ok(True)
    result = _score_best(folder, trainable, data, prepared, bs, name, settings, init)
    if procs.rank == 0:
        write_json_atomic(result_path, result)
        (folder / "last.pt").unlink(missing_ok=True)  # best.pt is the model to keep
    procs.all_ok(True)
    return result


def _score_best(folder, trainable, data, prepared, bs, name, settings, init) -> dict:
    best = load_torch(folder / "best.pt", "fine-tune checkpoint") if data.procs.rank == 0 else None
    if data.procs.world > 1:
        best = _broadcast_obj(best, data.procs)
    trainable.load_state_dict(best["model"])
    test_labels = torch.from_numpy(prepared.labels["test"][data.rows["test"]].astype(np.float32))
    logits = data.logits(trainable.classifier, "test", bs)
    test_ap = average_precision(logits, test_labels)
    p1, r1 = precision_recall_at_k(logits, test_labels, 1)
    p3, r3 = precision_recall_at_k(logits, test_labels, 3)
    history = _read_history(folder)
    trained = [h for h in history if h["epoch"] > 0]
    result = {
        "config": name,
        "loss": settings.loss,
        "lr": best["meta"]["lr"],
        "batch_size": best["meta"]["batch_size"],
        "seed": best["meta"]["seed"],
        "best_epoch": best["state"]["best_epoch"],
        "val_map": best["state"]["best_val"],
        "test_map": float(100 * test_ap.mean()),
        "test_per_class_ap": [round(100 * float(v), 4) for v in test_ap],
        "test_p_at_1": 100 * p1, "test_r_at_1": 100 * r1,
        "test_p_at_3": 100 * p3, "test_r_at_3": 100 * r3,
        "init": f"linear:{init.head}" if init is not None else "imagenet",
        "images_per_second": _mean([h.get("images_per_second") for h in trained]),
        "data_wait_fraction": _mean([h.get("data_wait_fraction") for h in trained]),
    }  # fmt: skip
    if trainable.estimator is not None:
        probs = torch.sigmoid(trainable.estimator.theta.detach().float().cpu())
        train_labels = prepared.labels["trainval"][data.rows["train"]].astype(np.float32)
        result["estimator_recovery_map"] = float(
            mean_average_precision(probs, torch.from_numpy(train_labels))
        )
    return result


def _broadcast_obj(obj, procs):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_history(folder: Path) -> list[dict]:
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _map(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(mean_average_precision(logits, torch.from_numpy(labels.astype(np.float32))))


def _meta(settings, spec, prepared, lr, bs, seed, init) -> dict:
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


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def summary_markdown(dataset: str, tag: str, loss: str, rows: list[dict], linear_init: bool) -> str:
    selected = select_best(rows).get(loss)
    key = f"{loss}+linearinit" if linear_init else loss
    reference = None
    if tag == paper.PAPER_BACKBONE_TAG:
        reference = paper.paper_value("finetune", key, dataset)
    title = LOSSES[loss].title + (" + LinearInit" if linear_init else "")
    lines = [
        f"# Fine-tuned {title} on {dataset} ({tag})",
        "",
        "| config | best epoch | val mAP | test mAP |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['best_epoch']} | {row['val_map']:.2f} | {row['test_map']:.2f} |"
        )
    if selected:
        lines += [
            "",
            f"Selected (best val per seed): test mAP {format_mean_std(selected.get('test_map'))}"
            + ("" if reference is None else f"; paper: {reference}"),
        ]
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
    out = [f"{'config':<22} {'epoch':>5} {'val mAP':>8} {'test mAP':>9}"]
    for row in rows:
        out.append(
            f"{row['config']:<22} {int(row['best_epoch']):>5} {float(row['val_map']):>8.2f} "
            f"{float(row['test_map']):>9.2f}"
        )
    selected = select_best(rows)
    for loss, pick in selected.items():
        out.append(f"selected {LOSSES[loss].title}: test mAP {format_mean_std(pick['test_map'])}")
    return "\n".join(out)
