"""One training job for both training commands (``spl fit-linear`` and ``spl finetune``).

:func:`training_inputs` resolves, once and before any run directory exists, what a run
trains on: the losses with their options (checked), the observed sets they train on, the
rows left out (unreadable images), the val labels that select epochs and configurations,
the scores file and the training rows' pseudo-labels, and the record both commands write in
``config.json``. :func:`open_run` then creates or resumes the run and says where it is;
each check is made here, once (the batch-size rule: :func:`check_batch_sizes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spl.data import protocol
from spl.data.common import SplError, write_text_atomic
from spl.data.labels import CSR, SparseRows
from spl.data.prepared import PreparedDataset
from spl.extract.scores import ScoreSet, load_scores
from spl.fit.losses import (
    LOSSES,
    SINGLE_POSITIVE,
    VISION_LANGUAGE,
    WITH_NEGATIVES,
    Context,
    Loss,
    Scores,
    make_losses,
)
from spl.fit.pseudo_labels import QUALITY_COLUMNS, pseudo_label_quality
from spl.runs import Run

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _Resolved:
    """What a run trains on that does not depend on which rows it trains on."""

    prepared: PreparedDataset
    settings: Any  # LinearSettings or FinetuneSettings (with its recipe applied)
    losses: dict[str, Loss]  # options resolved; the score readers with the training scores
    context: Context
    observed_sets: dict[str, str]  # trains_on -> the observed set's name
    score_set: ScoreSet | None
    processes: int  # of the torchrun job: a batch is split over them


@dataclass(frozen=True)
class TrainingInputs(_Resolved):
    """What a training run trains on, resolved and checked (:func:`training_inputs`)."""

    excluded: dict[str, np.ndarray]  # rows of each source file left out (unreadable images)
    rows: dict[str, np.ndarray]  # rows of the source file per split, without those
    # trains_on -> the training rows' observed labels (a CSR for a sparse labels.h5)
    observed: dict[str, np.ndarray | CSR]
    selection_labels: np.ndarray  # of the val rows: what selects epochs and configurations
    scores: Scores | None  # the training rows' scores
    pseudo: dict[str, np.ndarray]  # per score-reading loss, its training rows' pseudo-positives

    def labels(self, split: str) -> np.ndarray:
        """The full labels of a split's rows."""
        return self.prepared.labels[self.prepared.rows(split)[0]][self.rows[split]]

    def label_matrix(self, split: str) -> np.ndarray | CSR:
        """The full labels (0/1) of a split's rows as the engine reads them: the dense
        :meth:`labels`, or for a sparse labels.h5 a CSR of the positives (memory in
        proportion to the stored entries, not to rows x classes)."""
        matrix = self.prepared.labels[self.prepared.rows(split)[0]]
        if isinstance(matrix, SparseRows):
            return csr_rows(matrix, self.rows[split], "positive")
        return matrix[self.rows[split]]

    def known(self, split: str) -> np.ndarray | CSR | None:
        """The verified entries of a split's rows (a partially labelled dataset: bool, or a
        CSR whose stored entries are the verified ones); None when every entry is known."""
        states = self.prepared.states
        if states is None:
            return None
        matrix = states[self.prepared.rows(split)[0]]
        if isinstance(matrix, SparseRows):
            return csr_rows(matrix, self.rows[split], "known")
        return matrix[self.rows[split]] != 0

    @property
    def excluded_counts(self) -> dict[str, int]:
        return {s: len(self.prepared.rows(s)[1]) - len(self.rows[s]) for s in SPLITS}

    def with_excluded(self, excluded: dict[str, np.ndarray]) -> TrainingInputs:
        """The same inputs without more rows (a fine-tune's image cache found more unreadable
        images); everything that depends on the rows is checked and computed again."""
        if all(np.array_equal(excluded[s], self.excluded[s]) for s in self.excluded):
            return self
        return _with_rows(self, excluded)

    def scores_record(self) -> dict | None:
        """What a run records of its scores file, with a digest of each loss's pseudo-labels
        (which --resume checks again)."""
        if self.score_set is None:
            return None
        keys = ("scorer", "weights", "weights_sha256", "prompt", "grid", "image_size",
                "normalize", "created", "imported_from")  # fmt: skip
        digests = {
            key: hashlib.sha256(np.packbits(positives).tobytes()).hexdigest()
            for key, positives in self.pseudo.items()
        }
        return {"tag": self.score_set.tag, **{k: self.score_set.attrs.get(k) for k in keys},
                "pseudo_positives_sha256": digests}  # fmt: skip

    def record(self, source: dict, runtime: dict, extra: dict | None = None) -> dict:
        """``config.json`` of a new run: the dataset, ``source`` (the features or backbone it
        reads), the settings and the resolved loss options, ``extra`` (the command's own),
        the rows left out, ``runtime`` (processes, device) and the scores file."""
        prepared = self.prepared
        return {
            "dataset": str(prepared.path.parent.resolve()),
            "dataset_name": prepared.name,
            "dataset_fingerprint": prepared.fingerprint,
            **source,
            "settings": dataclasses.asdict(self.settings),
            "loss_options": {k: dataclasses.asdict(v.options) for k, v in self.losses.items()},
            **(extra or {}),
            "expected_positives": self.context.expected_positives,
            "excluded_bad_rows": self.excluded_counts,
            "classes": prepared.classes,
            **runtime,
            "scores": self.scores_record(),
        }


def training_inputs(
    prepared: PreparedDataset,
    settings,
    keys: list[str],
    excluded: dict[str, np.ndarray],
    *,
    processes: int = 1,
) -> TrainingInputs:
    """Resolve and check what a run of the losses ``keys`` trains on, without the
    ``excluded`` rows (per source file), before a run exists; ``processes``: of the
    torchrun job."""
    context = loss_context(prepared, settings)
    losses = resolve_losses(prepared, settings, keys, context)
    observed_sets = observed_sets_of(prepared, settings, losses)
    score_set = load_training_scores(prepared, settings, losses)
    resolved = _Resolved(prepared, settings, losses, context, observed_sets, score_set, processes)
    return _with_rows(resolved, excluded)


def _with_rows(resolved: _Resolved, excluded: dict[str, np.ndarray]) -> TrainingInputs:
    """The inputs without the ``excluded`` rows: each split's rows, checked (none empty, the
    batch-size rule), and what is read or computed from them."""
    prepared, settings = resolved.prepared, resolved.settings
    rows = {}
    for split in SPLITS:
        source, split_rows = prepared.rows(split)
        rows[split] = split_rows[~np.isin(split_rows, excluded[source])]
        if len(rows[split]) == 0:
            raise SplError(
                f"the {split} split of {prepared.path} has no rows left: every image of it is "
                "recorded as unreadable"
            )
    check_batch_sizes(settings.batch_sizes, len(rows["train"]), resolved.processes)
    observed = {
        kind: _observed_rows(prepared.observed_set(name)["trainval"], rows["train"])
        for kind, name in resolved.observed_sets.items()
    }
    scores = training_scores(resolved.score_set, rows["train"])
    losses = dict(resolved.losses)
    if scores is not None:  # a score reader computes its pseudo-labels from these rows' scores
        for key, loss in losses.items():
            if loss.reads_scores:
                losses[key] = type(loss)(
                    loss.options, dataclasses.replace(loss.context, scores=scores)
                )
    pseudo = {
        key: loss.pseudo_labels(_float(observed[loss.trains_on]), scores)[0].numpy()
        for key, loss in losses.items()
        if scores is not None and loss.reads_scores
    }
    base = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(_Resolved)}
    return TrainingInputs(  # the losses: with the scores of these rows
        **{**base, "losses": losses},
        excluded={source: np.asarray(r) for source, r in excluded.items()},
        rows=rows,
        observed=observed,
        selection_labels=settings.selection_labels(prepared, rows["val"]),
        scores=scores,
        pseudo=pseudo,
    )


def _float(array: np.ndarray | CSR) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dense(array), dtype=np.float32))


def dense(matrix: np.ndarray | CSR) -> np.ndarray:
    """A label matrix as a dense array (a CSR expanded)."""
    return matrix.to_dense() if isinstance(matrix, CSR) else matrix


def _observed_rows(matrix, rows: np.ndarray) -> np.ndarray | CSR:
    """An observed set's training rows: dense as stored, a CSR for a sparse labels.h5."""
    if isinstance(matrix, SparseRows):
        return csr_rows(matrix, rows, "values")
    return matrix[rows]


def csr_rows(matrix: SparseRows, rows: np.ndarray, view: str) -> CSR:
    """``rows`` of a stored CSR matrix under a view (:class:`~spl.data.labels.SparseRows`):
    ``values`` as stored, ``positive`` the +1 entries as 1, ``known`` every stored entry as
    1 (read as True)."""
    part = matrix.csr().take(np.asarray(rows, dtype=np.int64))
    if view == "values":
        return part
    keep = part.values == 1 if view == "positive" else part.values != 0
    row_of = np.repeat(np.arange(part.shape[0]), np.diff(part.indptr))
    return CSR.from_entries(
        row_of[keep], part.indices[keep], np.ones(int(keep.sum()), np.int8), part.shape
    )


def check_batch_sizes(batch_sizes: list[int], train_rows: int, processes: int = 1) -> None:
    """The batch-size rule of both training commands: an epoch's batches are full (the last
    partial one is dropped, docs/protocol.md section 5), so a batch size above the training rows
    leaves an epoch without a batch; under torchrun a batch size is the global batch, each
    of the processes taking an equal share."""
    if train_rows < max(batch_sizes):
        raise SplError(
            f"the train split has {train_rows} rows, fewer than batch size "
            f"{max(batch_sizes)}: an epoch would have no batch. Use smaller "
            f"--batch-sizes (smallest given: {min(batch_sizes)})"
        )
    for size in batch_sizes:
        if size % processes:
            raise SplError(
                f"batch size {size} is the global batch: it must divide by the {processes} "
                "processes of this torchrun job"
            )


def loss_context(prepared: PreparedDataset, settings) -> Context:
    k = settings.expected_positives
    return Context(
        num_classes=prepared.num_classes,
        expected_positives=prepared.expected_positives if k is None else k,
        dataset=prepared.name,
    )


def resolve_losses(
    prepared: PreparedDataset, settings, keys: list[str], context: Context
) -> dict[str, Loss]:
    """The run's loss objects, with their options resolved against the dataset and checked:
    option values, schedules that must fit in the run's epochs, and losses that assume
    single positives against observed sets with negatives."""
    losses = make_losses(keys, settings.loss_options, context)
    for key, loss in losses.items():
        loss.check_epochs(settings.epochs)
        name = settings.observed_for(loss.trains_on)
        negatives = prepared.observed_params.get(name, {}).get("num_neg", 0)
        if loss.single_positive_only and negatives:
            raise SplError(
                f"{key} assumes single positives (no observed negatives), but the observed set "
                f"{name!r} has {negatives if negatives != -1 else 'all'} negatives per image; "
                f"pass --observed with a set drawn with --num-neg 0 (e.g. {protocol.OBSERVED})"
            )
    return losses


def observed_sets_of(
    prepared: PreparedDataset, settings, losses: dict[str, Loss]
) -> dict[str, str]:
    """The observed set each kind of loss trains on (the single-positive one always: the
    recovery analysis reads it), checked to exist and, for IU, to hold negatives."""
    kinds = [SINGLE_POSITIVE, *(loss.trains_on for loss in losses.values())]
    sets = {}
    for kind in dict.fromkeys(kinds):
        name = settings.observed_for(kind)
        if kind == WITH_NEGATIVES:
            check_negatives(prepared, name, [k for k, v in losses.items() if v.trains_on == kind])
        prepared.observed_set(name)  # refused, naming the sets there, when it is missing
        sets[kind] = name
    return sets


def check_negatives(prepared: PreparedDataset, name: str, losses: list[str]) -> None:
    """Losses that train on observed negatives need a set that has them."""
    available = [n for n, p in prepared.observed_params.items() if p.get("num_neg", 0) != 0]
    who = ", ".join(losses)
    if name not in prepared.observed:
        raise SplError(
            f"{who} trains on observed negatives, but {prepared.path} has no observed set "
            f"{name!r}; sets with negatives: {', '.join(available) or 'none'}. Pass "
            f"--observed-iu with one of them, or add one with `spl data observe "
            f"{prepared.path.parent} --num-pos 1 --num-neg 1`"
        )
    if name not in available:
        raise SplError(
            f"{who} trains on observed negatives, but the set {name!r} has none; use "
            f"--observed-iu with a set that has (num_neg >= 1): {', '.join(available) or 'none'}"
        )


def load_training_scores(
    prepared: PreparedDataset, settings, losses: dict[str, Loss]
) -> ScoreSet | None:
    """The scores file of ``--scores`` for the losses that train on pseudo-labels from a
    vision-language model, checked: refused when such a loss has no ``--scores``, when no
    loss of the run reads it, when the file is missing or was made from another prepared
    dataset, and when it lacks what a loss needs (AEVLP's tiles)."""
    readers = [key for key, loss in losses.items() if loss.reads_scores]
    tag = getattr(settings, "scores", None)
    folder = prepared.path.parent / "scores"
    if readers and tag is None:
        available = sorted(p.stem for p in folder.glob("*.h5"))
        raise SplError(
            f"{', '.join(readers)} {'trains' if len(readers) == 1 else 'train'} on "
            "pseudo-labels from a vision-language model's "
            f"scores: pass --scores TAG, the file {folder}/TAG.h5 (tags there: "
            f"{', '.join(available) or 'none'}). Make one with `spl pseudo-labels "
            f"{prepared.path.parent}` or `spl import-scores {prepared.path.parent} ...`"
        )
    if tag is None:
        return None
    if not readers:
        raise SplError(
            f"--scores {tag}: no loss of this run reads scores (those that do: "
            f"{', '.join(VISION_LANGUAGE)})"
        )
    try:
        score_set = load_scores(prepared, tag)
    except SplError as exc:
        raise SplError(f"--scores {tag}: {exc}") from None
    whole = Scores(
        torch.from_numpy(score_set.scores["trainval"]),
        None if score_set.tiles is None else torch.from_numpy(score_set.tiles["trainval"]),
        tag,
    )
    for key in readers:
        losses[key].check_scores(whole, str(score_set.path))
    return score_set


def training_scores(score_set: ScoreSet | None, rows: np.ndarray) -> Scores | None:
    """The scores of the training ``rows`` (of the trainval file), in their order."""
    if score_set is None:
        return None

    def take(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array[rows], dtype=np.float32))

    tiles = None if score_set.tiles is None else take(score_set.tiles["trainval"])
    return Scores(take(score_set.scores["trainval"]), tiles, score_set.tag)


# --------------------------------------------------------------------------- the run


def open_run(
    inputs: TrainingInputs,
    parent: Path,
    kind: str,
    record: dict,
    *,
    resume: Path | None = None,
    run_file: Path | None = None,
    procs=None,
) -> Run:
    """A new run under ``parent`` recording ``record`` in config.json, or the interrupted
    run ``resume`` (refused when its pseudo-labels differ from these); its path is then
    written to ``run_file``. Under torchrun (``procs``) only rank 0 writes, and every rank
    learns the path rank 0 created."""
    writes = procs is None or procs.rank == 0
    if resume is None:
        run = Run.create(parent, kind, record, writes=writes)
        if procs is not None:
            run.at(Path(procs.broadcast(str(run.path))))
    else:
        run = Run.resume(resume, kind, writes=writes)
        check_resumed_scores(run, inputs.scores_record())
    if run_file is not None and writes:
        write_text_atomic(Path(run_file), f"{run.path}\n")
    return run


def check_resumed_scores(run: Run, record: dict | None) -> None:
    """A resumed run must train on the pseudo-labels it started with."""
    saved = (run.config.get("scores") or {}).get("pseudo_positives_sha256")
    now = (record or {}).get("pseudo_positives_sha256")
    if saved is not None and saved != now:
        raise SplError(
            f"--resume {run.path}: the pseudo-labels from --scores {record['tag']} differ from "
            f"those the run started with (the scores file was rebuilt since, created "
            f"{run.config['scores'].get('created')}, now {record.get('created')}); start a "
            "new run"
        )


def write_pseudo_labels(run: Run, inputs: TrainingInputs) -> str:
    """pseudo_labels.csv and .json in the run: per loss and class, its pseudo-positives on
    the training rows against their hidden full labels
    (:func:`spl.fit.pseudo_labels.pseudo_label_quality`); returns the summary.md section."""
    rows: list[dict] = []
    labels = inputs.labels("train")
    for key, positives in inputs.pseudo.items():
        observed = dense(inputs.observed[LOSSES[key].trains_on])
        rows += pseudo_label_quality(positives, observed, labels, inputs.prepared.classes, key)
    if not rows:
        return ""
    run.write_csv("pseudo_labels.csv", rows, QUALITY_COLUMNS)
    run.write_json("pseudo_labels.json", rows)

    def cell(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [
        f"\n## Pseudo-labels (scores `{inputs.settings.scores}`)\n",
        f"Computed once from the scores file for the {len(inputs.rows['train'])} training rows "
        "(no random flip, no graph network: docs/scores.md); precision and recall (%) of the "
        "pseudo-positives against the hidden full labels, overall and on the unobserved "
        "entries, where they are trained on. Per class: pseudo_labels.csv.\n",
        "| loss | pseudo-positives | precision | recall | unobserved | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["class"] == "(all)":
            lines.append(
                f"| {row['loss']} | {row['pseudo_positives']} | {cell(row['precision'])} | "
                f"{cell(row['recall'])} | {row['unobserved_pseudo_positives']} | "
                f"{cell(row['unobserved_precision'])} | {cell(row['unobserved_recall'])} |"
            )
    return "\n".join(lines) + "\n"
