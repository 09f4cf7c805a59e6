"""The paper's protocol: every constant it fixes, in one place (docs/protocol.md sections 2-5).

Each stage reads its defaults from here, the command line shows them, and
``tests/test_protocol.py`` pins each one to the value docs/protocol.md gives, so that none can
change without a test failing.
"""

from __future__ import annotations

# Section 2: the train/val split of the official training file and the label sampling.
SPLIT_SEED = 1200
VAL_FRACTION = 0.2
LABEL_SEED = 1200
NUM_POSITIVES = 1  # observed positives per image
NUM_NEGATIVES = 0  # observed negatives per image (IU's set has 1)
NUM_NEGATIVES_IU = 1
# Expected positives per image k (EPR's and ROLE's regulariser), per dataset.
EXPECTED_POSITIVES = {"voc12": 1.5, "coco14": 2.9, "nuswide": 1.9, "cub": 31.4}
PAPER_DATASETS = ("voc12", "coco14", "nuswide", "cub")

# Section 3: backbone and images.
BACKBONE = "resnet50"
WEIGHTS = "IMAGENET1K_V1"
IMAGE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Section 5: training and model selection.
LRS = (1e-2, 1e-3, 1e-4, 1e-5)
BATCH_SIZES = (8, 16)
LINEAR_EPOCHS = 25
FINETUNE_EPOCHS = 10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# LinearInit's fixed linear phase: loss -> lr and batch size, with per-dataset exceptions.
LINEARINIT = {
    "an_ls": {"lr": 1e-4, "batch_size": 8, "batch_size_for": {"nuswide": 16}},
    "role": {"lr": 1e-3, "batch_size": 16, "batch_size_for": {"cub": 8}},
}

# Section 7: the figure of predicted probabilities on unobserved positives (ours: 20 bins).
HISTOGRAM_BINS = 20


# How the observed positive is drawn: uniformly among the image's positives (the paper's
# protocol), or biased towards large, central or often-clicked classes (docs/methods.md s11;
# COCO 2014 only, from its instance annotations).
BIASES = ("uniform", "size", "location", "semantic")


def observed_set_name(num_pos: int, num_neg: int, seed: int, bias: str = "uniform") -> str:
    """Name of an observed-label set in labels.h5, e.g. ``uniform-p1-n0-s1200``, or for a
    biased draw (one positive, no negative) ``size-p1-s1200``."""
    pos = "all" if num_pos == -1 else str(num_pos)
    neg = "all" if num_neg == -1 else str(num_neg)
    if bias != "uniform":
        return f"{bias}-p{pos}-s{seed}"
    return f"uniform-p{pos}-n{neg}-s{seed}"


OBSERVED = observed_set_name(NUM_POSITIVES, NUM_NEGATIVES, LABEL_SEED)
OBSERVED_IU = observed_set_name(NUM_POSITIVES, NUM_NEGATIVES_IU, LABEL_SEED)
PAPER_BACKBONE_TAG = f"{BACKBONE}-{WEIGHTS}-{IMAGE_SIZE}"
