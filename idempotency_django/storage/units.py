"""The database storage's unit of work: ``transaction.atomic()`` on the records' alias and
on every alias a view lists in ``using``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections

from idempotency_django.storage.base import UnitOfWork

if TYPE_CHECKING:
    from idempotency_django.storage.base import BaseStorage

logger = logging.getLogger("idempotency_django")


class DatabaseUnit(UnitOfWork):
    """Adds two things to :class:`~idempotency_django.storage.base.UnitOfWork`:

    * Django drops a connection whose rollback failed and reconnects as the outermost
      atomic block ends: a different driver connection afterwards means the old one was
      lost (answered "unavailable"), whatever the error said.
    * ``transaction.on_commit`` callbacks the work registered run after the record's
      completion has committed. One that raises must not turn that committed, stored answer
      into an error for the client: they are made robust (Django logs a robust callback's
      error on the ``django.db.backends.base`` logger and runs the next one).
    """

    def __init__(self, storage: BaseStorage, using: Sequence[str]) -> None:
        super().__init__(storage, using)
        self._opened: Any = None
        self._hooks_before: dict[str, int] = {}

    def __enter__(self) -> DatabaseUnit:
        self._opened = connections[self.storage.alias].connection
        super().__enter__()
        for alias in self.aliases:
            self._hooks_before[alias] = len(connections[alias].run_on_commit)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if kind is None:
            for alias, before in self._hooks_before.items():
                _make_robust(alias, before)
        return super().__exit__(kind, error, traceback)

    def lost(self, error: BaseException) -> bool:
        replaced = (
            isinstance(error, DatabaseError)
            and connections[self.storage.alias].connection is not self._opened
        )
        return replaced or super().lost(error)


def _make_robust(alias: str, before: int) -> None:
    """Mark the on_commit callbacks registered after position ``before`` robust. Django
    keeps them as (savepoint ids, callable, robust) triples; anything else is left alone."""
    connection = connections[alias]
    # django-stubs types the entries as pairs; Django 4.2+ keeps triples.
    hooks: list[Any] = list(connection.run_on_commit)
    if len(hooks) <= before or not all(len(hook) == 3 for hook in hooks[before:]):
        return
    robust = [(savepoints, func, True) for savepoints, func, _robust in hooks[before:]]
    connection.run_on_commit = [*hooks[:before], *robust]  # type: ignore[list-item]
