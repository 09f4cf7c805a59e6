"""The paper's protocol defaults, pinned to the values docs/protocol.md gives: none of them can
change without this test failing."""

import math

import torch

from spl.data import protocol
from spl.evaluate import paper
from spl.fit.losses import LOG_EPSILON, LOSSES, Batch, Context, get_loss
from spl.settings import FinetuneSettings, LinearSettings, PrepareSettings, ReproduceSettings


def test_protocol_constants_are_the_papers():
    # section 2: split and label sampling
    assert (protocol.SPLIT_SEED, protocol.VAL_FRACTION, protocol.LABEL_SEED) == (1200, 0.2, 1200)
    assert (protocol.NUM_POSITIVES, protocol.NUM_NEGATIVES, protocol.NUM_NEGATIVES_IU) == (1, 0, 1)
    assert protocol.EXPECTED_POSITIVES == {"voc12": 1.5, "coco14": 2.9, "nuswide": 1.9, "cub": 31.4}
    assert (protocol.OBSERVED, protocol.OBSERVED_IU) == (
        "uniform-p1-n0-s1200",
        "uniform-p1-n1-s1200",
    )
    # section 3: backbone and images
    assert protocol.PAPER_BACKBONE_TAG == "resnet50-IMAGENET1K_V1-448"
    assert protocol.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert protocol.IMAGENET_STD == (0.229, 0.224, 0.225)
    # section 5: training and selection
    assert protocol.LRS == (1e-2, 1e-3, 1e-4, 1e-5) and protocol.BATCH_SIZES == (8, 16)
    assert (protocol.LINEAR_EPOCHS, protocol.FINETUNE_EPOCHS) == (25, 10)
    assert (protocol.ADAM_BETAS, protocol.ADAM_EPS) == ((0.9, 0.999), 1e-8)
    assert protocol.LINEARINIT == {
        "an_ls": {"lr": 1e-4, "batch_size": 8, "batch_size_for": {"nuswide": 16}},
        "role": {"lr": 1e-3, "batch_size": 16, "batch_size_for": {"cub": 8}},
    }
    assert protocol.HISTOGRAM_BINS == 20


def test_commands_default_to_the_protocol():
    linear, finetune = LinearSettings(), FinetuneSettings()
    assert linear.losses == ["bce", "bce_ls", "iun", "iu", "an", "an_ls", "wan", "epr", "role"]
    assert (linear.lrs, linear.batch_sizes, linear.epochs) == (
        [1e-2, 1e-3, 1e-4, 1e-5],
        [8, 16],
        25,
    )
    assert (finetune.lrs, finetune.batch_sizes, finetune.epochs) == (linear.lrs, [8, 16], 10)
    assert (finetune.backbone, finetune.image_size, finetune.batchnorm) == (
        "resnet50",
        448,
        "train",
    )
    assert linear.observed == finetune.observed == "uniform-p1-n0-s1200"
    assert linear.histogram_bins == 20 and linear.expected_positives is None
    prepare = PrepareSettings()
    assert (prepare.num_pos, prepare.num_neg, prepare.seed) == (1, 0, 1200)
    assert (prepare.split_seed, prepare.val_fraction) == (1200, 0.2)
    reproduce = ReproduceSettings()
    assert (reproduce.backbone, reproduce.image_size, reproduce.linear_epochs) == (
        "resnet50",
        448,
        25,
    )


def test_loss_defaults_are_the_papers():
    assert LOG_EPSILON == 1e-5
    assert get_loss("role").Options().estimator_lr_multiplier == 10.0
    assert get_loss("bce_ls").Options().label_smoothing == 0.1
    assert get_loss("an_ls").Options().label_smoothing == 0.1
    assert get_loss("pseudo_neg").Options().fraction == 0.5
    assert (get_loss("epr").regulariser_weight, get_loss("role").regulariser_weight) == (1.0, 0.5)
    # WAN's gamma defaults to 1 / (L - 1)
    wan = get_loss("wan").make(context=Context(5))
    observed = torch.tensor([[1.0, 0, 0, 0, 0]])
    _, neg = wan.weights(Batch(observed))
    assert neg[0, 1].item() == 1 / 4
    # k comes from the dataset unless a loss's option says otherwise
    epr = get_loss("epr").make(context=Context(5, expected_positives=2.9))
    assert epr.expected_positives() == 2.9
    assert (
        get_loss("epr").make({"expected_positives": 1.0}, Context(5, 2.9)).expected_positives() == 1
    )
    assert [k for k, v in LOSSES.items() if v.in_paper] == [
        "bce", "bce_ls", "iun", "iu", "an", "an_ls", "wan", "epr", "role",
    ]  # fmt: skip


def test_the_paper_column_is_shown_for_the_papers_datasets_and_marked_when_protocols_differ():
    same = paper.protocol_differences("linear", tag=protocol.PAPER_BACKBONE_TAG, lrs=protocol.LRS,
                                      batch_sizes=protocol.BATCH_SIZES, epochs=25)  # fmt: skip
    assert same == []
    other = paper.protocol_differences("finetune", tag="resnet50-IMAGENET1K_V2-224", epochs=3)
    assert len(other) == 2 and "resnet50-IMAGENET1K_V2-224" in other[0] and "3 epochs" in other[1]
    assert paper.paper_value("linear", "role", "voc12") == 86.5
    assert paper.paper_value("linear", "role", "demo") is None
    assert math.isclose(paper.paper_value("finetune", "role+linearinit", "coco14"), 69.0)
