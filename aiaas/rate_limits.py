"""Token buckets for API keys: one per key for the whole cluster, not one per replica.

Every replica of every app asks one named actor (``aiaas-rate-limiter``, namespace ``aiaas``)
for tokens, so a key limited to N requests/s gets N/s however many replicas serve it. Only
requests of rate-limited keys reach the actor. To spare a round trip per request, a replica
leases a few tokens at a time (5% of a second's worth) and lets an unused lease lapse after
half a second: tokens only ever come out of the shared bucket, so a key never gets more than
its rate; what lapses unused is the most it can lose (a few % with a couple of replicas).
After a refusal the replica refuses on its own until the bucket can hold a token again, so
clients hammering past their limit cost the actor nothing more.
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


class Unavailable(Exception):
    """The shared limiter cannot be reached: requests of limited keys are refused (503)."""


@dataclass
class Bucket:
    """A burst of one second's worth of requests (at least one), refilled continuously."""

    rate: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self, want: int) -> tuple[int, float]:
        """Up to ``want`` whole tokens, and (when none is left) the seconds until one is."""
        now = time.monotonic()
        capacity = max(self.rate, 1.0)
        self.tokens = min(capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        granted = min(want, int(self.tokens))
        self.tokens -= granted
        wait = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        return granted, wait


def bucket_for(buckets: dict[str, Bucket], name: str, rate: float) -> Bucket:
    found = buckets.get(name)
    if found is None:
        found = buckets[name] = Bucket(rate, max(rate, 1.0))
    found.rate = rate  # a changed limit applies from now on
    return found


class RateLimiterActor:
    """The cluster's buckets, by name (keys file and key id). Async: one event loop runs every
    ``take``, so two replicas never take the same token."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._swept = time.monotonic()

    async def take(self, name: str, rate: float, want: int) -> tuple[int, float]:
        now = time.monotonic()
        if now - self._swept > IDLE_S:
            self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < IDLE_S}
            self._swept = now
        return bucket_for(self._buckets, name, rate).take(want)


class LocalLimiter:
    """Buckets of this process alone (a single process, or tests without Ray)."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}

    def take_now(self, name: str, rate: float) -> bool:
        return bucket_for(self._buckets, name, rate).take(1)[0] == 1

    async def take(self, name: str, rate: float) -> bool:
        return self.take_now(name, rate)


@dataclass
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    refused_until: float = 0.0


class SharedLimiter:
    """One replica's side of the shared buckets: leases tokens from the actor."""

    def __init__(self) -> None:
        self._actor: Any = None
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

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
