"""Tokens-per-minute limits of API keys (the LLM app): a bucket of a minute's worth, debited after
each request and refilled over time, in this process and shared by replicas (a fake actor)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from aiaas import api_keys, rate_limits
from aiaas.storage import Storage
from aiaas_cli.main import cli
from tests.support import REPO


class _FakeActor:
    """The shared limiter's actor in this process: ``method.remote`` like a Ray actor's."""

    def __init__(self) -> None:
        self.actor = rate_limits.RateLimiterActor()
        self.calls: dict[str, int] = {}

    def __getattr__(self, method: str) -> Any:
        outer, call = self, getattr(self.actor, method)

        class _Method:
            def remote(self, *args: Any) -> Any:
                outer.calls[method] = outer.calls.get(method, 0) + 1
                return call(*args)

        return _Method()


def _denied(coroutine: Any) -> api_keys.Denied:
    with pytest.raises(api_keys.Denied) as denied:
        asyncio.run(coroutine)
    return denied.value


def test_a_debit_that_empties_the_bucket_refuses_until_it_refills(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", None, tokens_per_minute=600)  # 10 tokens/s
    ring = api_keys.KeyRing(storage, "keys.json")
    asyncio.run(ring.admit_tokens("chat"))  # a new bucket is full: a minute's worth
    # One long answer takes the minute's worth and more: it is served whole, the next waits.
    asyncio.run(ring.charge_tokens("chat", 605))
    denied = _denied(ring.admit_tokens("chat"))
    assert (denied.status, denied.code) == (429, "token_limited")
    assert denied.message == "key 'chat' is limited to 600 tokens/minute; retry in 1 s"
    time.sleep(0.7)  # 10 tokens/s: the 5 owed are paid back, and some
    asyncio.run(ring.admit_tokens("chat"))


def test_retry_in_says_how_long_the_debt_takes_to_pay_back(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", None, tokens_per_minute=60)  # 1 token/s
    ring = api_keys.KeyRing(storage, "keys.json")
    asyncio.run(ring.charge_tokens("chat", 60 + 41))
    assert _denied(ring.admit_tokens("chat")).message.endswith("; retry in 41 s")


def test_keys_without_a_token_limit_and_the_control_token_are_never_refused(
    tmp_path: Path,
) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "bulk", 5)
    ring = api_keys.KeyRing(storage, "keys.json", shared=True)
    assert ring._shared is not None
    actor = _FakeActor()
    ring._shared._actor = actor
    for key_id in ("bulk", "control", "nobody"):
        for _ in range(3):
            asyncio.run(ring.charge_tokens(key_id, 10**9))
            asyncio.run(ring.admit_tokens(key_id))
    assert actor.calls == {}  # none of them reaches the shared limiter


def test_token_buckets_are_apart_from_request_buckets(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    key = api_keys.create(storage, "keys.json", "chat", 1, tokens_per_minute=60)
    ring = api_keys.KeyRing(storage, "keys.json")
    asyncio.run(ring.charge_tokens("chat", 1000))
    assert asyncio.run(ring.admit(f"Bearer {key}")) == "chat"  # requests are not tokens
    assert _denied(ring.admit(f"Bearer {key}")).code == "rate_limited"
    assert _denied(ring.admit_tokens("chat")).code == "token_limited"


def test_the_actor_keeps_a_token_bucket_that_goes_negative_and_refills() -> None:
    actor = rate_limits.RateLimiterActor()
    # 600 tokens/minute: 10/s, a minute's worth (600) at most.
    assert asyncio.run(actor.balance("k", 10.0, 600.0)) == 600.0
    assert asyncio.run(actor.debit("k", 10.0, 600.0, 602)) == pytest.approx(-2, abs=0.1)
    assert asyncio.run(actor.balance("k", 10.0, 600.0)) < 0
    time.sleep(0.3)  # 10 tokens/s: the 2 owed are paid back
    assert asyncio.run(actor.balance("k", 10.0, 600.0)) > 0
    # The request bucket of the same name is another one, still full.
    assert asyncio.run(actor.take("k", 2.0, 5)) == (2, 0.5)
    # A bucket never holds more than its capacity, however long it sat.
    actor._token_buckets["k"].updated -= 3600
    assert asyncio.run(actor.balance("k", 10.0, 600.0)) == 600.0


def test_idle_token_buckets_are_dropped_only_once_their_debt_is_paid() -> None:
    actor = rate_limits.RateLimiterActor()
    asyncio.run(actor.debit("paid", 1.0, 60.0, 60))
    asyncio.run(actor.debit("owing", 1.0, 60.0, 10_000))
    for bucket in actor._token_buckets.values():
        bucket.updated -= 2 * rate_limits.IDLE_S
    actor._swept -= 2 * rate_limits.IDLE_S
    asyncio.run(actor.balance("other", 1.0, 60.0))  # any call sweeps
    assert set(actor._token_buckets) == {"owing", "other"}


def test_replicas_share_one_token_bucket_and_go_by_a_short_lived_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", None, tokens_per_minute=600)
    actor = _FakeActor()
    first, second = (api_keys.KeyRing(storage, "keys.json", shared=True) for _ in range(2))
    for ring in (first, second):
        assert ring._shared is not None
        ring._shared._actor = actor

    asyncio.run(first.admit_tokens("chat"))
    asyncio.run(first.admit_tokens("chat"))
    assert actor.calls == {"balance": 1}  # the second goes by the view
    asyncio.run(second.charge_tokens("chat", 700))  # the other replica empties the bucket
    denied = _denied(second.admit_tokens("chat"))  # its debit told it the balance
    assert denied.code == "token_limited"
    # The first replica's view is still fresh: one request's worth more may pass there...
    asyncio.run(first.admit_tokens("chat"))
    # ...and its own debit brings back the actor's balance, so the next one is refused.
    asyncio.run(first.charge_tokens("chat", 10))
    assert _denied(first.admit_tokens("chat")).code == "token_limited"
    calls = dict(actor.calls)
    assert first._shared is not None
    (view,) = first._shared._views.values()
    view.at -= 5  # stale, and still 110 - 5 × 10 tokens short: refused without asking
    assert _denied(first.admit_tokens("chat")).message.endswith("; retry in 6 s")
    assert actor.calls == calls

    # Without a fresh view every admission asks the actor, which has the whole cluster's debits.
    monkeypatch.setattr(rate_limits, "VIEW_TTL_S", 0.0)
    api_keys.create(storage, "keys.json", "other", None, tokens_per_minute=600)
    for ring in (first, second):
        ring._loaded = 0.0  # re-read the key file
    asyncio.run(first.admit_tokens("other"))
    asyncio.run(second.charge_tokens("other", 610))
    assert _denied(first.admit_tokens("other")).code == "token_limited"


def test_an_unreachable_shared_limiter_refuses_token_limited_keys_and_charges_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", None, tokens_per_minute=600)
    ring = api_keys.KeyRing(storage, "keys.json", shared=True)

    class _Broken:
        def __getattr__(self, method: str) -> Any:
            raise ConnectionError("actor died")

    assert ring._shared is not None
    ring._shared._actor = _Broken()
    denied = _denied(ring.admit_tokens("chat"))
    assert (denied.status, denied.code) == (503, "rate_limiter_unavailable")
    assert denied.message == "the shared rate limiter did not answer: actor died"
    assert ring._shared._actor is None  # looked up again next time
    ring._shared._actor = _Broken()
    asyncio.run(ring.charge_tokens("chat", 50))  # never raises: the answer is sent already
    assert "could not charge 50 tokens to key 'chat'" in caplog.text


def test_an_actor_from_before_token_limits_is_named_with_the_fix(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", None, tokens_per_minute=600)
    ring = api_keys.KeyRing(storage, "keys.json", shared=True)

    class _Old:  # an actor handle of the class before balance/debit
        take = object()

    assert ring._shared is not None
    ring._shared._actor = _Old()
    denied = _denied(ring.admit_tokens("chat"))
    assert denied.status == 503
    assert "predates tokens/minute limits; restart the cluster" in denied.message


def test_the_key_file_keeps_the_token_limit_and_leaves_it_out_when_unset(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    api_keys.create(storage, "keys.json", "chat", 2.5, tokens_per_minute=12_000)
    api_keys.create(storage, "keys.json", "bulk", None)
    saved = json.loads((tmp_path / "keys.json").read_text())
    # Unset, the field is left out, so replicas of an aiaas without it still read the file.
    assert [e.get("tokens_per_minute", "absent") for e in saved["keys"]] == [12_000, "absent"]
    chat, bulk = api_keys.entries(storage, "keys.json")
    assert (chat.tokens_per_minute, chat.rate_limit_per_s) == (12_000, 2.5)
    assert bulk.tokens_per_minute is None
    api_keys.revoke(storage, "keys.json", "chat")  # a rewrite keeps it
    assert json.loads((tmp_path / "keys.json").read_text())["keys"][0]["tokens_per_minute"] == (
        12_000
    )


@pytest.fixture()
def cluster_file(tmp_path: Path) -> Path:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        (REPO / "configs/cluster/local.yaml")
        .read_text()
        .replace("storage_root: ~/.aiaas", f"storage_root: {tmp_path}/storage")
    )
    return config


def test_the_cli_creates_lists_and_validates_token_limits(cluster_file: Path) -> None:
    runner = CliRunner()
    keys = ["serve", "keys"]
    where = ["--cluster", str(cluster_file)]
    created = runner.invoke(
        cli, [*keys, "create", "chat", "--tokens-per-minute", "20000", "--rate-limit", "2", *where]
    )
    assert created.exit_code == 0, created.output
    assert runner.invoke(cli, [*keys, "create", "bulk", *where]).exit_code == 0
    listed = runner.invoke(cli, [*keys, "list", *where])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split(None, 2) == ["chat", "live", "2/s, 20000 tokens/min"]
    assert lines[1].split(None, 2) == ["bulk", "live", "no limit"]

    for bad in ("0", "-5"):
        result = runner.invoke(cli, [*keys, "create", "x", "--tokens-per-minute", bad, *where])
        assert result.exit_code == 1, result.output
        assert result.output == (
            f"Error: --tokens-per-minute must be a positive whole number of tokens, not {bad}\n"
            "Omit it for no limit.\n"
        )
    result = runner.invoke(cli, [*keys, "create", "x", "--tokens-per-minute", "1.5", *where])
    assert result.exit_code == 1
    assert "Invalid value for '--tokens-per-minute': '1.5' is not a valid integer" in (
        result.output
    )
    listed = runner.invoke(cli, [*keys, "list", *where])
    assert len(listed.output.splitlines()) == 2  # nothing was stored for a bad value
