"""Every single-positive loss, one object each (the interface: :mod:`.base`).

Adding a method is one class in a family module, one line in ``REGISTRY`` below and one
test (``docs/architecture.md`` walks through an example); a loss defined elsewhere joins
with :func:`register`. For users' own training loops,
:func:`loss` computes any of them on a batch::

    from spl.fit.losses import loss
    value = loss("an_ls", logits, observed)              # observed in {-1, 0, +1}
    value = loss("role", logits, observed, estimates=theta[index], expected_positives=2.9)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch

from spl.data.common import SplError
from spl.fit.losses.assume_negative import AN, ANLS, WAN, PseudoNegatives, pseudo_negative_mask
from spl.fit.losses.base import (
    LOG_EPSILON,
    SINGLE_POSITIVE,
    WITH_NEGATIVES,
    Batch,
    Context,
    FusedStep,
    Loss,
    Scores,
    coerce_option,
    describe_options,
    expected_positive_penalty,
    log_neg,
    log_pos,
)
from spl.fit.losses.baselines import BCE, BCELS, IU, IUN
from spl.fit.losses.entropy import EM, EMAPL, apl_label
from spl.fit.losses.expected_positives import EPR
from spl.fit.losses.large_loss import LLR, LLCp, LLCt, clean_rate
from spl.fit.losses.ranking import PR
from spl.fit.losses.robust import ASL, GR, SPLC, Hill, gr_schedule
from spl.fit.losses.role import ROLE, estimator_from_probabilities, estimator_init
from spl.fit.losses.vision_language import EMPL, GPR

# A list: register() appends a loss defined elsewhere.
REGISTRY: list[type[Loss]] = [
    # the paper's table, in its row order
    BCE, BCELS, IUN, IU, AN, ANLS, WAN, EPR, ROLE,
    # in the paper's code or method list, not in its tables
    PR, PseudoNegatives,
    # methods since the paper (docs/methods.md)
    EM, EMAPL, LLR, LLCt, LLCp, GR, Hill, SPLC, ASL,
    # methods since the paper that train on a vision-language model's scores (--scores)
    EMPL, GPR,
]  # fmt: skip
LOSSES: dict[str, type[Loss]] = {cls.key: cls for cls in REGISTRY}
PAPER_LOSSES = [key for key, cls in LOSSES.items() if cls.in_paper]
SINCE_2021 = ["em", "em_apl", "ll_r", "ll_ct", "ll_cp", "gr", "hill", "splc", "asl"]
VISION_LANGUAGE = [key for key, cls in LOSSES.items() if cls.reads_scores]  # need --scores
# Names for sets of losses in --losses: each expands to its keys.
GROUPS: dict[str, list[str]] = {
    "paper": PAPER_LOSSES, "since-2021": SINCE_2021, "vlm": VISION_LANGUAGE, "all": list(LOSSES),
}  # fmt: skip

__all__ = [
    "LOG_EPSILON", "SINGLE_POSITIVE", "WITH_NEGATIVES", "Batch", "Context", "FusedStep",
    "Loss", "LOSSES", "PAPER_LOSSES", "SINCE_2021", "VISION_LANGUAGE", "GROUPS", "REGISTRY",
    "Scores", "describe_options",
    "apl_label", "clean_rate", "gr_schedule",
    "estimator_from_probabilities", "estimator_init", "expected_positive_penalty", "get_loss",
    "log_neg", "log_pos", "loss", "make_losses", "parse_loss_options", "parse_losses",
    "pseudo_negative_mask", "register",
]  # fmt: skip


def register(cls: type[Loss]) -> type[Loss]:
    """Add a loss class at run time (a loss outside this package; those inside get a line in
    ``REGISTRY``) as if it had a line at the end of ``REGISTRY``: to ``REGISTRY``, ``LOSSES``
    and the groups its class attributes put it in (``all``; ``paper`` if ``in_paper``,
    ``vlm`` if ``reads_scores``). Returns the class, so that it also serves as a decorator.
    A key already registered, or a group's name, is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Loss)) or not cls.key:
        raise SplError(f"register() takes a subclass of Loss with a key, got {cls!r}")
    if cls.key in LOSSES or cls.key in GROUPS:
        taken = LOSSES[cls.key].__name__ if cls.key in LOSSES else "a group of losses"
        raise SplError(f"loss key {cls.key!r} is taken ({taken}): give {cls.__name__} another")
    REGISTRY.append(cls)
    LOSSES[cls.key] = cls
    for group, member in (("all", True), ("paper", cls.in_paper), ("vlm", cls.reads_scores)):
        if member:
            GROUPS[group].append(cls.key)
    return cls


def get_loss(key: str) -> type[Loss]:
    if key not in LOSSES:
        raise SplError(
            f"unknown loss {key!r}; available: {', '.join(LOSSES)} "
            f"(or {', '.join(repr(g) for g in GROUPS)})"
        )
    return LOSSES[key]


def parse_losses(text: str | Iterable[str]) -> list[str]:
    """Loss keys from ``paper`` (the paper's nine), ``all`` (every registered loss), a
    comma list, or a mix (``paper,pr``); duplicates are dropped, order kept."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    keys: list[str] = []
    for item in [t for t in items if t]:
        keys += GROUPS[item] if item in GROUPS else [get_loss(item).key]
    if not keys:
        raise SplError("--losses needs at least one loss")
    return list(dict.fromkeys(keys))


def parse_loss_options(
    items: Iterable[str] | Mapping[str, Mapping[str, Any]], *, where: str = "--loss-option"
) -> dict[str, dict[str, Any]]:
    """Per-loss option overrides, checked against each loss's options dataclass.

    ``items`` are ``key.option=value`` strings (``--loss-option role.estimator_lr_multiplier=5``)
    or a ``{key: {option: value}}`` mapping (a ``[loss_options.<key>]`` table of --config)."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(items, Mapping):
        pairs = [(k, name, v) for k, table in items.items() for name, v in _table(k, table, where)]
    else:
        pairs = []
        for text in items:
            target, sep, value = str(text).partition("=")
            key, dot, name = target.strip().partition(".")
            if not sep or not dot or not key or not name:
                raise SplError(
                    f"{where} {text!r}: write LOSS.OPTION=VALUE, e.g. "
                    "role.estimator_lr_multiplier=5"
                )
            pairs.append((key, name.strip(), value.strip()))
    for key, name, value in pairs:
        try:
            out.setdefault(key, {})[name] = coerce_option(get_loss(key), name, value)
        except SplError as exc:
            raise SplError(f"{where}: {exc}") from None
    return out


def _table(key: str, table: Any, where: str):
    if not isinstance(table, Mapping):
        raise SplError(f"{where}: loss_options.{key} must be a table of option = value")
    return table.items()


def make_losses(
    keys: Iterable[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    context: Context | None = None,
) -> dict[str, Loss]:
    """Loss objects for ``keys`` with their options resolved against ``context``.
    Options for a loss that is not in ``keys`` are refused: they would be silently unused."""
    keys = list(keys)
    options = dict(options or {})
    unused = sorted(set(options) - set(keys))
    if unused:
        raise SplError(
            f"options given for loss {unused[0]!r}, which this run does not train "
            f"(losses: {', '.join(keys)})"
        )
    return {key: get_loss(key).make(options.get(key), context) for key in keys}


def loss(
    key: str,
    logits: torch.Tensor,
    observed: torch.Tensor,
    *,
    epoch: int = 1,
    num_epochs: int | None = None,
    labels: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """A batch's differentiable loss for users' own training loops.

    ``logits [B, L]`` (or ``[..., B, L]`` for stacked heads), ``observed`` in {-1, 0, +1};
    ``epoch`` is 1-based (``num_epochs`` for losses with schedules: GR); ``labels`` the
    full labels for the losses that read them (BCE, BCE-LS, IUN). Keyword options are the
    loss's options (``label_smoothing=0.2``, ``expected_positives=2.9``, ``alpha=0.1``) and
    the per-batch state it needs (ROLE's ``estimates``, the estimator's logits for the
    batch rows; pseudo-negative sampling's ``pseudo_negatives``; EM + APL's
    ``pseudo_targets``, NaN where an entry has no pseudo-label; VLPL's and AEVLP's
    ``pseudo_positives`` and optional ``pseudo_negatives``, [B, L] 0/1 masks). Per-dataset
    defaults are VOC's here: pass the option to use another dataset's.
    """
    cls = get_loss(key)
    state = {name: options.pop(name) for name in cls.batch_state_names if name in options}
    for name in [n for n in options if n not in {f.name for f in fields(cls.Options)}]:
        raise SplError(
            f"loss {key!r} takes no keyword {name!r}; its options: {describe_options(cls)}; "
            f"its batch state: {', '.join(cls.batch_state_names) or 'none'}"
        )
    options = {name: coerce_option(cls, name, value) for name, value in options.items()}
    instance = cls.make(options, Context(num_classes=logits.shape[-1]))
    observed = torch.as_tensor(observed, device=logits.device).to(logits.dtype)
    if labels is not None:
        labels = torch.as_tensor(labels, device=logits.device).to(logits.dtype)
    batch = Batch(observed=observed, labels=labels, epoch=epoch, num_epochs=num_epochs, state=state)
    return instance.batch_loss(logits, batch)
