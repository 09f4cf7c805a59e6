"""The stacked engine against each head trained alone with torch.optim.Adam in a plain loop.

The registry-wide checks are plain functions of loss keys (:func:`check_engine_equals_plain_loop`,
:func:`check_export_is_the_best_epochs_state`): the parametrized tests call them with every
registered loss, and tests/test_loss_interface.py with a loss registered at run time. They
drive a loss through its own ``value`` and hooks only, so that a new loss needs no change
here; the hand-written references of the stateful methods have their own test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spl.data.common import SplError, temporary_path
from spl.data.runtime import generator
from spl.data.sampling import observe_uniform
from spl.evaluate.metrics import mean_average_precision
from spl.fit import fused
from spl.fit.engine import StackedHeads, epoch_batches, initial_head
from spl.fit.losses import (
    LOSSES,
    WITH_NEGATIVES,
    Batch,
    Context,
    Scores,
    estimator_init,
    get_loss,
    make_losses,
    pseudo_negative_mask,
)

K = 1.6  # expected positives of the synthetic data's losses


def estimator_generator(seed):
    return generator(seed, 0, "estimator")


def synthetic(n=120, d=16, num_classes=5, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(num_classes, d)
    labels = (rng.rand(n, num_classes) < 0.35).astype(np.uint8)
    labels[np.arange(n), rng.randint(0, num_classes, n)] = 1
    X = labels @ centers + 0.5 * rng.randn(n, d)
    return X.astype(np.float32), labels


# APL labels after every epoch of the short runs here; LL-Cp flips ceil(8 x 5 x 10%) - 1
# entries a batch from epoch 2 (at its default 0.1% it flips none of a 40-entry batch);
# AEVLP's DAMP on 2 x 2 tiles.
OPTIONS = {"em_apl": {"warmup": 1}, "ll_cp": {"delta_rel": 10.0},
           "gpr": {"grid": 2, "threshold": 0.3}}  # fmt: skip


def vision_language_scores(labels, seed=0):
    """Cosines that lean towards the true labels, for the losses with pseudo-labels."""
    rng = np.random.RandomState(seed)
    image = 0.2 + 0.05 * labels + 0.02 * rng.randn(*labels.shape)
    tiles = image[:, None] + 0.03 * rng.randn(len(labels), 4, labels.shape[1])
    return Scores(torch.tensor(image), torch.tensor(tiles))


def _data():
    X, labels = synthetic()
    observed = observe_uniform(labels, 1, 0, 1200)
    observed_iu = observe_uniform(labels, 1, 1, 1200)
    return X, labels, observed, observed_iu


def _options(keys):
    return {k: v for k, v in OPTIONS.items() if k in keys} or None


def _linear_head(X, num_classes, seed):
    head = torch.nn.Linear(X.shape[1], num_classes).double()
    weight, bias = initial_head(X.shape[1], num_classes, seed)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


# ----------------------------------------------------------------- the registry-wide check


def plain_loop(key, lr, bs, seed, epochs, X, observed, labels, observed_iu):
    """One head alone, its loss driven through its own value and hooks: nn.Linear and
    torch.optim.Adam (default settings) on the same batches; the loss's state from
    ``init_state`` for one head, a batch's rows of it from ``batch_state``,
    ``on_epoch_start`` before an epoch, ``after_step`` after each step (with the step's
    logits), ``on_epoch_end`` after an epoch (with the head's probabilities on the training
    rows when ``wants_scores``), and its ``trainable`` tensors trained by the same Adam at
    lr x ``lr_multiplier``. Returns (weight, bias, state)."""
    X = torch.tensor(X, dtype=torch.float64)
    num_classes = observed.shape[1]
    context = Context(num_classes, K, None, vision_language_scores(labels))
    loss = get_loss(key).make(OPTIONS.get(key), context)
    negatives = loss.trains_on == WITH_NEGATIVES
    obs = torch.tensor(observed_iu if negatives else observed, dtype=torch.float64)
    full = torch.tensor(labels, dtype=torch.float64)
    head = _linear_head(X, num_classes, seed)
    state = loss.init_state(obs, heads=1, seed=seed)
    groups = [{"params": head.parameters(), "lr": lr}]
    for name in loss.trainable:
        state[name].requires_grad_(True)
        groups.append({"params": [state[name]], "lr": lr * loss.lr_multiplier(name)})
    optimizer = torch.optim.Adam(groups)
    for epoch in range(1, epochs + 1):
        loss.on_epoch_start(state, epoch=epoch, num_epochs=epochs, seed=seed)
        for rows in epoch_batches(len(X), bs, seed, epoch - 1):
            batch = Batch(obs[rows], full[rows], epoch, epochs, loss.batch_state(state, rows))
            optimizer.zero_grad()
            logits = head(X[rows])[None]  # [1, B, L]: the heads in front, as the engine's
            loss.batch_loss(logits, batch).sum().backward()
            optimizer.step()
            with torch.no_grad():
                after = Batch(obs[rows], full[rows], epoch, epochs, loss.batch_state(state, rows))
                loss.after_step(state, rows=rows, logits=logits.detach(), batch=after)
        scores = None
        if loss.wants_scores(epoch=epoch, num_epochs=epochs):
            with torch.no_grad():
                scores = torch.sigmoid(head(X))[None]
        loss.on_epoch_end(state, epoch=epoch, num_epochs=epochs, seed=seed, scores=scores)
    return head.weight.detach(), head.bias.detach(), {k: v.detach() for k, v in state.items()}


def check_engine_equals_plain_loop(keys, dtype=torch.float64, tol=1e-9, update="auto"):
    """Every head of a sweep over ``keys`` (two lrs, two batch sizes) against
    :func:`plain_loop`: its weights and every tensor of its loss's state. Returns the
    fitted model."""
    X, labels, observed, observed_iu = _data()
    model = StackedHeads(
        losses=keys, lrs=[1e-2, 1e-3], batch_sizes=[8, 16], seeds=[3], epochs=3,
        expected_positives=K, loss_options=_options(keys), device="cpu", dtype=dtype,
        update=update,
    ).fit(
        X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40], observed_iu=observed_iu,
        scores=vision_language_scores(labels),
    )  # fmt: skip
    assert len(model.heads_) == len(keys) * 4
    for group in model.groups_:
        for index, head in enumerate(group.heads):
            weight, bias, state = plain_loop(
                head.loss, head.lr, head.batch_size, head.seed, 3,
                X, observed, labels, observed_iu,
            )  # fmt: skip
            got = group.weight[index].double()  # [L, D + 1]: the bias is the last column
            np.testing.assert_allclose(got[:, :-1], weight, atol=tol, rtol=0, err_msg=head.name)
            np.testing.assert_allclose(got[:, -1], bias, atol=tol, rtol=0, err_msg=head.name)
            engine_state = group.head_state(index, best=False)
            assert engine_state.keys() == state.keys(), head.name
            for name, expected in state.items():
                value = engine_state[name]
                if expected.dim() == value.dim() + 1:  # per head: the plain loop's one head
                    expected = expected[0]
                np.testing.assert_allclose(
                    value.double().numpy(), expected.double().numpy(), atol=tol * 10, rtol=0,
                    err_msg=f"{head.name}: {name}",
                )  # fmt: skip
    return model


@pytest.mark.parametrize(
    "compiled,update",
    [(True, "inpass"), (True, "gemm"), (True, "auto"), (False, "eager")],
    ids=["compiled-inpass", "compiled-gemm", "compiled-auto", "eager"],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_engine_equals_heads_trained_alone(dtype, tol, compiled, update, monkeypatch):
    """Every registered loss in one sweep: mixed routes in each group."""
    monkeypatch.setenv("SPL_COMPILE", "1" if compiled else "0")
    model = check_engine_equals_plain_loop(list(LOSSES), dtype, tol, update)
    modes = {g.update_mode for g in model.groups_}
    assert modes == ({update} if update != "auto" else modes) and modes <= set(fused.UPDATE_MODES)
    # PR's group has autograd heads too; the weight update is the compiled one either way.
    assert [g.compiled for g in model.groups_] == [compiled] * 2


# ------------------------------------------------- the stateful methods, written out here


def apl_update(targets, scores, observed, counts, remaining):
    """EM + APL's labelling, written out (docs/methods.md section 2): per class the
    int(0.9 U_i / (E - W)) lowest-scored entries still unlabelled get target = score."""
    for cls in range(targets.shape[1]):
        n = int(0.9 * int(counts[cls]) / remaining)
        free = [
            r for r in range(targets.shape[0])
            if observed[r, cls] == 0 and (math.isnan(targets[r, cls]) or targets[r, cls] == 0)
        ]  # fmt: skip
        free.sort(key=lambda r: float(scores[r, cls]))  # stable: ties keep row order
        for r in free[:n]:
            targets[r, cls] = scores[r, cls]


def ll_cp_flips(logits, observed, flipped, rows, delta):
    """LL-Cp's permanent corrections, written out (docs/methods.md section 3): after the step,
    the unobserved entries whose loss is above the batch's k-th largest (strictly)."""
    effective = torch.where(flipped[rows], torch.ones_like(observed[rows]), observed[rows])
    losses = torch.nn.functional.softplus(logits) - effective.clamp(min=0) * logits  # BCE
    ranked = (effective == 0).double() * losses
    k = math.ceil(ranked.numel() * delta)
    threshold = torch.sort(ranked.flatten(), descending=True).values[k - 1]
    flipped[rows] |= ranked > threshold


def written_out_loop(key, lr, bs, seed, epochs, X, observed, labels, observed_iu):
    """One head of a stateful method alone, its state handled by hand: the paper's
    constants written out (ROLE's estimator at 10 x lr, a pseudo-negative fraction of 0.5),
    EM + APL's labelling and LL-Cp's flips (at delta 10%, OPTIONS), VLPL's and AEVLP's
    pseudo-labels computed once from the scores. Returns (weight, bias, state)."""
    X = torch.tensor(X, dtype=torch.float64)
    num_classes = observed.shape[1]
    loss = get_loss(key).make(OPTIONS.get(key), Context(num_classes, K))
    scores = vision_language_scores(labels)
    head = _linear_head(X, num_classes, seed)
    groups = [{"params": head.parameters(), "lr": lr}]
    theta = None
    if key == "role":
        theta = estimator_init(torch.tensor(observed), estimator_generator(seed)).double()
        theta.requires_grad_(True)
        groups.append({"params": [theta], "lr": lr * 10.0})
    optimizer = torch.optim.Adam(groups)
    negatives = loss.trains_on == WITH_NEGATIVES
    obs = torch.tensor(observed_iu if negatives else observed, dtype=torch.float64)
    full = torch.tensor(labels, dtype=torch.float64)
    targets = torch.full(obs.shape, math.nan, dtype=torch.float64)  # EM + APL
    counts = (obs == 0).sum(0)
    flipped = torch.zeros(obs.shape, dtype=torch.bool)  # LL-Cp
    if loss.reads_scores:
        masks = [m.double() for m in loss.pseudo_labels(obs, scores)]
        assert masks[0].sum() > 0  # the pseudo-positive terms are exercised
    for epoch in range(epochs):
        eta = pseudo_negative_mask(tuple(obs.shape), 0.5, seed, epoch + 1)
        for rows in epoch_batches(len(X), bs, seed, epoch):
            state = {"pseudo_negatives": eta.double()[rows], "pseudo_targets": targets[rows],
                     "flipped": flipped[rows]}  # fmt: skip
            if theta is not None:
                state["estimates"] = theta[rows]
            if loss.reads_scores:
                state = {"pseudo_positives": masks[0][rows], "pseudo_negatives": masks[1][rows]}
            batch = Batch(obs[rows], full[rows], epoch + 1, epochs, state)
            optimizer.zero_grad()
            logits = head(X[rows])
            loss.batch_loss(logits, batch).backward()
            optimizer.step()
            if key == "ll_cp" and epoch >= 1:
                ll_cp_flips(logits.detach(), obs, flipped, rows, 10.0 / 100)
        if key == "em_apl":
            with torch.no_grad():
                scores = torch.sigmoid(head(X))
            apl_update(targets, scores, obs, counts, epochs - 1)
    state = {"role": {"theta": theta}, "em_apl": {"pseudo_targets": targets},
             "ll_cp": {"flipped": flipped}, "pseudo_neg": {"pseudo_negatives": eta}}  # fmt: skip
    return head.weight.detach(), head.bias.detach(), state.get(key, {})


@pytest.mark.parametrize("key", ["role", "pseudo_neg", "em_apl", "ll_cp", "em_pl", "gpr"])
def test_stateful_methods_equal_their_written_out_loops(key):
    X, labels, observed, observed_iu = _data()
    model = StackedHeads(
        losses=[key], lrs=[1e-2, 1e-3], batch_sizes=[8, 16], seeds=[3], epochs=3,
        expected_positives=K, loss_options=_options([key]), device="cpu", dtype=torch.float64,
    ).fit(
        X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40], observed_iu=observed_iu,
        scores=vision_language_scores(labels),
    )  # fmt: skip
    for group in model.groups_:
        for index, head in enumerate(group.heads):
            weight, bias, state = written_out_loop(
                key, head.lr, head.batch_size, head.seed, 3, X, observed, labels, observed_iu
            )
            got = group.weight[index]
            np.testing.assert_allclose(got[:, :-1], weight, atol=1e-9, rtol=0)
            np.testing.assert_allclose(got[:, -1], bias, atol=1e-9, rtol=0)
            engine_state = group.head_state(index, best=False)
            for name, expected in state.items():
                np.testing.assert_allclose(engine_state[name].double(), expected.detach(),
                                           atol=1e-8, rtol=0, err_msg=name)  # fmt: skip
            if key == "role":  # dense Adam: rows outside the last batch moved too
                start = estimator_init(torch.tensor(observed), estimator_generator(3))
                assert (engine_state["theta"] != start).all()
            if key == "em_apl":  # labelled after each epoch, never an observed entry
                labelled = ~torch.isnan(engine_state["pseudo_targets"])
                assert labelled.any() and not (labelled & torch.tensor(observed != 0)).any()
            if key == "ll_cp":
                assert engine_state["flipped"].sum() > 0  # the flips are exercised


# ------------------------------------------------------- heads.pt: the best epoch's state


def exporting_losses():
    """The registered losses whose heads export state (heads.pt's ``state``: LinearInit)."""
    X, labels, observed, observed_iu = _data()
    keys = list(LOSSES)
    model = StackedHeads(
        losses=keys, lrs=[1e-2], batch_sizes=[8], epochs=3, expected_positives=K,
        loss_options=_options(keys), device="cpu",
    ).prepare(
        X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40], observed_iu=observed_iu,
        scores=vision_language_scores(labels),
    )  # fmt: skip
    (group,) = model.groups_
    return [head.loss for i, head in enumerate(group.heads) if group.exported_state(i)]


def check_export_is_the_best_epochs_state(key):
    """A head's exported state is its state at its best epoch, whatever the loss: val
    labels all zero give every head mAP 0 each epoch, ties keep the earlier epoch, so epoch
    1 is the best; its state is recorded after epoch 1 (on_epoch), and must have changed
    by the last epoch (or the check proves nothing: give the loss OPTIONS that change it)."""
    X, labels, observed, observed_iu = _data()
    after_first = {}

    def record(model, record):
        if record["epoch"] == 1:
            for head in record["group"].heads:
                state = model.head_state(head, best=False)
                exported = model.losses_[head.loss].export_state(state)
                after_first[head.name] = {n: t.clone() for n, t in exported.items()}

    model = StackedHeads(
        losses=[key], lrs=[1e-2, 1e-3], batch_sizes=[8], epochs=3, expected_positives=K,
        loss_options=_options([key]), device="cpu",
    ).fit(
        X, observed, labels=labels, X_val=X[:40], Y_val=np.zeros_like(labels[:40]),
        observed_iu=observed_iu, scores=vision_language_scores(labels), on_epoch=record,
    )  # fmt: skip
    assert (model.best_epoch_ == 1).all() and (model.best_val_map_ == 0).all()
    for head in model.heads_:
        exported, first = model.exported_state_.get(head.name, {}), after_first[head.name]
        assert exported.keys() == first.keys(), head.name
        last = model.losses_[head.loss].export_state(model.head_state(head, best=False))
        changed = []
        for name, tensor in first.items():
            torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, equal_nan=True)
            changed.append(not torch.equal(last[name].nan_to_num(-1), tensor.nan_to_num(-1)))
        assert not first or any(changed), f"{head.name}: its state never changed after epoch 1"


@pytest.mark.parametrize("key", exporting_losses())
def test_heads_export_their_best_epochs_state(key):
    check_export_is_the_best_epochs_state(key)


def test_the_exported_state_survives_a_resume():
    """Checkpoints carry each head's kept export: a sweep resumed after its best epoch
    exports what the uninterrupted one does."""
    X, labels, observed, observed_iu = _data()
    kwargs = dict(losses=["em_apl", "ll_cp"], lrs=[1e-2], batch_sizes=[8], epochs=3,
                  loss_options=_options(["em_apl", "ll_cp"]), device="cpu")  # fmt: skip
    fit = dict(labels=labels, X_val=X[:40], Y_val=np.zeros_like(labels[:40]))
    saved = {}

    def stop_after_two(model, record):
        if record["epoch"] == 2:
            saved["state"] = model.state_dict()

    full = StackedHeads(**kwargs).fit(X, observed, on_epoch=stop_after_two, **fit)
    resumed = StackedHeads(**kwargs).fit(X, observed, state=saved["state"], **fit)
    assert full.exported_state_.keys() == resumed.exported_state_.keys() and full.exported_state_
    for name, state in full.exported_state_.items():
        for key, tensor in state.items():
            torch.testing.assert_close(resumed.exported_state_[name][key], tensor, rtol=0,
                                       atol=0, equal_nan=True)  # fmt: skip


# ------------------------------------------------------------- losses resolved elsewhere


def test_the_engine_takes_resolved_losses():
    """Losses resolved before the run (the orchestrator's) train as their keys do; the
    data's scores reach the losses that read them without changing the caller's objects."""
    X, labels, observed, observed_iu = _data()
    keys = ["an", "role", "em_apl", "em_pl"]
    options = {"role": {"estimator_lr_multiplier": 5.0}, **_options(keys)}
    kwargs = dict(lrs=[1e-2], batch_sizes=[8], epochs=2, device="cpu", dtype=torch.float64)
    fit = dict(labels=labels, X_val=X[:40], Y_val=labels[:40], observed_iu=observed_iu,
               scores=vision_language_scores(labels))  # fmt: skip
    by_key = StackedHeads(losses=keys, loss_options=options, expected_positives=K, **kwargs)
    by_key.fit(X, observed, **fit)
    resolved = make_losses(keys, options, Context(labels.shape[1], K))
    for given in (resolved, list(resolved.values())):
        model = StackedHeads(losses=given, **kwargs).fit(X, observed, **fit)
        assert [h.name for h in model.heads_] == [h.name for h in by_key.heads_]
        torch.testing.assert_close(model.coef_, by_key.coef_, rtol=0, atol=0)
        assert model.losses_["role"].options.estimator_lr_multiplier == 5.0
        assert model.losses_["em_pl"].context.scores is not None
    assert resolved["em_pl"].context.scores is None  # the caller's objects are untouched
    with pytest.raises(ValueError, match="loss_options apply to loss keys"):
        StackedHeads(losses=resolved, loss_options={"an": {}}, **kwargs).fit(X, observed, **fit)
    with pytest.raises(TypeError, match="mixes loss keys and loss objects"):
        StackedHeads(losses=["an", resolved["role"]], **kwargs).fit(X, observed, **fit)


def test_only_groups_whose_step_reads_in_place_buffers_may_be_replayed_as_a_cuda_graph():
    """A graph replays its capture's values: a loss whose step arguments change by epoch
    (GR's schedule, SPLC's switch, the LL rejection count) or that runs Python between
    kernels must keep its group unrecorded."""
    X, labels, observed, observed_iu = _data()
    replayable = ["bce", "an", "an_ls", "wan", "iun", "iu", "epr", "role"]
    for losses, expected in [(replayable, True), *[([*replayable, k], False) for k in
                             ("gr", "splc", "ll_r", "em_apl", "ll_cp", "pr")]]:  # fmt: skip
        model = StackedHeads(
            losses=losses, lrs=[1e-3], batch_sizes=[8], epochs=2, expected_positives=K,
            loss_options={k: v for k, v in OPTIONS.items() if k in losses}, device="cpu",
        ).fit(X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40], observed_iu=observed_iu)  # fmt: skip
        assert [g.graphable for g in model.groups_] == [expected], losses


# lr 1.0 overshoots, so some head's best epoch is not the last; one lr: a single weight block
@pytest.mark.parametrize("lrs", [[1.0, 1e-2], [1.0]])
def test_best_epoch_weights_score_as_recorded(lrs):
    X, labels, observed, observed_iu = _data()
    Xv, Yv = synthetic(n=60, seed=1)
    model = StackedHeads(
        losses=["an", "role"], lrs=lrs, batch_sizes=[8], epochs=6, device="cpu",
        expected_positives=1.0,
    ).fit(X, observed, labels=labels, X_val=Xv, Y_val=Yv)  # fmt: skip
    assert (model.best_epoch_ < 6).any()  # otherwise the last weights would pass too
    np.testing.assert_allclose(model.score(Xv, Yv), model.best_val_map_, atol=1e-4)
    assert set(model.best_epoch_) <= set(range(1, 7))
    for head, epoch, best in zip(model.heads_, model.best_epoch_, model.best_val_map_, strict=True):
        rows = [r for r in model.history_ if r["head"] == head.name]
        assert len(rows) == 6
        assert max(r["val_map"] for r in rows) == pytest.approx(best)
        assert rows[epoch - 1]["val_map"] == pytest.approx(best)
        assert sum(rows[0]["hidden_positive_histogram"]) == int(
            ((labels == 1) & (observed == 0)).sum()
        )
    logits = model.decision_function(Xv)
    np.testing.assert_allclose(
        mean_average_precision(logits, torch.tensor(Yv)).numpy(), model.best_val_map_, atol=1e-4
    )
    role = next(h for h in model.heads_ if h.loss == "role")
    assert model.estimator_probabilities(role).shape == labels.shape


@pytest.mark.parametrize("compiled", ["1", "0"], ids=["compiled-update", "eager-update"])
def test_resume_gives_the_uninterrupted_result(compiled, monkeypatch):
    monkeypatch.setenv("SPL_COMPILE", compiled)
    X, labels, observed, _ = _data()
    Xv, Yv = synthetic(n=60, seed=1)
    kwargs = dict(
        losses=["an", "role", "pseudo_neg"], lrs=[1e-3], batch_sizes=[8, 16], device="cpu",
        expected_positives=1.0,
    )  # fmt: skip
    full = StackedHeads(epochs=4, **kwargs).fit(X, observed, labels=labels, X_val=Xv, Y_val=Yv)
    saved = {}

    def stop_after_two(model, record):
        if record["epoch"] == 2 and record["group"] is model.groups_[0]:
            saved["state"] = model.state_dict()

    StackedHeads(epochs=4, **kwargs).fit(
        X, observed, labels=labels, X_val=Xv, Y_val=Yv, on_epoch=stop_after_two
    )
    # a fresh process: a new estimator loads the state saved after group 1's second epoch
    # (group 2 had not started) and trains the rest
    resumed = StackedHeads(epochs=4, **kwargs).fit(
        X, observed, labels=labels, X_val=Xv, Y_val=Yv, state=saved["state"]
    )
    for a, b in zip(full.groups_, resumed.groups_, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        theta_a, theta_b = a.slots["role"].state["theta"], b.slots["role"].state["theta"]
        torch.testing.assert_close(theta_a, theta_b, rtol=0, atol=0)
    np.testing.assert_array_equal(full.best_epoch_, resumed.best_epoch_)
    assert len(resumed.history_) == len(full.history_)


def test_refusals():
    X, labels, observed, _ = _data()
    with pytest.raises(ValueError, match="observed_iu"):
        StackedHeads(losses=["iu"], lrs=[1e-3], batch_sizes=[8], epochs=1).fit(
            X, observed, labels=labels, X_val=X, Y_val=labels
        )
    with pytest.raises(ValueError, match="fewer than batch size 200"):
        StackedHeads(losses=["an"], lrs=[1e-3], batch_sizes=[200], epochs=1).fit(
            X, observed, labels=labels, X_val=X, Y_val=labels
        )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
def test_compiled_update_equals_torch_fused_adam(dtype, tol):
    """fused.adam_update forms x^T G inside the update; torch.optim.Adam gets it explicitly."""
    gen = torch.Generator().manual_seed(0)
    blocks, batch, width, columns, lrs = 3, 8, 33, 12, [1e-2, 1e-3, 1e-4]
    weight = torch.randn(blocks, width, columns, generator=gen, dtype=dtype)
    start = weight.clone()
    params = [torch.nn.Parameter(weight[b].clone()) for b in range(blocks)]
    reference = torch.optim.Adam(
        [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], fused=True
    )
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    for step in range(1, 41):
        x = torch.randn(batch, width, generator=gen, dtype=dtype)
        grad_out = torch.randn(blocks, batch, columns, generator=gen, dtype=dtype) * 0.01
        for b, param in enumerate(params):
            param.grad = x.t() @ grad_out[b]
        reference.step()
        step_size = torch.tensor([lr / (1 - 0.9**step) for lr in lrs], dtype=dtype)
        assert fused.attempt(
            fused.adam_update, x, grad_out, weight, exp_avg, exp_avg_sq, step_size.view(-1, 1, 1),
            torch.tensor(math.sqrt(1 - 0.999**step), dtype=dtype), 0.9, 0.999, 1e-8,
        )  # fmt: skip
    expected = torch.stack([p.detach() for p in params])
    assert (expected - weight).abs().max() <= tol
    assert (expected - start).abs().max() > 1e-2  # the weights did move


TESTS = Path(__file__).resolve().parent
# Run by test_failed_compilation_falls_back_to_the_eager_update in a fresh process: the
# same sweep eagerly (SPL_COMPILE=0), then with compiling on where compiling fails.
FALLBACK_SCRIPT = """
import json, os, sys, warnings
import torch
from spl.fit import fused
from spl.fit.engine import StackedHeads
from test_engine import _data

X, labels, observed, _ = _data()

def fit():
    return StackedHeads(
        losses=["an", "role"], lrs=[1e-2, 1e-3], batch_sizes=[8], epochs=2, device="cpu",
        expected_positives=1.0,
    ).fit(X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40])

os.environ["SPL_COMPILE"] = "0"
eager = fit()
os.environ["SPL_COMPILE"] = "1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fallen_back = fit()
json.dump({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    "broken": fused.broken(),
    "compiled": [g.compiled for g in fallen_back.groups_],
    "equal": bool(torch.equal(fallen_back.coef_, eager.coef_)),
}, sys.stdout)
"""


@pytest.mark.slow
def test_failed_compilation_falls_back_to_the_eager_update(tmp_path):
    """What a machine without a working C++ compiler sees, for real: torch's inductor is
    pointed at a compiler that does not exist (``CXX``, read when torch loads, so in a
    fresh process; an empty inductor cache, so that nothing compiled earlier is reused).
    The sweep warns once, trains eagerly and gives the eager run's weights bit for bit;
    the update-path measurement it made is kept in the cache file through a temporary
    name, and a killed writer's leftover temporary of that file is removed."""
    cache = tmp_path / "cache" / "spl" / "update-paths.json"
    cache.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temporary_path(cache)
    leftover = mine.with_name(mine.name.removesuffix(str(os.getpid())) + str(dead.pid))
    leftover.write_text("{half a file")
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "compiled CPU steps are unavailable" in result["warnings"][0]
    assert "no-such-compiler" in result["warnings"][0]  # failed for the reason staged here
    assert result["broken"] and not any(result["compiled"])
    assert result["equal"]
    stored = json.loads(cache.read_text())
    assert [entry["mode"] for entry in stored.values()] == ["eager"]  # only eager could run
    assert sorted(p.name for p in cache.parent.iterdir()) == ["update-paths.json"]


def test_compiling_is_automatic_only_for_large_sweeps(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SPL_COMPILE", raising=False)
    assert fused.enabled(cpu, fused.AUTO_MIN_WORK)
    assert not fused.enabled(cpu, fused.AUTO_MIN_WORK - 1)
    assert not fused.enabled(torch.device("cuda"), 1e15)  # CUDA replays graphs instead
    X, labels, observed, _ = _data()
    small = StackedHeads(losses=["an"], lrs=[1e-3], batch_sizes=[8], epochs=1, device="cpu")
    small.fit(X, observed, labels=labels, X_val=X[:40], Y_val=labels[:40])
    assert not small.groups_[0].compiled  # 120 rows: eager
    monkeypatch.setenv("SPL_COMPILE", "0")
    assert not fused.enabled(cpu, 1e15)
    monkeypatch.setenv("SPL_COMPILE", "1")
    assert fused.enabled(cpu, 0)
    monkeypatch.setenv("SPL_COMPILE", "fast")
    with pytest.raises(SplError, match="SPL_COMPILE='fast': use auto"):
        fused.enabled(cpu, 0)
