"""One hierarchy for every error a user can cause or fix.

Each message says what went wrong, where (file, field, port, job) and how to fix it. The CLI prints
``Error: <message>`` for any :class:`AiaasError` and exits 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class AiaasError(Exception):
    """Base of every error aiaas raises on purpose.

    Args:
        message: What went wrong and where.
        hint: How to fix it; printed on its own line after the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class ConfigError(AiaasError):
    """A config file is missing, unreadable, not YAML, or does not match its schema."""


class StorageError(AiaasError):
    """The storage root cannot be reached or written."""


class ClusterError(AiaasError):
    """The local cluster could not be started, inspected or stopped."""


class PortInUseError(ClusterError):
    """A port the cluster needs is taken by another process."""


class ClusterNotRunningError(ClusterError):
    """A command needs a running cluster and there is none."""


class JobError(AiaasError):
    """A Ray job could not be submitted, or it failed."""


class DeployError(AiaasError):
    """A Serve application did not become healthy; the previous one keeps serving."""


def without_traceback(message: str) -> str:
    """Serve's words and the exception's last line; the frames in between help nobody here."""
    head, marker, rest = message.partition("Traceback (most recent call last)")
    if not marker:
        return message.strip()
    raised = [
        line.strip()
        for line in rest.splitlines()
        if line.strip() and not line[:1].isspace() and not line.startswith("Traceback")
    ]
    return " ".join(part for part in (head.strip(), raised[-1] if raised else "") if part)
