"""The database storage's unit of work: ``transaction.atomic()`` on the records' alias and
on every alias a view lists in ``using``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, connections

from idempotency_django.storage.base import UnitOfWork

if TYPE_CHECKING:
    from idempotency_django.storage.base import BaseStorage

logger = logging.getLogger("idempotency_django")

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE")


class DatabaseUnit(UnitOfWork):
    """Adds these to :class:`~idempotency_django.storage.base.UnitOfWork`:

    * Django drops a connection whose rollback failed and reconnects as the outermost
      atomic block ends: a different driver connection afterwards means the old one was
      lost (answered "unavailable"), whatever the error said.
    * (As every unit of work) ``transaction.on_commit`` callbacks the work registered are
      made robust: one that raises must not turn the committed, stored answer into an error.
    * With ``DEBUG``, writes the work sends to a database alias outside the unit (neither
      the records' alias nor one listed in ``using``) raise a ``RuntimeWarning``: they
      commit on their own, so a 5xx or a lost lease would not undo them, and a retry would
      repeat them.
    """

    def __init__(self, storage: BaseStorage, using: Sequence[str]) -> None:
        super().__init__(storage, using)
        self._opened: Any = None
        self._watch = ExitStack()
        self._outside: set[str] = set()

    def __enter__(self) -> DatabaseUnit:
        # Opened now if it is not yet (the transaction claim mode claims inside the unit):
        # the driver connection the work starts on is the one compared at the end.
        connections[self.storage.alias].ensure_connection()
        self._opened = connections[self.storage.alias].connection
        if settings.DEBUG:
            for alias in connections:
                if alias not in self.aliases:
                    watcher = self._watcher(alias)
                    self._watch.enter_context(connections[alias].execute_wrapper(watcher))
        super().__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            return super().__exit__(kind, error, traceback)
        finally:
            self._watch.close()
            if self._outside:
                warnings.warn(
                    f"The idempotent work wrote to database alias(es) "
                    f"{', '.join(sorted(self._outside))} outside its transaction on "
                    f"{', '.join(self.aliases)}: those writes commit on their own and are "
                    "repeated if the operation is retried after a 5xx or a lost lease. List "
                    "them in the view's idempotency_using / @idempotent(using=[...]).",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _watcher(self, alias: str) -> Callable[..., Any]:
        def watch(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
            if sql.lstrip()[:7].upper().startswith(_WRITES):
                self._outside.add(alias)
            return execute(sql, *args)

        return watch

    def lost(self, error: BaseException) -> bool:
        replaced = (
            isinstance(error, DatabaseError)
            and connections[self.storage.alias].connection is not self._opened
        )
        return replaced or super().lost(error)
