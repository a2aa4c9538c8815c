"""API keys for inference endpoints: created once, stored hashed, checked in constant time.

The key file (JSON, under the storage root so every replica reads the same one) holds only
SHA-256 digests. Keys are 256-bit random tokens, so a fast digest is safe here the way it is for
GitHub's tokens: there is no password to guess. Replicas re-read the file every few seconds, so
``aiaas serve keys revoke`` takes effect without a redeploy. A file that cannot be read or does
not parse is never taken for "no keys": the CLI refuses to change it and replicas refuse every
request (503) until it is fixed.

A key may also be limited in tokens per minute (prompt and output tokens of the LLM app):
:meth:`KeyRing.admit_tokens` before a request, :meth:`KeyRing.charge_tokens` after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiaas import errors, rate_limits, ray_auth
from aiaas.storage import Storage

PREFIX = "aiaas_"
RELOAD_EVERY_S = 2.0

logger = logging.getLogger("ray.serve")


class KeyEntry(BaseModel):
    """One key of the file: its digest, never the key."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="the key's name")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex")
    created: float = Field(description="Unix time of creation")
    rate_limit_per_s: float | None = Field(None, gt=0, description="requests/s; None: no limit")
    tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="prompt + output tokens/minute (LLM app); None: no limit",
    )
    revoked: bool = Field(
        False, description="revoked keys are kept so the file tells who had access"
    )
    revoked_at: float | None = Field(None, description="Unix time of revocation")


class KeyFile(BaseModel):
    """The key file."""

    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list, description="every key, live or revoked")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def damaged(storage: Storage, path: str, detail: str) -> errors.ConfigError:
    full = storage.path(path)
    return errors.ConfigError(
        f"{full} is damaged ({detail}); replicas using it refuse every request until it is fixed",
        f"Restore it from a backup, or move it aside (mv {full} {full}.damaged) and create "
        "the keys again: aiaas serve keys create NAME",
    )


def read(storage: Storage, path: str) -> KeyFile:
    """The key file; an empty one when it does not exist.

    Raises:
        ConfigError: The file is not a key file (not UTF-8, not JSON, wrong fields).
        StorageError: The storage root cannot be read.
    """
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError:
        raise damaged(storage, path, "not UTF-8 text") from None
    except OSError as exc:
        raise errors.StorageError(
            f"cannot read {storage.path(path)}: {exc}", "Check the storage root."
        ) from None
    if text is None:
        return KeyFile()
    try:
        return KeyFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise damaged(storage, path, f"{where + ': ' if where else ''}{first['msg']}") from None


@contextlib.contextmanager
def _locked(storage: Storage, path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` around a read-modify-write of the key file.

    Two ``create``/``revoke`` at once then run one after the other, so neither writes back a
    file without the other's change (a revoked key coming back). Local storage roots only: on
    s3:// and gs:// each write still replaces the whole object atomically (readers never see
    half a file), but two writers at the same moment can lose one change; make key changes
    from one place there.
    """
    if not storage.is_local:
        yield
        return
    lock_path = f"{storage.path(path)}.lock"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _write(storage: Storage, path: str, data: KeyFile) -> None:
    # Without a tokens/minute limit the field is left out: replicas of an aiaas before it
    # (extra="forbid") would take the file for damaged and refuse every request.
    unset = {i: {"tokens_per_minute"} for i, e in enumerate(data.keys) if not e.tokens_per_minute}
    storage.write_text(path, data.model_dump_json(indent=2, exclude={"keys": unset}))


def create(
    storage: Storage,
    path: str,
    key_id: str,
    rate_limit_per_s: float | None,
    tokens_per_minute: int | None = None,
) -> str:
    """Add a key named ``key_id``; returns the key itself, which is shown only this once.

    Raises:
        ConfigError: A live key of that name exists, a bad limit, or the file is damaged.
    """
    if rate_limit_per_s is not None and not rate_limit_per_s > 0:
        raise errors.ConfigError(
            f"--rate-limit must be a positive number of requests/s, not {rate_limit_per_s:g}",
            "Omit it for no limit.",
        )
    if tokens_per_minute is not None and not tokens_per_minute > 0:
        raise errors.ConfigError(
            f"--tokens-per-minute must be a positive whole number of tokens, "
            f"not {tokens_per_minute}",
            "Omit it for no limit.",
        )
    with _locked(storage, path):
        data = read(storage, path)
        if any(entry.id == key_id and not entry.revoked for entry in data.keys):
            raise errors.ConfigError(
                f"a key named '{key_id}' already exists in {storage.path(path)}",
                f"Pick another name, or revoke it first: aiaas serve keys revoke {key_id}",
            )
        key = PREFIX + secrets.token_urlsafe(32)
        data.keys.append(
            KeyEntry(
                id=key_id,
                sha256=digest(key),
                created=time.time(),
                rate_limit_per_s=rate_limit_per_s,
                tokens_per_minute=tokens_per_minute,
            )
        )
        _write(storage, path, data)
    return key


def revoke(storage: Storage, path: str, key_id: str) -> None:
    """Mark a key revoked (kept, so the file tells who had access when).

    Raises:
        ConfigError: No live key of that name, or the file is damaged.
    """
    with _locked(storage, path):
        data = read(storage, path)
        live = [e for e in data.keys if e.id == key_id and not e.revoked]
        if not live:
            raise errors.ConfigError(
                f"no live key named '{key_id}' in {storage.path(path)}",
                "List them with: aiaas serve keys list",
            )
        for entry in live:
            entry.revoked, entry.revoked_at = True, time.time()
        _write(storage, path, data)


def entries(storage: Storage, path: str) -> list[KeyEntry]:
    """The key file's entries (digests, never keys)."""
    return list(read(storage, path).keys)


class Denied(Exception):
    """A request without a valid key (401), over its key's rate or tokens (429), or while the
    keys or limits cannot be checked (503)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class KeyRing:
    """The live keys of one key file, as a replica checks them.

    Args:
        storage: The storage root.
        path: The key file under it.
        shared: Limit rates and tokens cluster-wide through :class:`rate_limits.SharedLimiter`
            (replicas); otherwise per process.
        control_token: A credential that opens the status routes too (the cluster's own
            token, which the control plane holds), compared by digest like keys.
    """

    def __init__(
        self,
        storage: Storage,
        path: str,
        shared: bool = False,
        control_token: str | None = None,
    ) -> None:
        self._storage, self._path = storage, path
        self._bucket_prefix = f"{storage.path(path)}#"
        self._live: list[KeyEntry] = []
        self._error: str | None = None
        self._local = rate_limits.LocalLimiter()
        self._shared = rate_limits.SharedLimiter() if shared else None
        self._control = digest(control_token) if control_token else None
        self._loaded = 0.0
        self._reload()

    def _reload(self) -> None:
        try:
            live = [e for e in entries(self._storage, self._path) if not e.revoked]
        except errors.AiaasError as exc:
            # Fail closed: a file being damaged may be a revocation gone wrong.
            self._live, self._error = [], exc.message
        else:
            self._live, self._error = live, None
        self._loaded = time.monotonic()

    def _fresh(self) -> None:
        if time.monotonic() - self._loaded > RELOAD_EVERY_S:
            self._reload()

    def authenticate(self, authorization: str | None, status: bool = False) -> KeyEntry | None:
        """The key entry of a request's ``Authorization`` header; None for the control token
        on a status route (``status``).

        Raises:
            Denied: No key, an unknown or revoked key (401), or an unreadable key file (503).
        """
        self._fresh()
        if self._error is not None:
            raise Denied(503, "keys_unavailable", f"API keys cannot be checked: {self._error}")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Denied(401, "missing_api_key", "send 'Authorization: Bearer <key>'")
        wanted = digest(key.strip())
        found = None
        for entry in self._live:  # every entry compared, in constant time each
            if hmac.compare_digest(entry.sha256, wanted):
                found = entry
        if found is None:
            if status and self._control and hmac.compare_digest(self._control, wanted):
                return None
            raise Denied(401, "invalid_api_key", "the API key is unknown or revoked")
        return found

    def check(self, authorization: str | None) -> str:
        """The key id of a request, with this process's own rate buckets.

        Raises:
            Denied: As :meth:`authenticate`, or over the key's rate (429).
        """
        found = self.authenticate(authorization)
        assert found is not None
        rate = found.rate_limit_per_s
        if rate and not self._local.take_now(self._bucket_prefix + found.id, rate):
            raise _limited(found.id, rate)
        return found.id

    async def admit(self, authorization: str | None, status: bool = False) -> str:
        """The key id of a request, rate-limited across every replica when ``shared``.

        Raises:
            Denied: As :meth:`authenticate`, over the key's rate (429), or the shared limiter
                unreachable (503).
        """
        found = self.authenticate(authorization, status)
        if found is None:
            return "control"
        rate = found.rate_limit_per_s
        if not rate:
            return found.id
        limiter = self._shared or self._local
        try:
            allowed = await limiter.take(self._bucket_prefix + found.id, rate)
        except rate_limits.Unavailable as exc:
            raise Denied(503, "rate_limiter_unavailable", str(exc)) from None
        if not allowed:
            raise _limited(found.id, rate)
        return found.id

    def _token_bucket(self, key_id: str) -> tuple[str, float, float, int] | None:
        """Bucket name, refill per second, capacity and limit of a key's tokens/minute; None
        for a key without that limit or not in the ring (the control token's ``"control"``, a
        key revoked since)."""
        self._fresh()
        for entry in self._live:
            if entry.id == key_id and entry.tokens_per_minute:
                limit = entry.tokens_per_minute
                return self._bucket_prefix + key_id, limit / 60, float(limit), limit
        return None

    async def admit_tokens(self, key_id: str) -> None:
        """Refuse a request of ``key_id`` (from :meth:`admit`) while its tokens/minute bucket
        is empty.

        The bucket holds a minute's worth and refills at a sixtieth of it per second;
        :meth:`charge_tokens` debits it after each request, below zero if need be, so a
        request is never cut off and the next ones wait until the bucket is positive again.
        With ``shared`` a replica goes by a view of the cluster's bucket up to
        :data:`rate_limits.VIEW_TTL_S` old, which can let through about one request's worth
        more per replica (see :class:`rate_limits.SharedLimiter`).

        Raises:
            Denied: The bucket is empty (429 ``token_limited``), or the shared limiter
                unreachable (503).
        """
        bucket = self._token_bucket(key_id)
        if bucket is None:
            return
        name, rate, capacity, limit = bucket
        try:
            balance = await (self._shared or self._local).balance(name, rate, capacity)
        except rate_limits.Unavailable as exc:
            raise Denied(503, "rate_limiter_unavailable", str(exc)) from None
        if balance <= 0:
            wait = max(1, math.ceil(-balance / rate))
            raise Denied(
                429,
                "token_limited",
                f"key '{key_id}' is limited to {limit} tokens/minute; retry in {wait} s",
            )

    async def charge_tokens(self, key_id: str, tokens: int) -> None:
        """Debit ``tokens`` (prompt + output of a finished request) from ``key_id``'s
        tokens/minute bucket; nothing for a key without that limit. Never raises: a debit
        that fails is logged, and the request it was for has been served already.
        """
        try:
            bucket = self._token_bucket(key_id)
            if bucket is None or tokens <= 0:
                return
            name, rate, capacity, _ = bucket
            await (self._shared or self._local).debit(name, rate, capacity, tokens)
        except Exception as exc:  # the answer is sent; losing one debit beats a failed request
            logger.warning("could not charge %d tokens to key '%s': %s", tokens, key_id, exc)


def _limited(key_id: str, rate: float) -> Denied:
    return Denied(429, "rate_limited", f"key '{key_id}' is limited to {rate:g} requests/s")


def replica_ring(path: str | None) -> KeyRing | None:
    """The key ring a Serve replica checks requests with (shared rate buckets, the cluster's
    token opening status routes); None when the app names no key file."""
    if not path:
        return None
    from aiaas import settings

    root = settings.current().require_storage_root()
    return KeyRing(Storage(root), path, shared=True, control_token=cluster_token())


def cluster_token() -> str | None:
    """The cluster's Ray token as a process of the cluster finds it; None on a cluster without
    token auth (then no credential but a key opens the status routes)."""
    if os.environ.get(ray_auth.MODE_VAR) != "token":
        return None
    return ray_auth.token_from_env()
