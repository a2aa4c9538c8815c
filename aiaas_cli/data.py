"""``aiaas data prepare CONFIG``: a data set → train/validation/test Parquet in storage."""

from __future__ import annotations

from pathlib import Path

import click

from aiaas.config import loader
from aiaas.config.dataset import DatasetConfig
from aiaas_cli import console, flags, target


@click.group()
def data() -> None:
    """Prepare data sets."""


@data.command()
@flags.config_argument
@flags.cluster_option
@flags.dry_run_option("Validate and say where it would write.")
@console.user_errors
def prepare(config_path: Path, cluster_path: Path, dry_run: bool) -> None:
    """Write the splits as partitioned Parquet with a schema and a content fingerprint."""
    from aiaas import datasets
    from aiaas.storage import Storage

    config = loader.load(config_path, DatasetConfig)
    storage = Storage(target.load_cluster(cluster_path).storage_root)
    where = storage.path("datasets", config.name)
    if dry_run:
        click.echo(f"would prepare '{config.name}' ({config.source.type}) into {where}")
        return
    schema = datasets.prepare(config, storage)
    rows = ", ".join(f"{split} {count}" for split, count in schema.rows.items())
    click.echo(f"Prepared '{schema.name}' in {where}")
    click.echo(f"  rows: {rows}; {len(schema.features)} features; {schema.num_classes} classes")
    click.echo(f"  fingerprint: {schema.fingerprint}")
    console.next_steps(
        [f"aiaas train CONFIG --follow   (a train config with 'dataset: {config.name}')"]
    )
