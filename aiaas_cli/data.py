"""``aiaas data prepare CONFIG``: a data set → train/validation/test Parquet in storage."""

from __future__ import annotations

from pathlib import Path

import click

from aiaas.config import loader
from aiaas.config.dataset import ChatSource, DatasetConfig, is_directory_reference
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
    """Write the splits as partitioned Parquet with a schema and a content fingerprint.

    Chat sources are tokenized with the chat template of the config's tokenizer (a registry
    version such as smollm2@production, fetched from the cluster's registry, or a directory).
    """
    from aiaas import datasets
    from aiaas.storage import Storage

    config = loader.load(config_path, DatasetConfig)
    cluster = target.load_cluster(cluster_path)
    storage = Storage(cluster.storage_root)
    where = storage.path("datasets", config.name)
    if dry_run:
        click.echo(f"would prepare '{config.name}' ({config.source.type}) into {where}")
        return
    if config.tokenizer is not None and not is_directory_reference(config.tokenizer):
        click.echo(f"registry: {target.use_registry(cluster)}")
    schema = datasets.prepare(config, storage)
    click.echo(f"Prepared '{schema.name}' in {where}")
    rows = ", ".join(f"{split} {count}" for split, count in schema.rows.items())
    if isinstance(schema, datasets.DatasetSchema):
        click.echo(f"  rows: {rows}; {len(schema.features)} features; {schema.num_classes} classes")
    else:
        tokens = ", ".join(f"{split} {count}" for split, count in schema.tokens.items())
        packed = "packed" if schema.packing else "padded"
        click.echo(f"  rows: {rows}; tokens: {tokens}")
        click.echo(
            f"  tokenizer: {schema.tokenizer}; {packed} to {schema.max_seq_len} tokens; loss on "
            f"the assistant turns only"
        )
    click.echo(f"  fingerprint: {schema.fingerprint}")
    if isinstance(config.source, ChatSource):
        console.next_steps(
            [f"aiaas finetune CONFIG --follow   (a finetune config with 'dataset: {config.name}')"]
        )
    else:
        console.next_steps(
            [f"aiaas train CONFIG --follow   (a train config with 'dataset: {config.name}')"]
        )
