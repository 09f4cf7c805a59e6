"""Shared fixtures: CLI runner with no user config, tiny prepared datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, args: list[str], ok: bool = True):
    """Run `spl ARGS`; assert success (or failure) and return the result."""
    from spl.cli import main

    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> Path:
    """A small prepared demo dataset (real digit images), shared by the tests that read it."""
    from spl.data.demo import build_demo
    from spl.data.prepared import write_prepared

    root = tmp_path_factory.mktemp("demo_root")
    raw = build_demo(root / "demo", train_images=160, test_images=80, seed=0)
    write_prepared(raw, root / "demo" / "labels.h5")
    return root / "demo"
