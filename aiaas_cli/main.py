"""The umbrella ``aiaas`` command.

Subcommand groups are named by import string and imported only when used (click's LazyGroup
pattern), so ``aiaas --help`` stays fast and imports neither torch nor Ray. Every group lives in
this package; each command imports the ``cluster``/``jobs``/``aiaas`` functions it calls inside
its body, so a group's own ``--help`` stays light too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

#: name → ("module:attribute", one-line help shown by `aiaas --help` without importing it).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("aiaas_cli.validate:validate", "Validate config files of any kind."),
    "cluster": ("aiaas_cli.cluster:cluster", "Start, inspect, stop or render the Ray cluster."),
    "data": ("aiaas_cli.data:data", "Prepare data sets as Parquet under the storage root."),
    "train": ("aiaas_cli.jobs:train", "Submit a training job (Ray Train) through Ray Jobs."),
    "tune": ("aiaas_cli.jobs:tune", "Submit a hyperparameter search (Ray Tune) through Ray Jobs."),
    "finetune": (
        "aiaas_cli.jobs:finetune",
        "Submit an LLM fine-tuning job (LoRA or full, Ray Train) through Ray Jobs.",
    ),
    "jobs": ("aiaas_cli.jobs:jobs_group", "List, inspect, follow and stop jobs."),
    "models": ("aiaas_cli.models:models", "Registered models: list, show, promote, optimize."),
    "serve": ("aiaas_cli.serve:serve", "Deploy models with Ray Serve; status, rollback, keys."),
    "monitor": ("aiaas_cli.monitor:monitor", "Prometheus, alert rules and Grafana dashboards."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._lazy:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = self._lazy[cmd_name][0].split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except SystemExit as exc:
            # click exits 2 on a usage error; every user error of aiaas exits 1 (PRODUCT.md §2).
            if exc.code == 2:
                sys.exit(1)
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The listing uses the help strings above, so `aiaas --help` imports no group.
        rows = [(name, self._lazy[name][1]) for name in sorted(self._lazy)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="aiaas")
def cli() -> None:
    """aiaas: train, register, serve and watch models on a Ray cluster, driven by YAML.

    Every command checks its inputs before it touches Ray, prints what it did and what to run
    next, and exits 1 with 'Error: ...' on a problem you can fix (AIAAS_DEBUG=1 shows tracebacks).
    """
