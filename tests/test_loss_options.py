"""Every loss option's valid range: declared beside its default for every option of every
registered loss, enforced by one checker however the option is set (--loss-option, a
--config table, the functional API, Loss.make and StackedHeads, a dataset's defaults),
and shown by `spl losses`; TOML lists for the tuple options."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from spl.data.common import SplError
from spl.fit.engine import StackedHeads
from spl.fit.losses import REGISTRY, Context, get_loss, loss, parse_loss_options
from spl.fit.losses.base import Interval, check_option, option_range
from spl.fit.losses.entropy import EM

from conftest import invoke

# The ten values that used to train silently: (loss, option, value, its range).
OUT_OF_RANGE = [
    ("em", "alpha", -1, "[0, inf)"),
    ("epr", "expected_positives", -1, "(0, inf)"),
    ("role", "estimator_lr_multiplier", -5, "(0, inf)"),
    ("hill", "gamma", -2, "[0, inf)"),
    ("asl", "clip", 1.5, "[0, 1)"),
    ("splc", "tau", 1.5, "[0, 1]"),
    ("splc", "change_epoch", 0, "[1, inf)"),
    ("pseudo_neg", "fraction", 1.5, "[0, 1]"),
    ("wan", "gamma", -1, "[0, 1]"),
    ("an_ls", "label_smoothing", 1.5, "[0, 1)"),
]
# In-range values of the same options (boundaries where the range is closed).
IN_RANGE = {
    ("em", "alpha"): 0.0,
    ("epr", "expected_positives"): 2.5,
    ("role", "estimator_lr_multiplier"): 0.5,
    ("hill", "gamma"): 0.0,
    ("asl", "clip"): 0.0,
    ("splc", "tau"): 1.0,
    ("splc", "change_epoch"): 1,
    ("pseudo_neg", "fraction"): 1.0,
    ("wan", "gamma"): 1.0,
    ("an_ls", "label_smoothing"): 0.0,
}


def _message(key, name, value, valid) -> str:
    return f"{key}.{name} = {value:g} is outside its range {valid}"


# ----------------------------------------------------------------------------- declarations


def _all_options():
    return [(cls, f) for cls in REGISTRY for f in dataclasses.fields(cls.Options)]


def test_every_option_of_every_registered_loss_declares_its_range():
    """A new option without a range fails here."""
    missing = [
        f"{cls.key}.{f.name}" for cls, f in _all_options() if option_range(cls, f.name) is None
    ]
    assert not missing, f"options without a declared range: {missing}"


def test_every_default_is_inside_its_range():
    for cls, f in _all_options():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        check_option(cls, f.name, default)
        for table in cls.dataset_options.values():
            if f.name in table:
                check_option(cls, f.name, table[f.name])
        for dataset in (None, "voc12", "coco14", "nuswide", "cub", "pets"):
            cls.make(context=Context(5, 1.5, dataset))  # every dataset's resolved options


@pytest.mark.parametrize(
    ("cls", "f"), [pytest.param(c, f, id=f"{c.key}.{f.name}") for c, f in _all_options()]
)
def test_each_range_accepts_its_inside_and_refuses_its_outside(cls, f):
    """The checker against the declared interval's bounds: a closed bound is accepted, an
    open one and anything past it refused (one item at a time for tuple options)."""
    valid = option_range(cls, f.name)
    default = f.default
    items = len(default) if isinstance(default, tuple) else 1
    ranges = valid if isinstance(valid, tuple) else (valid,) * items
    is_int = cls.Options.__annotations__[f.name] in ("int", int)
    for position, interval in enumerate(ranges):
        probes = []
        for bound, closed, outward in ((interval.low, interval.low_closed, -1),
                                       (interval.high, interval.high_closed, 1)):  # fmt: skip
            if math.isinf(bound):
                continue
            probes.append((bound, closed))
            probes.append((bound + outward * (1 if is_int else 0.25), False))
        probes.append((_inside(interval, is_int), True))
        for value, accepted in probes:
            if isinstance(default, tuple):
                value = tuple(value if i == position else 0.5 for i in range(items))
                if not all(
                    v in r
                    for i, (v, r) in enumerate(zip(value, ranges, strict=True))
                    if i != position
                ):
                    continue
            if accepted:
                check_option(cls, f.name, value)
            else:
                with pytest.raises(SplError, match=rf"{cls.key}\.{f.name} = .* is outside"):
                    check_option(cls, f.name, value)


def _inside(interval: Interval, is_int: bool):
    low = interval.low if math.isfinite(interval.low) else min(interval.high, 0) - 1
    high = interval.high if math.isfinite(interval.high) else low + 2
    middle = (low + high) / 2
    return math.floor(middle) + 1 if is_int else middle


def test_none_is_valid_where_the_type_allows_it():
    for key, name in (
        ("wan", "gamma"),
        ("epr", "expected_positives"),
        ("gpr", "expected_positives"),
    ):
        check_option(get_loss(key), name, None)


def test_interval_notation():
    assert (
        str(Interval.parse("[0, 1)")) == "[0, 1)" and str(Interval.parse("(0,inf)")) == "(0, inf)"
    )
    assert 0 in Interval.parse("[0, 1)") and 1 not in Interval.parse("[0, 1)")
    assert math.nan not in Interval.parse("(-inf, inf)") and True not in Interval.parse("[0, 1]")
    for bad in ("0, 1", "[1, 0]", "[a, 1]"):
        with pytest.raises(ValueError):
            Interval.parse(bad)


# ----------------------------------------------------------------------------- every route


@pytest.mark.parametrize(("key", "name", "value", "valid"), OUT_OF_RANGE)
def test_python_routes_refuse_out_of_range_values(key, name, value, valid):
    expected = _message(key, name, value, valid)
    # the functional API
    logits, observed = torch.zeros(2, 4), torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(SplError, match=_escaped(expected)):
        loss(key, logits, observed, **{name: value})
    # Loss.make and --loss-option's parser
    with pytest.raises(SplError, match=_escaped(expected)):
        get_loss(key).make({name: value}, Context(4, 1.5))
    with pytest.raises(SplError, match=_escaped(f"--loss-option: {expected}")):
        parse_loss_options([f"{key}.{name}={value}"])
    with pytest.raises(SplError, match=_escaped(expected)):
        parse_loss_options({key: {name: value}}, where="x.toml: loss_options")
    # StackedHeads(loss_options=...), refused before training
    X = np.random.RandomState(0).randn(16, 3).astype(np.float32)
    labels = np.eye(4, dtype=np.uint8)[np.arange(16) % 4]
    model = StackedHeads(losses=[key], lrs=[1e-3], batch_sizes=[8], epochs=1, device="cpu",
                         loss_options={key: {name: value}}, expected_positives=1.0)  # fmt: skip
    with pytest.raises(SplError, match=_escaped(expected)):
        model.fit(X, labels, labels=labels, X_val=X, Y_val=labels)


@pytest.mark.parametrize(("key", "name"), list(IN_RANGE))
def test_python_routes_accept_in_range_values(key, name):
    value = IN_RANGE[(key, name)]
    logits, observed = torch.zeros(2, 4), torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]])
    state = {"estimates": torch.zeros(2, 4), "expected_positives": 1.5} if key == "role" else {}
    state.update({"pseudo_negatives": torch.ones(2, 4)} if key == "pseudo_neg" else {})
    assert torch.isfinite(loss(key, logits, observed, labels=observed, **state, **{name: value}))
    assert getattr(get_loss(key).make({name: value}).options, name) == value
    assert parse_loss_options([f"{key}.{name}={value}"]) == {key: {name: value}}


def test_a_dataset_default_out_of_range_is_refused():
    """Per-dataset defaults go through the same checker (a loss whose table is wrong)."""

    class BadTable(EM):
        key = "em_bad_table"
        dataset_options = {"voc12": {"alpha": 0.2}, "cub": {"alpha": -0.01}}

    BadTable.make(context=Context(5, dataset="voc12"))
    with pytest.raises(SplError, match=_escaped("em_bad_table.alpha = -0.01 is outside")):
        BadTable.make(context=Context(5, dataset="cub"))


def test_tuple_options_name_the_bad_item():
    with pytest.raises(SplError, match=_escaped("gr.v_schedule = (0.5, -2, 0.8, 0.5) is outside "
                                                "its range ([0, 1], (0, inf), [0, 1], (0, inf)) "
                                                "(item 2 is -2)")):  # fmt: skip
        get_loss("gr").make({"v_schedule": (0.5, -2.0, 0.8, 0.5)})
    with pytest.raises(
        SplError, match=_escaped("gr.q = (0.01, 0) is outside its range each (0, inf)")
    ):
        parse_loss_options(["gr.q=0.01,0"])
    with pytest.raises(SplError, match="expected 4 values, got 3"):
        parse_loss_options(["gr.k_schedule=[0, 2, -2]"])


def test_list_options_take_toml_lists_and_bracketed_text():
    want = {"gr": {"k_schedule": (0.0, 3.0, -2.0, -2.0)}}
    for text in ("[0.0, 3.0, -2.0, -2.0]", "(0, 3, -2, -2)", "0,3,-2,-2", " [0, 3, -2, -2] "):
        assert parse_loss_options([f"gr.k_schedule={text}"]) == want
    assert parse_loss_options({"gr": {"k_schedule": [0.0, 3.0, -2.0, -2.0]}}) == want


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from click.testing import CliRunner
    from test_fit_linear import _arrays

    root = tmp_path_factory.mktemp("options")
    paths = _arrays(root, n_train=80, n_test=40, classes=4)
    args = ["import-features", root / "ds" / "mine"]
    for key, path in paths.items():
        args += [f"--{key}", path]
    invoke(CliRunner(), args)
    return root / "ds" / "mine"


def _fit(dataset, out, *extra) -> list:
    return ["fit-linear", dataset, "--features", "imported", "--out", out, "--quiet",
            "--lrs", "1e-3", "--batch-sizes", 8, "--epochs", 1, *extra]  # fmt: skip


@pytest.mark.parametrize(("key", "name", "value", "valid"), OUT_OF_RANGE)
def test_the_flag_and_a_config_table_refuse_out_of_range_values(
    dataset, runner, tmp_path, key, name, value, valid
):
    expected = _message(key, name, value, valid)
    out = tmp_path / "runs"
    result = invoke(runner, _fit(dataset, out, "--losses", key, "--loss-option",
                                 f"{key}.{name}={value}"), ok=False)  # fmt: skip
    assert f"--loss-option: {expected}" in result.output
    config = tmp_path / "bad.toml"
    config.write_text(f"[loss_options.{key}]\n{name} = {value}\n")
    result = invoke(runner, _fit(dataset, out, "--losses", key, "--config", config), ok=False)
    assert f"{config}: loss_options: {expected}" in " ".join(result.output.split())
    assert not out.exists()


def test_in_range_values_and_toml_lists_train_and_are_recorded(dataset, runner, tmp_path):
    keys = sorted({key for key, _ in IN_RANGE} | {"gr"})
    flags = [f"{key}.{name}={IN_RANGE[(key, name)]}" for key, name in IN_RANGE if key != "hill"]
    config = tmp_path / "ok.toml"
    config.write_text("[loss_options.gr]\nk_schedule = [0.0, 3.0, -2.0, -2.0]\n"
                      "q = [0.5, 1.5]\n[loss_options.hill]\ngamma = 0\n")  # fmt: skip
    args = _fit(dataset, tmp_path / "runs", "--losses", ",".join(keys), "--config", config)
    for flag in flags:
        args += ["--loss-option", flag]
    invoke(runner, args)
    (run,) = (tmp_path / "runs" / "mine" / "imported").iterdir()
    recorded = json.loads((run / "config.json").read_text())["loss_options"]
    assert recorded["gr"]["k_schedule"] == [0.0, 3.0, -2.0, -2.0]
    assert recorded["gr"]["q"] == [0.5, 1.5]
    for (key, name), value in IN_RANGE.items():
        assert recorded[key][name] == value, (key, name)


def test_spl_losses_shows_every_range(runner):
    output = invoke(runner, ["losses"]).output
    assert "estimator_lr_multiplier (float, default 10.0) in (0, inf)" in output
    assert "label_smoothing (float, default 0.1) in [0, 1)" in output
    assert "in ([0, 1], (0, inf), [0, 1], (0, inf))" in output  # GR's v_schedule, per item
    assert "q (tuple[float, float], default (0.01, 1.0)) each in (0, inf)" in output
    for cls, f in _all_options():
        assert re.search(rf"^{cls.key}\s.*\n\s+options: .*{f.name} \(", output, re.M)


def _escaped(text: str) -> str:
    return re.escape(text)
