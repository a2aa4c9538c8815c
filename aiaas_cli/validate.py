"""``aiaas validate FILE...``: check config files of any kind before anything touches Ray."""

from __future__ import annotations

from pathlib import Path

import click

from aiaas import errors
from aiaas.config import loader
from aiaas_cli import console


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Validate config files (cluster, dataset, train, tune, finetune, optimize, monitoring,
    Ray Serve).

    Checks every file and lists every problem; exits 1 if any file is invalid.
    """
    problems = []
    for path in files:
        try:
            what = loader.check(path)
        except errors.ConfigError as exc:
            problems.append(str(exc))
            continue
        click.echo(f"ok  {path} ({what})")
    if problems:
        count = len(problems)
        console.fail(
            f"{count} of {len(files)} file{'s' if len(files) != 1 else ''} invalid:\n"
            + "\n".join(problems)
        )
    console.next_steps(["aiaas cluster up [CONFIG]"])
