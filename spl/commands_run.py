"""``spl reproduce`` and ``spl demo``: the paper's tables in batch, and the bundled demo."""

from __future__ import annotations

import click

from spl.clitools import config_option, settings_from_cli
from spl.data.common import SplError
from spl.settings import DemoSettings, ReproduceSettings, click_options


@click.command("reproduce")
@click_options(ReproduceSettings)
@config_option(ReproduceSettings)
@click.pass_context
def reproduce_command(ctx: click.Context, **options) -> None:
    """Compute every missing cell of the paper's tables and write them beside the paper's
    numbers (Markdown, CSV, JSON) with the unobserved-positive histogram figure."""
    import dataclasses

    from spl.extract.backbones import list_backbones
    from spl.reproduce import Plan, reproduce

    settings = settings_from_cli(ctx, ReproduceSettings, options)
    if settings.backbone not in list_backbones():
        raise SplError(
            f"unknown backbone {settings.backbone!r}; available: {', '.join(list_backbones())}"
        )
    plan = Plan(**dataclasses.asdict(settings))
    if settings.jobs is None:
        plan.jobs = _default_jobs()
    result = reproduce(plan, dry_run=plan.dry_run, log=click.echo)
    if plan.dry_run:
        click.echo(result["text"])
        return
    for path in result["written"]:
        if path.suffix == ".md":
            click.echo(path.read_text())
    if result["figure"]:
        click.echo(f"figure: {result['figure']}")


def _default_jobs() -> int:
    import torch

    return max(1, torch.cuda.device_count())


@click.command("demo")
@click_options(DemoSettings)
@config_option(DemoSettings)
@click.pass_context
def demo_command(ctx: click.Context, **options) -> None:
    """The whole pipeline on the bundled digits, offline: prepare, extract EfficientNet-Lite0
    features, train every loss of the linear table, fine-tune the LinearInit rows briefly,
    print the tables and write the figure."""
    import dataclasses

    from spl.demo import run_demo

    settings = settings_from_cli(ctx, DemoSettings, options)
    run_demo(log=click.echo, **dataclasses.asdict(settings))


COMMANDS = [reproduce_command, demo_command]
