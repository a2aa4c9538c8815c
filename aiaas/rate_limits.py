"""Token buckets for API keys: one per key for the whole cluster, not one per replica.

Every replica of every app asks one named actor (``aiaas-rate-limiter``, namespace ``aiaas``)
for tokens, so a key limited to N requests/s gets N/s however many replicas serve it. Only
requests of rate-limited keys reach the actor. To spare a round trip per request, a replica
leases a few tokens at a time (5% of a second's worth) and lets an unused lease lapse after
half a second: tokens only ever come out of the shared bucket, so a key never gets more than
its rate; what lapses unused is the most it can lose (a few % with a couple of replicas).
After a refusal the replica refuses on its own until the bucket can hold a token again, so
clients hammering past their limit cost the actor nothing more.

Keys limited in tokens per minute (the LLM app) have a second kind of bucket in the same actor,
kept apart from the request buckets: it holds a minute's worth of tokens, refills at a sixtieth
of that per second, and is debited after each request by the tokens it used, so it can go
negative (a request is never cut off mid-generation; the next ones wait until it refills). A
replica keeps its own view of such a bucket for :data:`VIEW_TTL_S`, see :class:`SharedLimiter`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

ACTOR_NAME = "aiaas-rate-limiter"
NAMESPACE = "aiaas"
LEASE_FRACTION = 0.05
LEASE_TTL_S = 0.5
#: How long a replica waits for the actor before it gives up (and answers 503).
CALL_TIMEOUT_S = 5.0
#: Buckets untouched this long are full again; dropping them equals keeping them.
IDLE_S = 60.0
#: How long a replica trusts its view of a token bucket (tokens/minute) without asking the actor.
VIEW_TTL_S = 1.0


class Unavailable(Exception):
    """The shared limiter cannot be reached: requests of limited keys are refused (503)."""


@dataclass
class Bucket:
    """Tokens refilled continuously at ``rate``/s up to ``capacity``; without a capacity, a
    burst of one second's worth (at least one token), as request limits have."""

    rate: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)
    capacity: float | None = None

    @property
    def _capacity(self) -> float:
        return self.capacity if self.capacity is not None else max(self.rate, 1.0)

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self._capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, want: int) -> tuple[int, float]:
        """Up to ``want`` whole tokens, and (when none is left) the seconds until one is."""
        self._refill()
        granted = min(want, int(self.tokens))
        self.tokens -= granted
        wait = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        return granted, wait

    def balance(self) -> float:
        """The tokens in the bucket now (negative after debits beyond it)."""
        self._refill()
        return self.tokens

    def debit(self, amount: float) -> float:
        """Take ``amount`` tokens, however few are left; returns the balance after."""
        self._refill()
        self.tokens -= amount
        return self.tokens

    def full_at(self, now: float) -> bool:
        """Whether the bucket is full again by ``now`` (dropping it then loses nothing)."""
        return self.tokens + (now - self.updated) * self.rate >= self._capacity


def bucket_for(
    buckets: dict[str, Bucket], name: str, rate: float, capacity: float | None = None
) -> Bucket:
    found = buckets.get(name)
    if found is None:
        found = buckets[name] = Bucket(rate, capacity or max(rate, 1.0), capacity=capacity)
    found.rate, found.capacity = rate, capacity  # a changed limit applies from now on
    return found


class RateLimiterActor:
    """The cluster's buckets, by name (keys file and key id): request buckets and, apart from
    them, token buckets. Async: one event loop runs every call, so two replicas never take the
    same token."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._token_buckets: dict[str, Bucket] = {}
        self._swept = time.monotonic()

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept > IDLE_S:
            self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < IDLE_S}
            # A token bucket in debt is kept until it has paid it back.
            self._token_buckets = {
                k: b for k, b in self._token_buckets.items() if not b.full_at(now)
            }
            self._swept = now

    async def take(self, name: str, rate: float, want: int) -> tuple[int, float]:
        self._sweep()
        return bucket_for(self._buckets, name, rate).take(want)

    async def balance(self, name: str, rate: float, capacity: float) -> float:
        """The token bucket's balance (a new bucket starts full)."""
        self._sweep()
        return bucket_for(self._token_buckets, name, rate, capacity).balance()

    async def debit(self, name: str, rate: float, capacity: float, amount: float) -> float:
        """Debit the token bucket by ``amount``; returns its balance after."""
        self._sweep()
        return bucket_for(self._token_buckets, name, rate, capacity).debit(amount)


class LocalLimiter:
    """Buckets of this process alone (a single process, or tests without Ray)."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._token_buckets: dict[str, Bucket] = {}

    def take_now(self, name: str, rate: float) -> bool:
        return bucket_for(self._buckets, name, rate).take(1)[0] == 1

    async def take(self, name: str, rate: float) -> bool:
        return self.take_now(name, rate)

    async def balance(self, name: str, rate: float, capacity: float) -> float:
        return bucket_for(self._token_buckets, name, rate, capacity).balance()

    async def debit(self, name: str, rate: float, capacity: float, amount: float) -> float:
        return bucket_for(self._token_buckets, name, rate, capacity).debit(amount)


@dataclass
class _View:
    """A replica's view of a token bucket: its balance when the actor last told it."""

    balance: float
    at: float

    def now(self, rate: float, capacity: float) -> float:
        return min(capacity, self.balance + (time.monotonic() - self.at) * rate)


@dataclass
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    refused_until: float = 0.0


class SharedLimiter:
    """One replica's side of the shared buckets: leases request tokens from the actor, and
    keeps a short-lived view of token buckets.

    A token bucket's view is the actor's last answer to :meth:`balance` or :meth:`debit`
    (this replica's own debits update it at once), refilled locally at the bucket's rate. For
    :data:`VIEW_TTL_S` after that answer the view admits without asking the actor; a view at or
    below zero refuses without asking whatever its age, erring only on the safe side (other
    replicas' debits can only empty a bucket further). The cost: for up to :data:`VIEW_TTL_S`
    after another replica emptied the bucket, this one still admits on its older view, until
    its own next debit brings back the actor's balance. For a client that waits for each answer,
    that is at most one request's worth of overshoot per replica; requests that arrive at once
    within that window all pass, as they would have had they come just before the bucket ran
    dry.
    """

    def __init__(self) -> None:
        self._actor: Any = None
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._views: dict[str, _View] = {}
        self._view_locks: dict[str, asyncio.Lock] = {}

    async def take(self, name: str, rate: float) -> bool:
        """Whether one request of the key may run now.

        Raises:
            Unavailable: The actor did not answer.
        """
        lease = self._leases.setdefault(name, _Lease())
        if self._spend(lease):
            return True
        if time.monotonic() < lease.refused_until:
            return False
        # One refill in flight per key: concurrent requests wait for it instead of each
        # leasing tokens they would then leave to lapse.
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self._spend(lease):
                return True
            want = max(1, int(rate * LEASE_FRACTION))
            try:
                granted, wait = await asyncio.wait_for(
                    self._handle().take.remote(name, rate, want), CALL_TIMEOUT_S
                )
            except Exception as exc:  # a dead or unreachable actor: found again next time
                self._actor = None
                raise Unavailable(f"the shared rate limiter did not answer: {exc}") from None
            now = time.monotonic()
            lease.refused_until = now + wait if granted == 0 else 0.0
            if granted == 0:
                return False
            lease.tokens, lease.expires = granted - 1, now + LEASE_TTL_S
            return True

    async def balance(self, name: str, rate: float, capacity: float) -> float:
        """The token bucket's balance as this replica sees it.

        Raises:
            Unavailable: The actor did not answer (and the view is too old to go by).
        """
        view = self._views.get(name)
        if view is not None:
            seen = view.now(rate, capacity)
            if seen <= 0 or time.monotonic() - view.at < VIEW_TTL_S:
                return seen
        # One question in flight per key, as for leases.
        async with self._view_locks.setdefault(name, asyncio.Lock()):
            view = self._views.get(name)
            if view is not None and time.monotonic() - view.at < VIEW_TTL_S:
                return view.now(rate, capacity)
            balance = await self._call("balance", name, rate, capacity)
            self._views[name] = _View(balance, time.monotonic())
            return balance

    async def debit(self, name: str, rate: float, capacity: float, amount: float) -> float:
        """Debit the token bucket; returns its balance after, as the actor has it.

        Raises:
            Unavailable: The actor did not answer.
        """
        balance = await self._call("debit", name, rate, capacity, amount)
        self._views[name] = _View(balance, time.monotonic())
        return balance

    async def _call(self, method: str, *args: object) -> float:
        try:
            remote = getattr(self._handle(), method, None)
            if remote is not None:
                result: float = await asyncio.wait_for(remote.remote(*args), CALL_TIMEOUT_S)
                return result
        except Exception as exc:  # a dead or unreachable actor: found again next time
            self._actor = None
            raise Unavailable(f"the shared rate limiter did not answer: {exc}") from None
        # The detached actor outlives apps: one started by an aiaas before token limits.
        raise Unavailable(
            f"the shared rate limiter ({ACTOR_NAME}) predates tokens/minute limits; restart "
            "the cluster (aiaas cluster down, then aiaas cluster up) to replace it"
        )

    @staticmethod
    def _spend(lease: _Lease) -> bool:
        if lease.tokens >= 1 and time.monotonic() < lease.expires:
            lease.tokens -= 1
            return True
        return False

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            options = {
                "name": ACTOR_NAME,
                "namespace": NAMESPACE,
                "get_if_exists": True,
                # Outlives the app that made it; every later app shares it.
                "lifetime": "detached",
                "num_cpus": 0,
                "max_restarts": -1,
                "max_concurrency": 1000,
            }
            try:
                self._actor = ray.remote(RateLimiterActor).options(**options).remote()
            except ValueError:  # another replica created it between our lookup and create
                self._actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        return self._actor
