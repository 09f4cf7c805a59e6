"""The ``spl`` command: one click group; each stage adds its commands here."""

from __future__ import annotations

import sys

import click

from spl.clitools import SplGroup


@click.group(cls=SplGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spl")
def main() -> None:
    """Multi-label classifiers from single positive labels (Cole et al., CVPR 2021).

    Pipeline: `spl data prepare` -> `spl extract` -> `spl fit-linear` -> `spl finetune`,
    and `spl reproduce` for the paper's tables. `spl demo` runs it all on bundled data.
    """


def _register() -> None:
    from spl import (
        commands_data,
        commands_extract,
        commands_finetune,
        commands_fit,
        commands_run,
        commands_scores,
    )

    main.add_command(commands_data.data)
    for module in (
        commands_fit,
        commands_extract,
        commands_scores,
        commands_finetune,
        commands_run,
    ):
        for command in module.COMMANDS:
            main.add_command(command)


_register()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
