"""``aiaas serve deploy | status | rollback | delete | keys``: Serve apps of registered models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from aiaas_cli import console, flags, target

if TYPE_CHECKING:
    from aiaas.config.cluster import ClusterConfig


@click.group("serve")
def serve() -> None:
    """Deploy registered models with Ray Serve, watch them, roll them back, manage API keys."""


@serve.command()
@flags.config_argument
@flags.cluster_option
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds to wait.")
@flags.dry_run_option("Validate and resolve versions; deploy nothing.")
@console.user_errors
def deploy(config_path: Path, cluster_path: Path, timeout_s: float, dry_run: bool) -> None:
    """Validate a Serve config (Serve's schema + each app's Args), deploy it, wait until healthy.

    Apps already running that the file does not name keep running.
    """
    from aiaas import serving

    cluster = target.load_cluster(cluster_path)
    target.use_registry(cluster)  # the registry is read (and aliases moved) in this process
    names = serving.deploy(cluster, config_path, timeout_s=timeout_s, dry_run=dry_run)
    if dry_run:
        click.echo(f"{config_path}: checks passed; would deploy {', '.join(names)}")
        return
    click.echo(f"Deployed {', '.join(names)} from {config_path}")
    _print_status(cluster, only=names)
    console.next_steps(["aiaas serve status"])


@serve.command()
@flags.cluster_option
@console.user_errors
def status(cluster_path: Path) -> None:
    """Apps, their status and replicas, and the version each model serves."""
    _print_status(target.load_cluster(cluster_path))


@serve.command()
@click.argument("app")
@flags.cluster_option
@console.user_errors
def rollback(app: str, cluster_path: Path) -> None:
    """Switch APP back to the versions it served before (its aliases move back too)."""
    from aiaas import serving

    cluster = target.load_cluster(cluster_path)
    target.use_registry(cluster)  # the registry is read (and aliases moved) in this process
    for line in serving.rollback(cluster, app):
        click.echo(f"{app}: {line}")


@serve.command()
@click.argument("app")
@flags.cluster_option
@console.user_errors
def delete(app: str, cluster_path: Path) -> None:
    """Delete APP; other apps keep running."""
    from aiaas import serving

    serving.delete(target.load_cluster(cluster_path), app)
    click.echo(f"Deleted Serve app '{app}'")


@serve.group()
def keys() -> None:
    """API keys of model-server apps (stored hashed under the storage root)."""


@keys.command("create")
@click.argument("key_id", metavar="NAME")
@click.option("--rate-limit", type=float, help="Requests per second for this key (429 above).")
@click.option(
    "--tokens-per-minute",
    type=int,
    metavar="N",
    help="Prompt + output tokens a minute for this key on LLM apps (429 while used up).",
)
@flags.keys_file_option
@flags.cluster_option
@console.user_errors
def create_key(
    key_id: str,
    rate_limit: float | None,
    tokens_per_minute: int | None,
    keys_file: str,
    cluster_path: Path,
) -> None:
    """Create a key; it is printed once and only its hash is stored.

    Safe beside another create or revoke of the same file (a lock beside it, on a local
    storage root); a damaged file is refused, never overwritten.
    """
    from aiaas import api_keys
    from aiaas.storage import Storage

    storage = Storage(target.load_cluster(cluster_path).storage_root)
    key = api_keys.create(storage, keys_file, key_id, rate_limit, tokens_per_minute)
    click.echo(key)
    click.echo(
        f"Stored the hash of key '{key_id}' in {storage.path(keys_file)}; the key is not "
        "kept anywhere, copy it now.",
        err=True,
    )


@keys.command("revoke")
@click.argument("key_id", metavar="NAME")
@flags.keys_file_option
@flags.cluster_option
@console.user_errors
def revoke_key(key_id: str, keys_file: str, cluster_path: Path) -> None:
    """Revoke a key (replicas stop accepting it within seconds)."""
    from aiaas import api_keys
    from aiaas.storage import Storage

    storage = Storage(target.load_cluster(cluster_path).storage_root)
    api_keys.revoke(storage, keys_file, key_id)
    click.echo(f"Revoked key '{key_id}'")


@keys.command("list")
@flags.keys_file_option
@flags.cluster_option
@console.user_errors
def list_keys(keys_file: str, cluster_path: Path) -> None:
    """Key names, limits and state (never the keys)."""
    from aiaas import api_keys
    from aiaas.storage import Storage

    storage = Storage(target.load_cluster(cluster_path).storage_root)
    for entry in api_keys.entries(storage, keys_file):
        state = "revoked" if entry.revoked else "live"
        limits = [f"{entry.rate_limit_per_s:g}/s"] if entry.rate_limit_per_s else []
        if entry.tokens_per_minute:
            limits.append(f"{entry.tokens_per_minute} tokens/min")
        click.echo(f"{entry.id:<24} {state:<8} {', '.join(limits) or 'no limit'}")


def _print_status(cluster: ClusterConfig, only: list[str] | None = None) -> None:
    from aiaas import serving

    url, apps = serving.status(cluster)
    if not apps:
        click.echo("No Serve apps are running.")
        console.next_steps(["aiaas serve deploy configs/serve/digits.yaml"])
        return
    click.echo(f"Serve: {url}")
    for app in apps:
        if only and app.name not in only:
            continue
        replicas = ", ".join(f"{count} {state}" for state, count in app.replicas.items()) or "-"
        click.echo(f"  {app.name}  {app.status}  route {app.route_prefix}  replicas: {replicas}")
        if app.message:
            click.echo(f"    {app.message}")
        if app.last_failure:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(app.last_failure["at"]))
            click.echo(
                f"    last failed switch ({when}, to {app.last_failure['model']}): "
                f"{app.last_failure['error']}"
            )
        for model in app.models:
            served = model.get("version") or "-"
            click.echo(
                f"    {model['name']}: {model['model']} → version {served} "
                f"(pinned {model.get('pinned') or '-'}, {model.get('format') or '?'})"
            )
            click.echo(f"      {model['url']}")
            failed = model.get("failed_version")
            if failed:
                click.echo(f"      FAILED to load version {failed['version']}: {failed['error']}")
            if model.get("error"):
                click.echo(f"      {model['error']}")
