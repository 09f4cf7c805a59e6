"""``spl reproduce``, its plan: the settings (:class:`Plan`) and the cells the tables need.

A *cell* is one (kind, dataset, row) under one protocol (the observed set that trains it,
the val labels that select it); kind is ``linear``, ``recovery`` or ``finetune``. Its result
record (``tables/cells/...json``) holds the options it was computed with: a cell whose
record matches them is done, one whose record differs is stale, and the rest are missing
(:func:`plan_cells`). What the plan cannot do is refused here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from spl.data import protocol
from spl.data.common import SplError
from spl.fit.losses import LOSSES, PAPER_LOSSES, SINCE_2021, VISION_LANGUAGE
from spl.fit.losses.base import SINGLE_POSITIVE, WITH_NEGATIVES
from spl.fit.recipes import RECIPES, source_recipe
from spl.settings import BIAS_KINDS, ExtractSettings, FinetuneSettings, ReproduceSettings
from spl.settings_fields import parse_value, setting, to_args

RECOVERY_LOSSES = ("an", "an_ls", "role")
LINEARINIT = tuple(protocol.LINEARINIT)
SINCE_REFERENCE = ("an", "role")  # the paper's rows in the since-2021 table
BIAS_DATASET = "coco14"  # the biased draws read COCO's instance annotations


@dataclass
class Plan(ReproduceSettings):
    """What to reproduce and how (the command's settings, and what only code sets);
    defaults are the paper's protocol."""

    linear_losses: list[str] = setting(
        factory=lambda: list(PAPER_LOSSES), cli=False, help="Rows of the linear table."
    )
    extract_options: dict = setting(
        factory=dict, cli=False, help="Other `spl extract` settings by field name."
    )
    finetune_options: dict = setting(
        factory=dict,
        cli=False,
        help="Other `spl finetune` settings by field name (the demo: {'batchnorm': 'frozen'}).",
    )

    def __post_init__(self) -> None:
        if self.finetune_losses is None:
            self.finetune_losses = [*PAPER_LOSSES, *(f"{k}+linearinit" for k in LINEARINIT)]
        if self.since_losses is None:
            # VLPL and AEVLP need a vision-language model's scores: rows only with --scores
            external = list(VISION_LANGUAGE) if self.scores else []
            self.since_losses = [*SINCE_2021, *external, *SINCE_REFERENCE]
        if self.jobs is None:
            self.jobs = 1
        self.root, self.runs, self.out = Path(self.root), Path(self.runs), Path(self.out)
        if self.clicks is not None:
            self.clicks = Path(self.clicks)
        self.extract_options = other_settings(ExtractSettings, self.extract_options, "extract")
        self.finetune_options = other_settings(FinetuneSettings, self.finetune_options, "finetune")

    @property
    def finetune_extra(self) -> list[str]:
        """The fine-tunes' other settings as flags: what their cells record (``extra``)."""
        return to_args(FinetuneSettings(**self.finetune_options))

    @property
    def observed_name(self) -> str:
        """The observed set of the plan's protocol (``--observed``, resolved)."""
        return bias_set(self.observed, self.observed_seed)

    @property
    def default_protocol(self) -> bool:
        return not protocol_suffix(self.observed_name, self.val)

    def bias_kinds(self) -> list[str]:
        """The label-bias table's columns: semantic only with the click files."""
        return [k for k in BIAS_KINDS if k != "semantic" or self.clicks is not None]

    @functools.cached_property
    def tag(self) -> str:
        """The feature tag of the backbone: resolved without building the model, so that
        planning works offline."""
        from spl.extract.backbones import backbone_tag, weights_id

        if self.weights is not None and Path(self.weights).is_file():
            resolved = weights_id(self.backbone, weights_path=self.weights)
        else:
            resolved = weights_id(self.backbone, self.weights)
        return backbone_tag(self.backbone, resolved, self.image_size)


# the settings of the jobs' commands that the plan sets itself (from its own settings)
PLANNED = {
    "extract": {"backbone", "weights", "image_size", "device"},
    "finetune": {"loss", "recipe", "init_from", "backbone", "weights", "weights_path",
                 "image_size", "lrs", "batch_sizes", "epochs", "seeds", "observed", "val",
                 "scores", "device"},
}  # fmt: skip


def other_settings(cls: type, values: dict, command: str) -> dict:
    """``{field: value}`` for the settings of ``spl <command>`` the plan does not set
    itself, each checked by its parser."""
    fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli")}
    for name in values:
        if name not in fields or name in PLANNED[command]:
            free = sorted(fields - PLANNED[command])
            raise SplError(
                f"{command}_options: {name!r} is not a setting of `spl {command}` the plan "
                f"leaves free; those are: {', '.join(free)}"
            )
    return {k: parse_value(cls, k, v, f"{command}_options[{k!r}]") for k, v in values.items()}


def bias_set(observed: str, seed: int) -> str:
    """The observed-set name of ``--observed``: a draw's kind (uniform, size, location,
    semantic) with its seed, or a set's name as given."""
    if observed == "uniform":
        return protocol.observed_set_name(
            protocol.NUM_POSITIVES, protocol.NUM_NEGATIVES, seed
        )  # fmt: skip
    if observed in BIAS_KINDS:
        return protocol.observed_set_name(1, 0, seed, bias=observed)
    return observed


@dataclass
class Cell:
    table: str  # what computes it: linear | recovery | finetune
    dataset: str
    loss: str  # a loss key, '<key>+linearinit' or '<key>+source' (the method's own recipe)
    options: dict
    observed: str = protocol.OBSERVED
    val: str = "full"
    record: dict | None = None
    status: str = "missing"  # done | missing | stale
    why: str = ""

    @property
    def path_parts(self) -> tuple[str, str, str]:
        return (self.table, self.dataset, self.loss.replace("+", "_"))

    @property
    def protocol_dir(self) -> str:
        """'' under the paper's protocol (the cell paths of earlier versions), else a folder
        naming the observed set and the val labels."""
        return protocol_suffix(self.observed, self.val)


def protocol_suffix(observed: str, val: str) -> str:
    """'' under the paper's protocol, else what names the protocol in cell folders and
    table and figure file names (``size-p1-s1200.val-observed``): the paper's protocol
    keeps the names of earlier versions."""
    if observed == protocol.OBSERVED and val == "full":
        return ""
    return f"{observed}.val-{val}"


# --------------------------------------------------------------------------- cells


def cell_path(plan: Plan, cell: Cell) -> Path:
    table, dataset, loss = cell.path_parts
    folder = plan.out / "cells" / cell.protocol_dir if cell.protocol_dir else plan.out / "cells"
    return folder / table / dataset / f"{loss}.json"


def _prepared_facts(plan: Plan, dataset: str) -> tuple[str, frozenset[str]] | None:
    """(fingerprint, observed set names) of a prepared dataset, None when not prepared;
    ``labels.h5`` is read once per version of the file (an observe job adds sets), not
    once per question: planning asks several times, and COCO's file takes seconds."""
    labels = plan.root / dataset / "labels.h5"
    if not labels.exists():
        return None
    stat = labels.stat()
    return _read_prepared_facts(str(labels.parent), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_prepared_facts(
    folder: str, inode: int, mtime_ns: int, size: int
) -> tuple[str, frozenset[str]]:
    from spl.data.prepared import load_prepared

    prepared = load_prepared(Path(folder))
    return prepared.fingerprint, frozenset(prepared.observed)


def observed_sets_in(plan: Plan, dataset: str) -> set[str] | None:
    facts = _prepared_facts(plan, dataset)
    return None if facts is None else set(facts[1])


def fingerprint_of(plan: Plan, dataset: str) -> str | None:
    facts = _prepared_facts(plan, dataset)
    return None if facts is None else facts[0]


def cell_options(
    plan: Plan, table: str, dataset: str, loss: str, fingerprint: str | None,
    observed: str = protocol.OBSERVED, val: str = "full",
) -> dict:  # fmt: skip
    """The options a cell's value depends on: a stored record with others is stale. The
    protocol is named only when it is not the paper's (records of earlier versions stay
    valid)."""
    base: dict = {"dataset_fingerprint": fingerprint, "feature_tag": plan.tag, "seeds": plan.seeds}
    if protocol_suffix(observed, val):
        base.update({"observed": observed, "val": val})
    if LOSSES[loss.partition("+")[0]].reads_scores:
        base["scores"] = plan.scores
    if table in ("linear", "recovery"):
        return {**base, "lrs": plan.linear_lrs, "batch_sizes": plan.linear_batch_sizes,
                "epochs": plan.linear_epochs}  # fmt: skip
    key, _, variant = loss.partition("+")
    if variant == "source":
        # as JSON stores it (tuples become lists), so that a stored record compares equal
        recipe = json.loads(json.dumps(dataclasses.asdict(source_recipe(key, dataset))))
        return {**base, "recipe": recipe, "extra": plan.finetune_extra}
    options = {**base, "lrs": plan.finetune_lrs, "batch_sizes": plan.finetune_batch_sizes,
               "epochs": plan.finetune_epochs, "extra": plan.finetune_extra}  # fmt: skip
    if variant == "linearinit":
        options["linear_phase"] = linearinit_settings(key, dataset, plan)
    return options


def linearinit_settings(loss: str, dataset: str, plan: Plan) -> dict:
    """LinearInit's fixed linear phase (docs/protocol.md section 5), with its dataset exceptions."""
    fixed = protocol.LINEARINIT[loss]
    return {
        "lr": fixed["lr"],
        "batch_size": fixed["batch_size_for"].get(dataset, fixed["batch_size"]),
        "epochs": plan.linear_epochs,
    }


def since_row_key(loss: str) -> str:
    """The fine-tuned cell of a since-2021 row: the method's own recipe, or the paper's for
    the paper's losses."""
    return f"{loss}+source" if loss in RECIPES else loss


def trains_under(loss: str, observed: str) -> bool:
    """Whether a linear/fine-tuned row belongs to a table made under ``observed``: a loss
    that trains on observed negatives (IU) has no place under another single-positive draw
    (its negatives come from the paper's uniform set)."""
    key = loss.partition("+")[0]
    return observed == protocol.OBSERVED or LOSSES[key].trains_on != WITH_NEGATIVES


def label_bias_rows(plan: Plan) -> list[str]:
    """The label-bias table's rows: the losses that learn from the single positives alone
    (not the full-label baselines, not IU)."""
    return [
        k for k in plan.linear_losses
        if LOSSES[k].trains_on == SINGLE_POSITIVE and not LOSSES[k].reads_labels
    ]  # fmt: skip


def wanted_cells(plan: Plan, dataset: str) -> list[tuple[str, str, str]]:
    """(kind, row, observed set) of every cell the plan's tables need on ``dataset``."""
    observed = plan.observed_name
    wanted: list[tuple[str, str, str]] = []
    if "linear" in plan.tables:
        wanted += [("linear", k, observed) for k in plan.linear_losses if trains_under(k, observed)]
    if "recovery" in plan.tables:
        wanted += [("recovery", k, observed) for k in RECOVERY_LOSSES]
    if "finetune" in plan.tables:
        wanted += [
            ("finetune", k, observed) for k in plan.finetune_losses if trains_under(k, observed)
        ]
    if "since-2021" in plan.tables:
        wanted += [("linear", k, observed) for k in plan.since_losses]
        wanted += [("finetune", since_row_key(k), observed) for k in plan.since_losses]
    if "label-bias" in plan.tables and dataset == BIAS_DATASET:
        for kind in plan.bias_kinds():
            drawn = bias_set(kind, plan.observed_seed)
            wanted += [("linear", k, drawn) for k in label_bias_rows(plan)]
    return list(dict.fromkeys(wanted))


def plan_cells(plan: Plan) -> list[Cell]:
    if "label-bias" in plan.tables and BIAS_DATASET not in plan.datasets:
        raise SplError(
            f"--table label-bias needs {BIAS_DATASET} among --datasets: the biased draws read "
            "COCO's instance annotations"
        )
    if plan.observed == "semantic" and plan.clicks is None:
        raise SplError(
            "--observed semantic needs --clicks DIR, the folder with COCO's crowdsourced "
            "click files (docs/biased-labels.md)"
        )
    readers = [k for k in plan.since_losses if LOSSES[k].reads_scores]
    if "since-2021" in plan.tables and readers and not plan.scores:
        raise SplError(
            f"{', '.join(readers)} train on a vision-language model's pseudo-labels: pass "
            "--scores TAG (a file written by `spl pseudo-labels ROOT/<dataset>`; docs/scores.md)"
        )
    cells = []
    for dataset in plan.datasets:
        fingerprint = fingerprint_of(plan, dataset)
        wanted = wanted_cells(plan, dataset)
        check_drawable(plan, dataset, {observed for _, _, observed in wanted})
        for table, loss, observed in wanted:
            options = cell_options(plan, table, dataset, loss, fingerprint, observed, plan.val)
            cell = Cell(table, dataset, loss, options, observed, plan.val)
            path = cell_path(plan, cell)
            if path.exists():
                record = json.loads(path.read_text())
                if record.get("options") == options:
                    cell.record, cell.status = record, "done"
                else:
                    cell.status = "stale"
                    cell.why = _differences(record.get("options", {}), options)
            cells.append(cell)
    return cells


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    )


BIASED = re.compile(r"(size|location|semantic)-p1-s(\d+)")
UNIFORM = re.compile(r"uniform-p(\d+|all)-n(\d+|all)-s(\d+)")


def check_drawable(plan: Plan, dataset: str, names: set[str]) -> None:
    """Refuse, before anything runs, an observed set the plan needs on ``dataset`` that its
    labels.h5 lacks and that no ``spl data observe`` could add there: a biased draw reads
    COCO 2014's instance annotations (and clicks), which only coco14 has."""
    present = observed_sets_in(plan, dataset) or set()
    for name in sorted(names - present):
        biased = BIASED.fullmatch(name)
        if biased and dataset != BIAS_DATASET:
            raise SplError(
                f"--observed {plan.observed}: {dataset} has no observed set {name!r}, and its "
                f"draw (`spl data observe --bias {biased[1]}`) reads COCO 2014's instance "
                f"annotations, which only {BIAS_DATASET} has. Use --datasets {BIAS_DATASET} "
                f"for a biased draw, or --observed uniform (or a set in {dataset}'s labels.h5)"
            )
        if biased and biased[1] == "semantic" and plan.clicks is None:
            raise SplError(
                f"{dataset} has no observed set {name!r}: its draw reads COCO's crowdsourced "
                "click files; pass --clicks DIR (docs/biased-labels.md)"
            )
        if not biased and not UNIFORM.fullmatch(name) and fingerprint_of(plan, dataset):
            raise SplError(
                f"observed set {name!r} is not in {plan.root / dataset / 'labels.h5'} and its "
                "name does not say how to draw it: add it with `spl data observe` first"
            )
