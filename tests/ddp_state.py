"""Run under torchrun by test_finetune_state: fine-tune with one stateful loss and write what
each rank holds, so the test can compare the ranks and replay the updates in one process.

Usage: ddp_state.py DATASET LOSS OPTIONS_JSON EPOCHS OUT_DIR [drop|keep]

(drop: the last partial batch dropped, the paper's, the default; keep: kept, the releases'.)

Each rank writes OUT_DIR/rank{R}.pt: the loss's state after every epoch (from FineTuner's
on_epoch hook), every after_step call the loss received (rows, logits, observed, labels,
state rows, epoch), every epoch-end scoring pass (the gathered scores, and this rank's own
share of the training rows scored again here with the same model and the same random
flips), a BatchNorm buffer per epoch,
and, for a loss with an after-step hook, a direct check of the parts' gathering with
unequal parts that repeat a row. The loss is the real one, subclassed only to record.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from spl.data.loaders import ImageSplits
from spl.data.prepared import load_prepared
from spl.data.runtime import Processes
from spl.extract.backbones import get_backbone
from spl.extract.features import unreadable_rows
from spl.fit.finetune import Classifier, FineTuner, predict
from spl.fit.losses import Batch, Context, Loss, get_loss
from spl.fit.recipes import PAPER_RECIPE, Recipe

OBSERVED = "uniform-p1-n0-s1200"


def _cpu(tensors: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def recording(cls: type[Loss], calls: list, ends: list, probe: dict) -> type[Loss]:
    """``cls`` whose hooks first record what they receive; only the hooks ``cls`` itself
    overrides, so that FineTuner takes the same path as with ``cls``."""
    methods = {}
    if cls.after_step is not Loss.after_step:

        def after_step(self, state, *, rows, logits, batch):
            calls.append({
                "epoch": batch.epoch, "rows": rows.cpu().clone(), "logits": logits.cpu().clone(),
                "observed": batch.observed.cpu().clone(),
                "labels": None if batch.labels is None else batch.labels.cpu().clone(),
                "state": _cpu(batch.state),
            })  # fmt: skip
            cls.after_step(self, state, rows=rows, logits=logits, batch=batch)

        methods["after_step"] = after_step

    def on_epoch_end(self, state, *, epoch, num_epochs, seed, scores=None):
        record = {"epoch": epoch, "scores": None if scores is None else scores.cpu().clone()}
        if scores is not None:
            index, logits = probe["local"]()
            record.update(local_index=index, local_scores=torch.sigmoid(logits))
        ends.append(record)
        cls.on_epoch_end(self, state, epoch=epoch, num_epochs=num_epochs, seed=seed, scores=scores)

    methods["on_epoch_end"] = on_epoch_end
    return type(f"Recording{cls.__name__}", (cls,), methods)


def unequal_parts(tuner: FineTuner, procs: Processes, num_classes: int) -> dict:
    """FineTuner's gathering of after-step parts with parts of unequal sizes whose rows
    overlap (rank 0: rows 0-2, rank 1: rows 2-6), on a fresh LL-Cp state: what it leaves."""
    state = tuner.model_.state()
    for tensor in state.values():
        tensor.zero_()
    rows = torch.arange(3) if procs.rank == 0 else torch.arange(2, 7)
    generator = torch.Generator().manual_seed(100 + procs.rank)
    logits = 3 * torch.randn(1, len(rows), num_classes, generator=generator)
    observed = torch.zeros(len(rows), num_classes)
    observed[:, procs.rank] = 1
    labels = torch.zeros(len(rows), num_classes)
    batch = Batch(observed, labels, 2, tuner.epochs, tuner.loss.batch_state(state, rows))
    tuner.after_every_step(rows, logits, batch, procs.world)
    part = {"rows": rows, "logits": logits, "observed": observed, "labels": labels,
            "state": _cpu(batch.state)}  # fmt: skip
    return {"part": part, "after": _cpu(state)}


def main(dataset: str, key: str, options: str, epochs: str, out: str, last: str = "drop") -> None:
    procs = Processes.start("cpu")
    torch.set_num_threads(1)
    prepared = load_prepared(dataset)
    _, spec = get_backbone("efficientnet_lite0")
    data = ImageSplits(
        prepared, image_size=48, mean=spec.mean, std=spec.std, observed=OBSERVED,
        excluded=unreadable_rows(prepared), procs=procs, workers=0,
    )  # fmt: skip
    context = Context(prepared.num_classes, prepared.expected_positives, prepared.name)
    base = get_loss(key).make(json.loads(options), context)
    calls, ends, probe = [], [], {}
    loss = recording(type(base), calls, ends, probe)(base.options, base.context)
    recipe = PAPER_RECIPE
    if last == "keep":
        recipe = Recipe("the releases' batching", 1e-3, 16, int(epochs), drop_last=False)
    tuner = FineTuner(loss, lr=1e-3, batch_size=16, epochs=int(epochs), seed=0, recipe=recipe)

    def on_step(step: int, waited: float, seconds: float) -> None:
        probe["rng"] = torch.get_rng_state()  # the last one: where the scoring pass starts

    def local_scores():
        # The scoring pass reads the training rows with their random flip (as the release
        # does): draw the same flips as FineTuner's pass did, and leave the run's stream.
        now = torch.get_rng_state()
        torch.set_rng_state(probe["rng"])
        try:
            loader = data.eval_loader("train", tuner.batch_size)
            return predict(tuner.model_.classifier, loader, procs.device)
        finally:
            torch.set_rng_state(now)

    probe["local"] = local_scores
    states, norms = [], []

    def on_epoch(tuner: FineTuner, record: dict) -> None:
        states.append(_cpu(tuner.model_.state()))
        model = tuner.model_.state_dict()
        name = next(k for k in model if k.endswith("running_mean"))
        norms.append(model[name].cpu().clone())

    def make_classifier() -> Classifier:
        backbone, _ = get_backbone("efficientnet_lite0")
        return Classifier(backbone, spec.feature_dim, prepared.num_classes)

    tuner.fit(make_classifier, data, on_epoch=on_epoch, on_step=on_step)
    dump = {
        "world": procs.world, "rank": procs.rank, "states": states, "calls": list(calls),
        "ends": ends, "norms": norms, "observed": torch.from_numpy(np.asarray(data.observed())),
        "train_rows": len(data.datasets["train"]),
    }  # fmt: skip
    if calls:
        dump["unequal"] = unequal_parts(tuner, procs, prepared.num_classes)
    torch.save(dump, Path(out) / f"rank{procs.rank}.pt")
    procs.close()
    # As ddp_eval.py: exit without interpreter teardown, where a gloo thread can abort a
    # rank after the result is written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
