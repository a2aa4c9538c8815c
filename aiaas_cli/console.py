"""What every command shares: turning our errors into ``Error: ...`` and printing next steps."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from aiaas import errors, settings

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Print our errors as ``Error: <message>`` and exit 1, with no traceback.

    ``AIAAS_DEBUG=1`` re-raises so the traceback shows. Anything that is not an
    :class:`~aiaas.errors.AiaasError` is a bug and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.AiaasError as exc:
            if settings.current().debug:
                raise
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def fail(message: str) -> None:
    """Print ``Error: message`` to stderr and exit 1."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def next_steps(commands: Iterable[str]) -> None:
    """Print the commands a user most likely runs next."""
    lines = list(commands)
    if not lines:
        return
    click.echo("\nNext:")
    for line in lines:
        click.echo(f"  {line}")
