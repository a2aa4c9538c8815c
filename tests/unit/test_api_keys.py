"""API keys: concurrent changes never lose one, a damaged key file is refused by the CLI and
fails closed in replicas, and rate limits hold across replicas (a fake shared limiter)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from aiaas import api_keys, errors, rate_limits
from aiaas.storage import Storage
from aiaas_cli.main import cli
from tests.support import REPO


def test_keys_created_and_revoked_at_once_are_all_kept_and_none_comes_back(
    tmp_path: Path,
) -> None:
    storage = Storage(str(tmp_path))
    for i in range(12):
        api_keys.create(storage, "keys.json", f"old-{i}", None)

    def change(i: int) -> None:
        if i % 2:
            api_keys.revoke(storage, "keys.json", f"old-{i // 2}")
        else:
            api_keys.create(storage, "keys.json", f"new-{i // 2}", 5)

    # Every create and revoke reads, changes and writes the whole file: without the lock,
    # one that read before another wrote puts a revoked key back or drops a new one.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(change, range(24)))
    found = {entry.id: entry for entry in api_keys.entries(storage, "keys.json")}
    assert {f"new-{i}" for i in range(12)} <= found.keys()
    assert all(found[f"old-{i}"].revoked for i in range(12))
    assert not any(found[f"new-{i}"].revoked for i in range(12))
    assert len(found) == 24


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("{not json", "Invalid JSON"),
        ('{"keys": {"ci": 1}}', "keys: Input should be a valid array"),
        ('{"keys": [{"id": "ci"}]}', "keys.0.sha256: Field required"),
        ('[{"id": "ci"}]', "Input should be an object"),
    ],
)
def test_a_damaged_key_file_is_refused_and_denies_every_request(
    tmp_path: Path, text: str, detail: str
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    key = api_keys.create(storage, "serve/api_keys.json", "ci", None)
    path = tmp_path / "storage" / "serve" / "api_keys.json"
    ring = api_keys.KeyRing(storage, "serve/api_keys.json")
    assert ring.check(f"Bearer {key}") == "ci"
    path.write_text(text)

    config = tmp_path / "cluster.yaml"
    config.write_text(
        (REPO / "configs/cluster/local.yaml")
        .read_text()
        .replace("storage_root: ~/.aiaas", f"storage_root: {tmp_path}/storage")
    )
    runner = CliRunner()
    for command in (["list"], ["create", "other"], ["revoke", "ci"]):
        result = runner.invoke(cli, ["serve", "keys", *command, "--cluster", str(config)])
        assert result.exit_code == 1, result.output
        assert f"Error: {path} is damaged (" in result.output
        assert detail in result.output
        assert f"mv {path} {path}.damaged" in result.output
        assert "Traceback" not in result.output
    assert path.read_text() == text  # refused, never overwritten

    # Replicas refuse every request, with the right key too, until the file is fixed.
    ring._loaded = time.monotonic() - 10
    with pytest.raises(api_keys.Denied) as denied:
        ring.check(f"Bearer {key}")
    assert (denied.value.status, denied.value.code) == (503, "keys_unavailable")
    assert "is damaged" in denied.value.message
    fresh = api_keys.KeyRing(storage, "serve/api_keys.json")  # a replica starting now
    with pytest.raises(api_keys.Denied):
        fresh.check(f"Bearer {key}")


def test_a_key_file_that_is_not_utf8_is_damaged_too(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    (tmp_path / "keys.json").write_bytes(b'{"keys": ["\xff"]}')
    with pytest.raises(errors.ConfigError, match="is damaged \\(not UTF-8 text\\)"):
        api_keys.entries(storage, "keys.json")


def test_older_key_files_still_load(tmp_path: Path) -> None:
    entry = {
        "id": "ci",
        "sha256": api_keys.digest("aiaas_x"),
        "created": 1.0,
        "rate_limit_per_s": None,
        "revoked": True,
        "revoked_at": 2.0,
    }
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [entry]}, indent=2))
    assert api_keys.entries(Storage(str(tmp_path)), "keys.json")[0].revoked


class _FakeActor:
    """The shared limiter's actor in this process: ``take.remote`` like a Ray actor method."""

    def __init__(self) -> None:
        self.actor = rate_limits.RateLimiterActor()
        self.calls = 0
        outer = self

        class _Method:
            def remote(self, *args: object) -> object:
                outer.calls += 1
                return outer.actor.take(*args)  # type: ignore[arg-type]

        self.take = _Method()


def test_replicas_share_one_bucket_per_key_and_unlimited_keys_skip_it(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    limited = api_keys.create(storage, "keys.json", "ci", 40)
    free = api_keys.create(storage, "keys.json", "bulk", None)
    actor = _FakeActor()
    replicas = [api_keys.KeyRing(storage, "keys.json", shared=True) for _ in range(3)]
    for ring in replicas:
        assert ring._shared is not None
        ring._shared._actor = actor

    async def load(seconds: float) -> tuple[int, int]:
        allowed = denied = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for ring in replicas:
                try:
                    await ring.admit(f"Bearer {limited}")
                    allowed += 1
                except api_keys.Denied as exc:
                    assert exc.status == 429
                    denied += 1
            await asyncio.sleep(0.002)
        return allowed, denied

    allowed, denied = asyncio.run(load(1.5))
    # A burst of one second's worth, then 40/s, shared by the three (not 3 × 40/s).
    assert 40 + 1.5 * 40 * 0.8 <= allowed <= 40 + 1.5 * 40 * 1.05, allowed
    assert denied > allowed
    calls = actor.calls
    # Leases of 2 tokens and local refusals: far fewer actor calls than requests.
    assert calls < (allowed + denied) / 3, (calls, allowed, denied)
    for ring in replicas:
        assert asyncio.run(ring.admit(f"Bearer {free}")) == "bulk"
    assert actor.calls == calls


def test_status_routes_take_the_control_token_and_predict_does_not(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "ci", None)
    ring = api_keys.KeyRing(storage, "keys.json", control_token="cluster-token")
    assert asyncio.run(ring.admit("Bearer cluster-token", status=True)) == "control"
    with pytest.raises(api_keys.Denied) as denied:
        asyncio.run(ring.admit("Bearer cluster-token"))
    assert denied.value.status == 401


def test_an_unreachable_shared_limiter_refuses_limited_keys(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    key = api_keys.create(storage, "keys.json", "ci", 5)
    ring = api_keys.KeyRing(storage, "keys.json", shared=True)

    class _Broken:
        class take:
            @staticmethod
            def remote(*args: object) -> object:
                raise ConnectionError("actor died")

    assert ring._shared is not None
    ring._shared._actor = _Broken()
    with pytest.raises(api_keys.Denied) as denied:
        asyncio.run(ring.admit(f"Bearer {key}"))
    assert (denied.value.status, denied.value.code) == (503, "rate_limiter_unavailable")
    assert ring._shared._actor is None  # looked up again next time
