"""Migration operations shared by this app's migrations (a module the migration loader skips:
its name starts with an underscore)."""

from __future__ import annotations

from typing import Any

from django.db import migrations


class AddIndexConcurrentlyOnPostgreSQL(migrations.AddIndex):
    """``AddIndex``, built with ``CREATE INDEX CONCURRENTLY`` on PostgreSQL, so that writes
    go on while a large table is indexed (the migration must then be ``atomic = False``).
    MariaDB/MySQL build it online anyway (InnoDB ``ALGORITHM=INPLACE, LOCK=NONE``).

    A concurrent build that failed (cancelled, a timeout, a deadlock) leaves an invalid index
    of that name behind; running the migration again drops it first and builds it anew."""

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            with schema_editor.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT 1 FROM pg_index WHERE indexrelid = to_regclass(%s)"
                    " AND NOT indisvalid",
                    [schema_editor.quote_name(self.index.name)],
                )
                left_over = cursor.fetchone() is not None
            if left_over:
                schema_editor.execute(
                    f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(self.index.name)}"
                )
            schema_editor.add_index(model, self.index, concurrently=True)
        else:
            schema_editor.add_index(model, self.index)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.remove_index(model, self.index, concurrently=True)
        else:
            schema_editor.remove_index(model, self.index)
