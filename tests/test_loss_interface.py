"""The loss interface: every registered loss's engine gradient against autograd of its value
(:func:`check_engine_gradients`, also run for a loss registered at run time), per-loss
options from the command line and --config, and the functional API."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.data.sampling import observe_uniform
from spl.fit.engine import StackedHeads, epoch_batches, gradient_route
from spl.fit.losses import LOSSES, Batch, Context, Scores, get_loss, loss, parse_loss_options
from spl.fit.step import loss_batch, start_epoch, step_gradients

from conftest import REPO, invoke


def _data(seed=0, n=96, d=10, num_classes=6):
    rng = np.random.RandomState(seed)
    labels = (rng.rand(n, num_classes) < 0.35).astype(np.uint8)
    labels[np.arange(n), rng.randint(0, num_classes, n)] = 1
    X = labels @ rng.randn(num_classes, d) + rng.randn(n, d)
    return X, labels, observe_uniform(labels, 1, 0, 7), observe_uniform(labels, 1, 1, 7)


def check_engine_gradients(keys, seed=0):
    """On a random batch of a sweep over ``keys``, the gradient the engine computes on each
    loss's route (label-only weights, the fused closed form, a kernel, autograd) equals
    autograd of the loss's own value, for the logits and for its trainable state (through
    its own ``batch_state``). Returns the routes seen."""
    X, labels, observed, observed_iu = _data(seed)
    rng = np.random.RandomState(seed)
    image = 0.2 + 0.05 * labels + 0.02 * rng.randn(*labels.shape)  # cosines for VLPL, AEVLP
    scores = Scores(torch.tensor(image), torch.tensor(image[:, None] + 0.03 * rng.randn(96, 4, 6)))
    options = {"em_apl": {"warmup": 1}, "gpr": {"grid": 2, "threshold": 0.3}}
    model = StackedHeads(
        losses=keys, lrs=[1e-2, 1e-3], batch_sizes=[8], epochs=3, expected_positives=1.7,
        device="cpu", dtype=torch.float64,
        loss_options={k: v for k, v in options.items() if k in keys} or None,
    )  # fmt: skip
    fit = dict(labels=labels, X_val=X[:30], Y_val=labels[:30], observed_iu=observed_iu,
               scores=scores)  # fmt: skip
    # train a little first, so that logits and ROLE's estimates are not at their start
    model.fit(X, observed, **fit)
    model.prepare(X, observed, state=model.state_dict(), **fit)
    (group,) = model.groups_
    epoch = 2
    start_epoch(group, epoch)
    rows = epoch_batches(len(X), 8, 0, seed, torch.device("cpu"))[seed]
    logits, per_head, grad, state_grads = step_gradients(group, rows, epoch)
    engine_state_grads = {part.loss.key: grads for part, grads in state_grads}
    routes = set()
    for key, slot in group.slots.items():
        routes.add(gradient_route(type(slot.loss)))
        sub = logits.index_select(1, slot.index).transpose(0, 1).detach().requires_grad_(True)
        state = {name: tensor.detach().clone() for name, tensor in slot.state.items()}
        for name in slot.loss.trainable:
            state[name].requires_grad_(True)
        batch = loss_batch(group, slot, rows, epoch)
        batch.state = slot.loss.batch_state(state, rows)
        value = slot.loss.batch_loss(sub, batch)
        value.sum().backward()
        engine_grad = grad.index_select(1, slot.index).transpose(0, 1)
        torch.testing.assert_close(engine_grad, sub.grad, rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(per_head[slot.index], value.detach(), rtol=1e-9, atol=1e-12)
        if slot.loss.trainable:
            assert key in engine_state_grads, f"{key}: the engine trains none of its state"
        for name, engine in zip(slot.loss.trainable, engine_state_grads.get(key, ()), strict=True):
            expected = state[name].grad.index_select(-2, rows)  # [h, B, L]: the batch rows
            torch.testing.assert_close(engine, expected, rtol=1e-9, atol=1e-12, msg=key)
    return routes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_gradients_equal_autograd_of_every_loss_value(seed):
    """Every registered loss, in one group: mixed routes."""
    routes = check_engine_gradients(list(LOSSES), seed)
    assert routes == {"weights", "fused", "autograd", "kernel"}


def test_per_loss_options_reach_the_engine_and_are_recorded(tmp_path, runner):
    from test_fit_linear import _arrays

    paths = _arrays(tmp_path)
    args = ["import-features", tmp_path / "ds" / "mine"]
    for key, path in paths.items():
        args += [f"--{key}", path]
    invoke(runner, args)
    dataset = tmp_path / "ds" / "mine"
    base = ["fit-linear", dataset, "--features", "imported", "--out", tmp_path / "runs",
            "--quiet", "--losses", "role,an_ls", "--lrs", "1e-3", "--batch-sizes", 8,
            "--epochs", 1]  # fmt: skip
    invoke(runner, [*base, "--loss-option", "role.estimator_lr_multiplier=5",
                    "--loss-option", "an_ls.label_smoothing=0.2"])  # fmt: skip
    (run,) = (tmp_path / "runs" / "mine" / "imported").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["loss_options"]["role"] == {
        "estimator_lr_multiplier": 5.0, "expected_positives": None,
    }  # fmt: skip
    assert config["loss_options"]["an_ls"] == {"label_smoothing": 0.2}
    # refusals name the loss and its valid options
    result = invoke(runner, [*base, "--loss-option", "role.bogus=1"], ok=False)
    assert (
        "loss 'role' has no option 'bogus'; its options: estimator_lr_multiplier" in result.output
    )
    result = invoke(runner, [*base, "--loss-option", "role.estimator_lr_multiplier=fast"], ok=False)
    assert "role.estimator_lr_multiplier: 'fast' is not a float" in result.output
    assert "estimator_lr_multiplier (float, default 10.0)" in result.output
    result = invoke(runner, [*base, "--loss-option", "wan.gamma=0.5"], ok=False)
    assert "options given for loss 'wan', which this run does not train" in result.output
    result = invoke(runner, [*base, "--loss-option", "role=5"], ok=False)
    assert "write LOSS.OPTION=VALUE" in result.output
    (tmp_path / "bad.toml").write_text("[loss_options.role]\nestimator_lr_multiplier = true\n")
    result = invoke(runner, [*base, "--config", tmp_path / "bad.toml"], ok=False)
    assert f"{tmp_path / 'bad.toml'}: loss_options" in result.output
    assert len(list((tmp_path / "runs" / "mine" / "imported").iterdir())) == 1


def test_the_engine_trains_roles_estimator_at_its_option():
    X, labels, observed, _ = _data()
    model = StackedHeads(
        losses=["role"], lrs=[1e-3], batch_sizes=[8], epochs=0, expected_positives=1.5,
        loss_options={"role": {"estimator_lr_multiplier": 5}}, device="cpu",
    ).fit(X, observed, labels=labels, X_val=X, Y_val=labels)  # fmt: skip
    groups = model.groups_[0].optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-3]


def test_option_values_are_typed():
    parsed = parse_loss_options(["wan.gamma=none", "bce_ls.label_smoothing=0.05"])
    assert parsed == {"wan": {"gamma": None}, "bce_ls": {"label_smoothing": 0.05}}
    assert parse_loss_options({"pseudo_neg": {"fraction": 1}}) == {"pseudo_neg": {"fraction": 1.0}}
    for bad in ("pseudo_neg.fraction=nan", "epr.expected_positives=[1]"):
        with pytest.raises(Exception, match="is not a float"):
            parse_loss_options([bad])


def test_functional_api_equals_the_loss_object():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    observed = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    value = loss("an_ls", logits, observed, label_smoothing=0.2)
    objects = get_loss("an_ls").make({"label_smoothing": 0.2}, Context(4))
    expected = objects.batch_loss(logits, Batch(observed.double()))
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    value.backward()
    assert logits.grad.abs().sum() > 0  # differentiable
    with pytest.raises(Exception, match="takes no keyword 'smoothing'"):
        loss("an_ls", logits, observed, smoothing=0.2)
    with pytest.raises(ValueError, match="role needs the batch's 'estimates'"):
        loss("role", logits, observed, expected_positives=1.0)


def test_readme_training_loop_runs():
    """The README's ten-line loop, executed as written."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- functional-api -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its functional-API example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["head"].weight.grad is not None


def test_spl_losses_lists_every_loss(runner):
    output = invoke(runner, ["losses"]).output
    for key, cls in LOSSES.items():
        assert re.search(rf"^{key}\s", output, re.M) and cls.title in output
    assert "estimator_lr_multiplier (float, default 10.0)" in output


def test_readme_names_every_loss():
    text = Path(REPO / "README.md").read_text()
    for key in LOSSES:
        assert f"`{key}`" in text


def scratch_registry(monkeypatch) -> None:
    """Point the registry, its key map and its groups at copies, so that what a test
    registers is gone when monkeypatch puts the originals back."""
    import spl.fit.losses as registry

    monkeypatch.setattr(registry, "REGISTRY", list(registry.REGISTRY))
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))
    for name, keys in list(registry.GROUPS.items()):
        monkeypatch.setitem(registry.GROUPS, name, list(keys))


def test_adding_a_loss_is_one_class_and_one_registry_line(monkeypatch):
    """The worked example of docs/architecture.md, executed and registered at run time
    (monkeypatch undoes it): the registry-wide checks pass for it with no other change, and
    it works in the engine, --losses all and the functional API."""
    from dataclasses import dataclass

    from test_engine import check_engine_equals_plain_loop, check_export_is_the_best_epochs_state

    import spl.fit.losses as registry
    from spl.fit.losses.base import Loss, is_value, log_neg, log_pos, option, option_range

    text = (REPO / "docs" / "architecture.md").read_text()
    example = text.split("### A worked example", 1)[1]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    scope = {"Loss": Loss, "dataclass": dataclass, "torch": torch, "is_value": is_value,
             "log_pos": log_pos, "log_neg": log_neg, "option": option}  # fmt: skip
    exec(compile(code, "architecture.md", "exec"), scope)  # noqa: S102 - the docs' example
    focal = scope["FocalAN"]
    assert str(option_range(focal, "gamma")) == "[0, inf)"  # its option declares its range
    scratch_registry(monkeypatch)
    assert registry.register(focal) is focal
    assert registry.REGISTRY[-1] is focal and registry.LOSSES["an_focal"] is focal
    assert "an_focal" not in registry.GROUPS["paper"] + registry.GROUPS["vlm"]
    with pytest.raises(SplError, match="loss key 'an_focal' is taken \\(FocalAN\\)"):
        registry.register(focal)
    with pytest.raises(SplError, match="loss key 'an' is taken"):
        registry.register(type("Other", (Loss,), {"key": "an"}))
    with pytest.raises(SplError, match="a subclass of Loss with a key"):
        registry.register(type("Nameless", (Loss,), {}))
    assert registry.parse_losses("all")[-1] == "an_focal"
    with pytest.raises(SplError, match=r"an_focal.gamma = -1 is outside its range \[0, inf\)"):
        registry.parse_loss_options(["an_focal.gamma=-1"])
    # the registry-wide checks, as for every registered loss
    assert check_engine_gradients(["an", "an_focal"]) == {"weights", "autograd"}
    check_engine_equals_plain_loop(["an", "an_focal"])
    check_export_is_the_best_epochs_state("an_focal")
    X, labels, observed, _ = _data()
    model = StackedHeads(losses=["an", "an_focal"], lrs=[1e-2], batch_sizes=[8], epochs=2,
                         loss_options={"an_focal": {"gamma": 1.0}}, device="cpu")  # fmt: skip
    model.fit(X, observed, labels=labels, X_val=X, Y_val=labels)
    assert [h.loss for h in model.heads_] == ["an", "an_focal"]
    assert model.losses_["an_focal"].options.gamma == 1.0
    logits = torch.randn(4, 6)
    assert loss("an_focal", logits, torch.tensor(observed[:4]), gamma=0.0).item() == pytest.approx(
        loss("an", logits, torch.tensor(observed[:4])).item()
    )  # gamma 0 is AN


def test_a_kernels_epoch_numbers_are_made_once_per_value():
    """GR's schedule and SPLC's switch change once an epoch: within an epoch every step gets
    the same tensors (no copy to the device per step), a new epoch gets its own values."""
    observed = torch.zeros(4, 3, dtype=torch.int8)
    observed[:, 0] = 1
    for key, numbers, epoch in (("gr", slice(1, 5), 2), ("splc", slice(1, 2), 1)):
        made = get_loss(key).make()
        one = made.kernel_args(Batch(observed, None, epoch, 10))[numbers]
        again = made.kernel_args(Batch(observed, None, epoch, 10))[numbers]
        later = made.kernel_args(Batch(observed, None, epoch + 1, 10))[numbers]
        assert all(a is b for a, b in zip(one, again, strict=True)), key
        assert not all(torch.equal(a, b) for a, b in zip(one, later, strict=True)), key
    gr = get_loss("gr").make()
    w, b, mu, sigma = gr.kernel_args(Batch(observed, None, 2, 10))[1:5]
    from spl.fit.losses.robust import gr_schedule

    expected = gr_schedule(gr.options.k_schedule, gr.options.v_schedule, 2, 10)
    assert [float(t) for t in (w, b, mu, sigma)] == list(expected)
    assert w.dtype == torch.float64
