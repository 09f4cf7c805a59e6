"""Run under torchrun by test_finetune: val logits of a checkpoint, scored across processes."""

import json
import os
import sys
from pathlib import Path

import torch

from spl.data.loaders import ImageSplits
from spl.data.prepared import load_prepared
from spl.data.runtime import Processes
from spl.extract.backbones import get_backbone
from spl.extract.features import unreadable_rows
from spl.fit.finetune import Classifier, split_logits, split_map


def main(dataset: str, checkpoint: str, out: str) -> None:
    procs = Processes.start("cpu")
    prepared = load_prepared(dataset)
    best = torch.load(checkpoint, weights_only=True)
    meta = best["meta"]
    backbone, spec = get_backbone(meta["backbone"], meta["weights"])
    classifier = Classifier(backbone, spec.feature_dim, prepared.num_classes)
    classifier.load_state_dict(
        {
            k.removeprefix("classifier."): v
            for k, v in best["model"].items()
            if k.startswith("classifier.")
        }
    )
    data = ImageSplits(
        prepared, image_size=meta["image_size"], mean=spec.mean, std=spec.std,
        observed="uniform-p1-n0-s1200", excluded=unreadable_rows(prepared), procs=procs,
        workers=0,
    )  # fmt: skip
    logits = split_logits(classifier, data, "val", 4, amp=False, channels_last=False)
    val = split_map(logits, data.labels("val"))
    if procs.rank == 0:
        Path(out).write_text(
            json.dumps({"val_map": val, "rows": len(logits), "world": procs.world})
        )
    procs.close()
    # This harness exits without interpreter teardown: there, about one exit in ten, a gloo
    # thread aborted a rank ("terminate called without an active exception") after the
    # result was written. `spl finetune` under torchrun did not show it in 20 runs.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
