"""Helpers shared by the command modules: error handling and ``--config`` files."""

from __future__ import annotations

from pathlib import Path

import click

from spl.data.common import SplError


class SplGroup(click.Group):
    """Turns :class:`SplError` (bad input) into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SplError as exc:
            raise click.ClickException(str(exc)) from exc


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """Eager ``--config FILE.toml``: its keys become the command's defaults; flags still win."""
    if not value:
        return value
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}", param=param) from exc
    names = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    normalised = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - names)
    if unknown:
        raise click.BadParameter(
            f"{value}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}",
            param=param,
        )
    ctx.default_map = {**(ctx.default_map or {}), **normalised}
    return value


config_option = click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML file whose keys set this command's options (command-line flags win).",
)


def explicit_options(ctx: click.Context) -> set[str]:
    """Names of the options the user typed on the command line (not defaults or config)."""
    from click.core import ParameterSource

    return {
        name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }


def number_list(text: str, option: str, cast: type = float) -> list:
    """``1e-3,1e-4`` -> [0.001, 0.0001]; a clear error naming the option otherwise."""
    kind = "integers" if cast is int else "numbers"
    try:
        values = [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise SplError(f"{option} takes comma-separated {kind}, got {text!r}") from exc
    if not values:
        raise SplError(f"{option} needs at least one value")
    return values


def float_list(text: str, option: str) -> list[float]:
    return number_list(text, option, float)


def int_list(text: str, option: str) -> list[int]:
    return number_list(text, option, int)


def check_resume(ctx: click.Context, run, kind: str, given: dict) -> dict:
    """The config of an interrupted run of ``kind``; options typed again must match it."""
    from spl.runs import INCOMPLETE, option_differences, read_config

    config = read_config(run)
    if config.get("kind") != kind:
        raise SplError(f"{run} is not a {kind} run")
    if not (run / INCOMPLETE).exists():
        raise SplError(f"{run} has finished; nothing to resume")
    typed = explicit_options(ctx)
    differences = option_differences(
        config["settings"], {k: v for k, v in given.items() if k in typed}
    )
    if differences:
        raise SplError(f"--resume {run} was run with other options:\n  " + "\n  ".join(differences))
    return config
