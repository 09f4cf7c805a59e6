"""Helpers shared by the command modules: error handling, ``--config`` files, settings from
the command line, and the ``--resume`` check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spl.data.common import SplError


class SplGroup(click.Group):
    """Turns :class:`SplError` (bad input) into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SplError as exc:
            raise click.ClickException(str(exc)) from exc


def _read_toml(path: str, param: click.Parameter) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param=param) from exc


def config_option(settings: type | None = None):
    """An eager ``--config FILE.toml`` whose keys become the command's defaults (flags win).

    Every value is checked when the file is read, as the option's own parser would check
    it, and a bad one is reported with the file and the key (not a flag the user never
    typed). With ``settings`` (the command's settings dataclass), its parsers check them.
    """

    def load(ctx: click.Context, param: click.Parameter, value: str | None):
        if not value:
            return value
        data = _read_toml(value, param)
        params = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
        normalised = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - set(params))
        if unknown:
            raise click.BadParameter(
                f"{value}: unknown keys {', '.join(unknown)}; valid keys: "
                f"{', '.join(sorted(params))}",
                param=param,
            )
        defaults = {}
        for key, item in normalised.items():
            where = f"{value}: {key}"
            try:
                if settings is not None and key in _field_names(settings):
                    from spl.settings_fields import config_value

                    defaults[key] = config_value(settings, key, item, where)
                else:
                    defaults[key] = _check_with_click(ctx, params[key], item, where)
            except SplError as exc:
                raise click.BadParameter(str(exc), param=param) from None
        multiple = {k: v for k, v in defaults.items() if getattr(params[k], "multiple", False)}
        ctx.meta["spl_config_multiple"] = multiple  # merged with the flags, not replaced
        ctx.meta["spl_config_file"] = value
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=load,
        help="TOML file whose keys set this command's options (command-line flags win).",
    )


def _field_names(settings: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(settings) if f.metadata.get("cli")}


def _check_with_click(ctx: click.Context, param: click.Parameter, value: Any, where: str):
    if isinstance(value, list) and not getattr(param, "multiple", False):
        value = ",".join(str(v) for v in value)
    try:
        param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise SplError(f"{where} = {value!r}: {exc.message}") from None
    return value


def explicit_options(ctx: click.Context) -> set[str]:
    """Names of the options the user typed on the command line (not defaults or config)."""
    from click.core import ParameterSource

    return {
        name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }


def settings_from_cli(ctx: click.Context, settings: type, values: dict):
    """The command's settings from its click values: values from --config are named by
    the file and key in errors; options given both in the file and as flags (repeatable
    ones) are merged, the flags last."""
    from click.core import ParameterSource

    from spl.settings_fields import settings_from

    values = dict(values)
    config = ctx.meta.get("spl_config_file")
    sources = {}
    for name in values:
        if ctx.get_parameter_source(name) == ParameterSource.DEFAULT_MAP and config:
            sources[name] = f"{config}: {name}"
    for name, configured in ctx.meta.get("spl_config_multiple", {}).items():
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            values[name] = (*configured, *values[name])
    return settings_from(settings, values, sources)


def check_resume(ctx: click.Context, run: Path, kind: str, settings) -> dict:
    """The config of an interrupted run of ``kind``; options typed again must match it."""
    import dataclasses

    from spl.runs import INCOMPLETE, option_differences, read_config

    command = {"linear": "fit-linear"}.get(kind, kind)
    config = read_config(run)
    if config.get("kind") != kind:
        raise SplError(f"{run} is not a {command} run")
    if not (run / INCOMPLETE).exists():
        raise SplError(f"{run} has finished; nothing to resume")
    typed = explicit_options(ctx)
    given = {k: v for k, v in dataclasses.asdict(settings).items() if k in typed}
    differences = option_differences(config["settings"], given)
    if differences:
        raise SplError(f"--resume {run} was run with other options:\n  " + "\n  ".join(differences))
    return config
