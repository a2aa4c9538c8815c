"""API keys for inference endpoints: created once, stored hashed, checked in constant time.

The key file (JSON, under the storage root so every replica reads the same one) holds only
SHA-256 digests. Keys are 256-bit random tokens, so a fast digest is safe here the way it is for
GitHub's tokens: there is no password to guess. Replicas re-read the file every few seconds, so
``aiaas serve keys revoke`` takes effect without a redeploy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiaas import errors
from aiaas.storage import Storage

PREFIX = "aiaas_"
RELOAD_EVERY_S = 2.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _read(storage: Storage, path: str) -> dict[str, Any]:
    text = storage.read_text(path)
    if not text:
        return {"keys": []}
    try:
        data = json.loads(text)
    except ValueError:
        raise errors.ConfigError(
            f"{storage.path(path)} is not a JSON key file",
            "Recreate it with 'aiaas serve keys create'.",
        ) from None
    return data if isinstance(data, dict) and isinstance(data.get("keys"), list) else {"keys": []}


def create(storage: Storage, path: str, key_id: str, rate_limit_per_s: float | None) -> str:
    """Add a key named ``key_id``; returns the key itself, which is shown only this once.

    Raises:
        ConfigError: A live key of that name exists.
    """
    data = _read(storage, path)
    if any(entry["id"] == key_id and not entry.get("revoked") for entry in data["keys"]):
        raise errors.ConfigError(
            f"a key named '{key_id}' already exists in {storage.path(path)}",
            f"Pick another name, or revoke it first: aiaas serve keys revoke {key_id}",
        )
    key = PREFIX + secrets.token_urlsafe(32)
    data["keys"].append(
        {
            "id": key_id,
            "sha256": digest(key),
            "created": time.time(),
            "rate_limit_per_s": rate_limit_per_s,
            "revoked": False,
        }
    )
    storage.write_text(path, json.dumps(data, indent=2))
    return key


def revoke(storage: Storage, path: str, key_id: str) -> None:
    """Mark a key revoked (kept, so the file tells who had access when).

    Raises:
        ConfigError: No live key of that name.
    """
    data = _read(storage, path)
    live = [e for e in data["keys"] if e["id"] == key_id and not e.get("revoked")]
    if not live:
        raise errors.ConfigError(
            f"no live key named '{key_id}' in {storage.path(path)}",
            "List them with: aiaas serve keys list",
        )
    for entry in live:
        entry["revoked"] = True
        entry["revoked_at"] = time.time()
    storage.write_text(path, json.dumps(data, indent=2))


def entries(storage: Storage, path: str) -> list[dict[str, Any]]:
    """The key file's entries (digests, never keys)."""
    return list(_read(storage, path)["keys"])


class Denied(Exception):
    """A request without a valid key (401) or over its key's rate (429)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Bucket:
    rate: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        # A burst of one second's worth of requests, refilled continuously.
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyRing:
    """The live keys of one key file, as a replica checks them."""

    def __init__(self, storage: Storage, path: str) -> None:
        self._storage, self._path = storage, path
        self._live: list[dict[str, Any]] = []
        self._buckets: dict[str, _Bucket] = {}
        self._loaded = 0.0
        self._reload()

    def _reload(self) -> None:
        self._live = [e for e in entries(self._storage, self._path) if not e.get("revoked")]
        self._loaded = time.monotonic()

    def check(self, authorization: str | None) -> str:
        """The key id of a request's ``Authorization`` header.

        Raises:
            Denied: No key, an unknown or revoked key (401), or over the key's rate (429).
        """
        if time.monotonic() - self._loaded > RELOAD_EVERY_S:
            self._reload()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Denied(401, "missing_api_key", "send 'Authorization: Bearer <key>'")
        wanted = digest(key.strip())
        found = None
        for entry in self._live:  # every entry compared, in constant time each
            if hmac.compare_digest(entry["sha256"], wanted):
                found = entry
        if found is None:
            raise Denied(401, "invalid_api_key", "the API key is unknown or revoked")
        rate = found.get("rate_limit_per_s")
        if rate:
            bucket = self._buckets.setdefault(found["id"], _Bucket(rate=rate, tokens=rate))
            bucket.rate = rate
            if not bucket.take():
                raise Denied(
                    429, "rate_limited", f"key '{found['id']}' is limited to {rate:g} requests/s"
                )
        return str(found["id"])
