"""The paper's published numbers (docs/protocol.md section 7): test mAP and training-set recovery."""

from __future__ import annotations

from spl.data import protocol

PAPER_DATASETS = protocol.PAPER_DATASETS

# loss -> dataset -> test mAP of a linear head on frozen ResNet-50 features at 448 px
LINEAR = {
    "bce": {"voc12": 86.7, "coco14": 70.0, "nuswide": 50.7, "cub": 29.1},
    "bce_ls": {"voc12": 87.6, "coco14": 70.2, "nuswide": 51.7, "cub": 29.3},
    "iun": {"voc12": 86.4, "coco14": 67.0, "nuswide": 49.0, "cub": 19.4},
    "iu": {"voc12": 82.6, "coco14": 60.8, "nuswide": 43.6, "cub": 16.1},
    "an": {"voc12": 84.2, "coco14": 62.3, "nuswide": 46.2, "cub": 17.2},
    "an_ls": {"voc12": 85.3, "coco14": 64.8, "nuswide": 48.5, "cub": 15.4},
    "wan": {"voc12": 84.1, "coco14": 63.1, "nuswide": 45.8, "cub": 17.9},
    "epr": {"voc12": 83.8, "coco14": 62.6, "nuswide": 46.4, "cub": 18.0},
    "role": {"voc12": 86.5, "coco14": 66.3, "nuswide": 49.5, "cub": 16.2},
}

# loss (or loss+linearinit) -> dataset -> test mAP after fine-tuning the whole network
FINETUNE = {
    "bce": {"voc12": 89.1, "coco14": 75.8, "nuswide": 52.6, "cub": 32.1},
    "bce_ls": {"voc12": 90.0, "coco14": 76.8, "nuswide": 53.5, "cub": 32.6},
    "iun": {"voc12": 87.1, "coco14": 70.5, "nuswide": 46.9, "cub": 21.3},
    "iu": {"voc12": 83.2, "coco14": 59.7, "nuswide": 42.9, "cub": 17.9},
    "an": {"voc12": 85.1, "coco14": 64.1, "nuswide": 42.0, "cub": 19.1},
    "an_ls": {"voc12": 86.7, "coco14": 66.9, "nuswide": 44.9, "cub": 17.9},
    "wan": {"voc12": 86.5, "coco14": 64.8, "nuswide": 46.3, "cub": 20.3},
    "epr": {"voc12": 85.5, "coco14": 63.3, "nuswide": 46.0, "cub": 20.0},
    "role": {"voc12": 87.9, "coco14": 66.3, "nuswide": 43.1, "cub": 15.0},
    "an_ls+linearinit": {"voc12": 86.5, "coco14": 69.2, "nuswide": 50.5, "cub": 16.6},
    "role+linearinit": {"voc12": 88.2, "coco14": 69.0, "nuswide": 51.0, "cub": 16.8},
}

# training-set mAP of the predictions against the hidden full training labels
RECOVERY = {
    "an": {"voc12": 85.8, "coco14": 63.8, "nuswide": 49.3, "cub": 16.8},
    "an_ls": {"voc12": 86.9, "coco14": 65.4, "nuswide": 49.7, "cub": 17.4},
    "role": {"voc12": 90.3, "coco14": 69.5, "nuswide": 56.0, "cub": 19.6},
}

# Methods since the paper: published test mAP, fine-tuned end to end (ResNet-50, 448 px,
# Cole et al.'s splits and single positives), each with its own recipe (docs/methods.md).
SINCE_2021 = {
    "em": {"voc12": 89.09, "coco14": 70.70, "nuswide": 47.15, "cub": 20.85},
    "em_apl": {"voc12": 89.19, "coco14": 70.87, "nuswide": 47.59, "cub": 21.84},
    "ll_r": {"voc12": 89.2, "coco14": 71.0, "nuswide": 47.4, "cub": 19.5},
    "ll_ct": {"voc12": 89.0, "coco14": 70.5, "nuswide": 48.0, "cub": 20.4},
    "ll_cp": {"voc12": 88.4, "coco14": 70.7, "nuswide": 48.3, "cub": 20.1},
    "gr": {"voc12": 89.83, "coco14": 73.17, "nuswide": 49.08, "cub": 21.64},
    "asl": {"voc12": 87.76, "coco14": 68.78, "nuswide": 46.93, "cub": 18.81},
    "em_pl": {"voc12": 89.10, "coco14": 71.45, "nuswide": 49.55, "cub": 24.02},
    "gpr": {"voc12": 90.46, "coco14": 73.54, "nuswide": 50.70, "cub": 24.89},
}
# Where each published number is from (docs/methods.md); Hill and SPLC have none under Cole's
# protocol.
SINCE_2021_SOURCES = {
    "em": "EM (Zhou et al., 2022): VLPL README, AEVLP results, BoostLU figure",
    "em_apl": "EM + APL (Zhou et al., 2022): same sources as EM",
    "ll_r": "LargeLoss (Kim et al., 2022), end to end",
    "ll_ct": "LargeLoss (Kim et al., 2022), end to end",
    "ll_cp": "LargeLoss (Kim et al., 2022), end to end",
    "gr": "GR loss: AEVLP's results (the GR repository has none)",
    "hill": "none published under Cole et al.'s protocol",
    "splc": "none published under Cole et al.'s protocol",
    "asl": "BoostLU authors' re-run of ASL as a single-positive loss",
    "em_pl": "VLPL (Xing et al., 2024); external model: CLIP scores",
    "gpr": "AEVLP (Tran et al., 2025); external model: CLIP scores",
}

# The backbone the paper's numbers were measured with.
PAPER_BACKBONE_TAG = protocol.PAPER_BACKBONE_TAG


def paper_value(table: str, loss: str, dataset: str) -> float | None:
    """The paper's number for a cell, wherever the dataset is one of the paper's."""
    source = {
        "linear": LINEAR, "finetune": FINETUNE, "recovery": RECOVERY, "since-2021": SINCE_2021
    }[table]  # fmt: skip
    return source.get(loss, {}).get(dataset)


def protocol_differences(
    table: str,
    *,
    tag: str,
    lrs=None,
    batch_sizes=None,
    epochs: int | None = None,
    observed: str | None = None,
    val: str | None = None,
) -> list[str]:
    """How a run's protocol departs from the one the paper's numbers were measured with:
    a table marks its paper column when this is not empty."""
    paper_epochs = protocol.FINETUNE_EPOCHS if table == "finetune" else protocol.LINEAR_EPOCHS
    out = []
    if tag != PAPER_BACKBONE_TAG:
        out.append(f"features {tag} (paper: {PAPER_BACKBONE_TAG})")
    if lrs is not None and sorted(map(float, lrs)) != sorted(protocol.LRS):
        out.append(f"lrs {','.join(f'{v:g}' for v in lrs)}")
    if batch_sizes is not None and sorted(map(int, batch_sizes)) != sorted(protocol.BATCH_SIZES):
        out.append(f"batch sizes {','.join(map(str, batch_sizes))}")
    if epochs is not None and int(epochs) != paper_epochs:
        out.append(f"{epochs} epochs (paper: {paper_epochs})")
    if observed is not None and observed != protocol.OBSERVED:
        out.append(f"observed labels {observed} (paper: {protocol.OBSERVED})")
    if val is not None and val != "full":
        out.append(f"selection on the val split's {val} labels (paper: its full labels)")
    return out
