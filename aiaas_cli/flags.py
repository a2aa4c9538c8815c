"""Options and arguments that several commands share, defined once (as SkyPilot's
``sky/client/cli/flags.py``): same name, default and help wherever they appear."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DEFAULT_CLUSTER = Path("configs/cluster/local.yaml")
DEFAULT_MONITORING = Path("configs/monitoring/default.yaml")
DEFAULT_KEYS_FILE = "serve/api_keys.json"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def cluster_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--cluster CONFIG``: the cluster config (default configs/cluster/local.yaml)."""
    return click.option(
        "--cluster",
        "cluster_path",
        type=click.Path(path_type=Path),
        default=DEFAULT_CLUSTER,
        show_default=True,
        help="Cluster config naming the Jobs API address, MLflow URL and storage root.",
    )(func)


#: ``CONFIG``: the config file a command acts on (``config_path``).
config_argument: Decorator = click.argument(
    "config_path", metavar="CONFIG", type=click.Path(path_type=Path)
)

#: ``[CONFIG]`` of the ``cluster`` group: the cluster config, default configs/cluster/local.yaml.
cluster_config_argument: Decorator = click.argument(
    "config_path", metavar="[CONFIG]", required=False, type=click.Path(path_type=Path)
)

#: ``--config``: the monitoring config of the ``monitor`` commands.
monitoring_option: Decorator = click.option(
    "--config",
    "monitoring_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_MONITORING,
    show_default=True,
    help="Monitoring config: scrape interval, alert thresholds, dashboards.",
)

#: ``--file``: the API key file of the ``serve keys`` commands.
keys_file_option: Decorator = click.option(
    "--file",
    "keys_file",
    default=DEFAULT_KEYS_FILE,
    show_default=True,
    help="Key file under the storage root (the app's api_keys_file).",
)


def dry_run_option(help_text: str) -> Decorator:
    """``--dry-run``: every changing command has one; ``help_text`` says what it still does."""
    return click.option("--dry-run", is_flag=True, help=help_text)


def follow_option(help_text: str) -> Decorator:
    """``--follow``: wait for the submitted job; ``help_text`` says what is shown meanwhile."""
    return click.option("--follow", is_flag=True, help=help_text)


def json_option(help_text: str) -> Decorator:
    """``--json`` (``as_json``): print the whole object as JSON instead of the text view."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)
