"""The records' ``scope`` and ``key`` compared exactly on MariaDB/MySQL: both columns become
``utf8mb4_nopad_bin`` (MariaDB) or ``utf8mb4_0900_bin`` (MySQL), binary and NO PAD.

Until now the key was ``ascii_bin``, where a non-ASCII key (idempotent functions and Celery
tasks accept any string) failed the claim's read with error 1267, "illegal mix of
collations"; and both columns were PAD SPACE, so ``'key'`` and ``'key '`` were one record.
The unique (scope, key) index grows from 1,275 to 2,040 bytes (4 bytes a character), within
InnoDB's 3,072 for the DYNAMIC row format, the default since MariaDB 10.2 and MySQL 5.7; the
scope column was utf8mb4 already.

Both columns change in one ``ALTER TABLE``: the table is rebuilt once, and writes to it wait
for the rebuild (a large table is best cleaned up first: ``idempotency_cleanup``).
PostgreSQL and SQLite compare text exactly already; nothing changes there.

Going back fails, leaving the table as it is, while a record's key is not ASCII (the old
column cannot hold it: delete those records first), or while two keys of one scope differ
only in trailing spaces (a duplicate entry error: delete one of them).
"""

from django.db import migrations
from django.db.migrations.exceptions import IrreversibleError

import idempotency_django.models

MAX_LENGTH = 255


def _alter(apps, schema_editor, scope_collation, key_collation):
    Record = apps.get_model("idempotency_django", "IdempotencyRecord")
    quote = schema_editor.quote_name
    columns = (("scope", scope_collation), ("key", key_collation))
    schema_editor.execute(
        f"ALTER TABLE {quote(Record._meta.db_table)} "
        + ", ".join(
            f"MODIFY {quote(Record._meta.get_field(name).column)} "
            f"varchar({MAX_LENGTH}) COLLATE {collation} NOT NULL"
            for name, collation in columns
        )
    )


def forwards(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    exact = "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"
    _alter(apps, schema_editor, exact, exact)


def backwards(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    Record = apps.get_model("idempotency_django", "IdempotencyRecord")
    key = schema_editor.quote_name(Record._meta.get_field("key").column)
    with connection.cursor() as cursor:
        # More bytes than characters: not ASCII. Checked here because a server without strict
        # mode (Django's check mysql.W002) would store such keys as '?' instead of failing.
        cursor.execute(
            f"SELECT COUNT(*) FROM {schema_editor.quote_name(Record._meta.db_table)}"
            f" WHERE LENGTH({key}) <> CHAR_LENGTH({key})"
        )
        (non_ascii,) = cursor.fetchone()
    if non_ascii:
        raise IrreversibleError(
            f"{non_ascii} idempotency record(s) have a key that is not ASCII, which the key "
            "column before 0007_exact_key_collation (ascii_bin) cannot hold; delete them "
            "first."
        )
    _alter(apps, schema_editor, "utf8mb4_bin", "ascii_bin")


class Migration(migrations.Migration):

    dependencies = [
        ('idempotency_django', '0006_counter_lifetime_index'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='idempotencyrecord',
                    name='key',
                    field=idempotency_django.models.CaseSensitiveCharField(help_text='The Idempotency-Key header value sent by the client.', max_length=255, mysql_collation='utf8mb4_nopad_bin', verbose_name='key'),
                ),
                migrations.AlterField(
                    model_name='idempotencyrecord',
                    name='scope',
                    field=idempotency_django.models.CaseSensitiveCharField(help_text="Who the key belongs to, by default the authenticated user's primary key.", max_length=255, mysql_collation='utf8mb4_nopad_bin', verbose_name='scope'),
                ),
            ],
            database_operations=[
                migrations.RunPython(
                    forwards, backwards, hints={"model_name": "idempotencyrecord"}
                ),
            ],
        ),
    ]
