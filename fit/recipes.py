"""How each method's authors fine-tuned it (docs/methods.md), per dataset: `spl finetune
--recipe source`. The paper's own protocol (`--recipe paper`, the default) is an 8-point
grid of Adam at one lr for 10 epochs, keeping the best val epoch; the releases since fix one
configuration each, with their own optimiser, head lr multiplier, epochs and early stop.

What a recipe cannot carry here is named in its ``departures``: the robust-loss release's
(Hill, SPLC, ASL) EMA of the weights, CutoutPIL + RandAugment and un-normalised inputs.

Batching follows each source's train loader (docs/recipes.md section 6): the paper's code
drops the last partial batch; every release since keeps it (its DataLoader has
``drop_last=False``: EM and EM + APL's main.py, LargeLoss's, GR's and AEVLP's train.py,
VLPL's main_clip.py; the robust-loss release's train.py leaves DataLoader's default,
False), so an epoch there is ceil(N / B) steps. ``spl fit-linear`` keeps the paper's rule
for every loss, so that the linear table compares the losses under one protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spl.data.common import SplError


@dataclass(frozen=True)
class EarlyStop:
    """Stop after an epoch whose val mAP is ``max_drop`` points below the best so far, or
    after ``patience`` epochs in a row without improving (None: no such rule)."""

    max_drop: float | None = None
    patience: int | None = None

    def stop(self, history: list[float]) -> bool:
        """Whether to stop after the epochs whose val mAPs are ``history`` (in order)."""
        if not history:
            return False
        best = max(history)
        if self.max_drop is not None and best - history[-1] > self.max_drop:
            return True
        if self.patience is not None:
            # epochs since the best was first reached (an equal val mAP does not improve it)
            since = len(history) - 1 - history.index(best)
            return since >= self.patience
        return False


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning configuration: optimiser, lr, the head's lr multiplier, batch size,
    epochs, the lr schedule, the early-stopping rule and whether an epoch's last partial
    batch is dropped (the paper's code) or trained on (the releases since)."""

    source: str
    lr: float
    batch_size: int
    epochs: int
    optimizer: str = "adam"  # adam | sgd
    head_lr_multiplier: float = 1.0
    weight_decay: float = 0.0  # L2 in the optimiser, on weights (not biases, norms)...
    decay_all: bool = False  # ... or on every parameter
    momentum: float = 0.0  # SGD
    schedule: str = "constant"  # constant | onecycle
    schedule_epochs: int | None = None  # onecycle: the epochs the schedule is laid out for
    pct_start: float = 0.3  # onecycle
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    drop_last: bool = True  # the paper's code drops the last partial batch; False keeps it
    departures: tuple[str, ...] = ()


EM_SOURCE = "Correr-Zhou/SPML-AckTheUnknown main.py:126-134, 213, 323-372"
LL_SOURCE = "snucml/LargeLossMatters config.py, train.py:31-40, 108; issue #4"
GR_SOURCE = "yan4xi1/GRLoss config.py:78-102, train.py:158"
RL_SOURCE = "xinyu1205/robust-loss-mlml train.py:89-126"
VLPL_SOURCE = "mvrl/VLPL main_clip.py:153-158, 299-360"
AEVLP_SOURCE = "Fsoft-AIC/AEVLP configs/*.json, train.py:30-35, 228"
RL_DEPARTURES = (
    "no EMA of the weights (the release reports the better of the model and its EMA 0.9997)",
    "the paper's augmentation (flip) instead of CutoutPIL + RandAugment",
    "ImageNet-normalised inputs (the release feeds ToTensor's [0, 1] pixels)",
)


def _em(dataset: str) -> Recipe:
    batch, lr = {"voc12": (8, 1e-5), "coco14": (16, 1e-5), "nuswide": (16, 1e-5),
                 "cub": (8, 1e-4)}.get(dataset, (8, 1e-5))  # fmt: skip
    # A single Adam over all parameters at one lr; stop at the first epoch whose val mAP
    # does not improve (the best-val weights are kept); the loader keeps the partial batch.
    return Recipe(EM_SOURCE, lr, batch, 10, early_stop=EarlyStop(patience=1), drop_last=False)


def _ll(dataset: str) -> Recipe:
    stop = EarlyStop(max_drop=3.0)
    if dataset not in ("coco14", "nuswide", "cub"):  # VOC's recipe for any other dataset
        return Recipe(LL_SOURCE, 5e-3, 16, 10, optimizer="sgd", momentum=0.9, weight_decay=1e-3,
                      decay_all=True, head_lr_multiplier=10.0, early_stop=stop,
                      drop_last=False)  # fmt: skip
    lr = 7.5e-5 if dataset == "cub" else 1e-5
    return Recipe(LL_SOURCE, lr, 16, 10, head_lr_multiplier=10.0, early_stop=stop, drop_last=False)


def _gr(dataset: str) -> Recipe:
    return Recipe(
        GR_SOURCE, 1e-5, 8, 8, head_lr_multiplier=10.0, early_stop=EarlyStop(max_drop=2.0),
        drop_last=False,
    )  # fmt: skip


def _rl(dataset: str) -> Recipe:
    # OneCycleLR laid out for 80 epochs of len(train_loader) = ceil(N / B) steps, training
    # stopped after epoch index 30: 31 epochs.
    return Recipe(RL_SOURCE, 1e-4, 128, 31, weight_decay=1e-4, schedule="onecycle",
                  schedule_epochs=80, pct_start=0.2, drop_last=False,
                  departures=RL_DEPARTURES)  # fmt: skip


def _vlpl(dataset: str) -> Recipe:
    # Batch 8 everywhere; one Adam at one lr; 10 epochs with the early stop commented out
    # (the best val epoch is kept).
    return Recipe(VLPL_SOURCE, 1e-4 if dataset == "cub" else 1e-5, 8, 10, drop_last=False)


def _aevlp(dataset: str) -> Recipe:
    batch, epochs = {"voc12": (8, 8), "coco14": (16, 8), "nuswide": (16, 10),
                     "cub": (8, 10)}.get(dataset, (8, 8))  # fmt: skip
    stop = EarlyStop(max_drop=2.0, patience=2)
    return Recipe(
        AEVLP_SOURCE, 1e-5, batch, epochs, head_lr_multiplier=10.0, early_stop=stop,
        drop_last=False,
    )  # fmt: skip


# The paper's protocol, for one configuration of its grid (the grid itself is the command's).
PAPER_RECIPE = Recipe("Cole et al., CVPR 2021 (docs/protocol.md section 5)", 1e-4, 8, 10)

RECIPES = {
    "em": _em, "em_apl": _em,
    "ll_r": _ll, "ll_ct": _ll, "ll_cp": _ll,
    "gr": _gr,
    "hill": _rl, "splc": _rl, "asl": _rl,
    "em_pl": _vlpl, "gpr": _aevlp,
}  # fmt: skip


def source_recipe(loss: str, dataset: str | None) -> Recipe:
    """The recipe of ``loss``'s release for ``dataset`` (VOC's for another dataset)."""
    if loss not in RECIPES:
        raise SplError(
            f"{loss} has no published recipe of its own (it is the paper's, or the paper's "
            f"code's): use --recipe paper. Losses with one: {', '.join(RECIPES)}"
        )
    return RECIPES[loss](dataset)
