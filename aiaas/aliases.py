"""Aliases (``production``, ``staging``, ...) on registered models, with a history of every move.

MLflow keeps only where an alias points now. Each move is also written as a registered-model tag
of its own (``aiaas.move.<alias>.<time>-<random>``) holding who/when/from/to: one tag per move, so
two moves at once never overwrite each other's record, and the history survives any client.
``rollback`` replays that history as a stack (a promote pushes, a rollback pops) and moves the
alias back to the version it held before.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from aiaas import errors, registry

MOVE_PREFIX = f"{registry.LINEAGE_PREFIX}move."


@dataclass(frozen=True)
class Move:
    """One alias move."""

    alias: str
    to_version: str
    from_version: str | None
    action: str  # "promote" or "rollback"
    who: str
    at: float

    @property
    def at_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))


def who() -> str:
    """Who moves an alias: ``AIAAS_USER`` when set (CI, services), else user@host."""
    from aiaas import settings

    return settings.current().user or f"{getpass.getuser()}@{socket.gethostname()}"


def holder(name: str, alias: str, uri: str | None = None) -> str | None:
    """The version the alias points at now, or None."""
    model = registry.client(uri).get_registered_model(name)
    version = (model.aliases or {}).get(alias)
    return str(version) if version is not None else None


def promote(name: str, version: str, alias: str = "production", uri: str | None = None) -> Move:
    """Point ``alias`` at ``version`` (which must be complete) and record the move.

    Raises:
        ConfigError: Unknown model or version, or a version whose registration never finished.
    """
    registry.resolve(registry.ModelRef(name, version=version), uri)
    previous = holder(name, alias, uri)
    return _move(name, alias, version, previous, "promote", uri)


def rollback(name: str, alias: str = "production", uri: str | None = None) -> Move:
    """Move ``alias`` back to the version it held before its latest promotion.

    Raises:
        ConfigError: Unknown model, or nothing to roll back to.
    """
    registry.resolve(registry.ModelRef(name), uri)
    stack = _stack(history(name, alias, uri))
    if len(stack) < 2:
        raise errors.ConfigError(
            f"alias '{alias}' of model '{name}' has no earlier version to roll back to",
            f"Promote a version instead: aiaas models promote {name} VERSION --alias {alias}",
        )
    target = stack[-2]
    registry.resolve(registry.ModelRef(name, version=target), uri)
    return _move(name, alias, target, holder(name, alias, uri), "rollback", uri)


def move_back(name: str, alias: str, version: str, uri: str | None = None) -> Move:
    """Point ``alias`` back at ``version`` after a switch that did not take (recorded as a
    rollback)."""
    return _move(name, alias, version, holder(name, alias, uri), "rollback", uri)


def history(name: str, alias: str | None = None, uri: str | None = None) -> list[Move]:
    """Every recorded move of the model's aliases (or of one alias), oldest first."""
    model = registry.client(uri).get_registered_model(name)
    moves = []
    for key, value in (model.tags or {}).items():
        if not key.startswith(MOVE_PREFIX):
            continue
        try:
            moves.append(Move(**json.loads(value)))
        except (TypeError, ValueError):
            continue  # a tag someone else wrote by hand: not ours to interpret
    moves.sort(key=lambda move: move.at)
    return [move for move in moves if alias is None or move.alias == alias]


def _stack(moves: list[Move]) -> list[str]:
    stack: list[str] = []
    for move in moves:
        if move.action == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != move.to_version:
                stack.append(move.to_version)
        else:
            if not stack and move.from_version:
                stack.append(move.from_version)
            stack.append(move.to_version)
    return stack


def _move(
    name: str, alias: str, version: str, previous: str | None, action: str, uri: str | None
) -> Move:
    mlflow_client = registry.client(uri)
    move = Move(alias, version, previous, action, who(), time.time())
    mlflow_client.set_registered_model_alias(name, alias, version)
    key = f"{MOVE_PREFIX}{alias}.{int(move.at * 1000)}-{uuid.uuid4().hex[:6]}"
    mlflow_client.set_registered_model_tag(name, key, json.dumps(asdict(move)))
    return move
