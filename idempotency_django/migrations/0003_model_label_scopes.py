"""Default scopes name the user model: ``user:<pk>`` becomes ``user:<app_label.model>:<pk>``
(``user:auth.user:1``), so records stored before the upgrade are still replayed."""

from django.conf import settings
from django.db import migrations
from django.db.models import CharField, Value
from django.db.models.functions import Concat, Length, Substr

OLD_PREFIX = "user:"
MAX_SCOPE_LENGTH = 255


def _new_prefix():
    """``user:<label_lower>:`` of ``AUTH_USER_MODEL``, or None when the project's own
    ``SCOPE`` function made the scopes (they are opaque, so left alone)."""
    if (getattr(settings, "IDEMPOTENCY", None) or {}).get("SCOPE") is not None:
        return None
    app_label, model_name = settings.AUTH_USER_MODEL.split(".")
    return f"{OLD_PREFIX}{app_label}.{model_name.lower()}:"


def _rewrite(apps, schema_editor, old_prefix, new_prefix):
    """One UPDATE: ``old_prefix<pk>`` (no further colon) becomes ``new_prefix<pk>``."""
    Record = apps.get_model("idempotency_django", "IdempotencyRecord")
    start = len(old_prefix) + 1
    (
        Record.objects.using(schema_editor.connection.alias)
        .annotate(
            prefix=Substr("scope", 1, len(old_prefix)),
            pk_part=Substr("scope", start),
            scope_length=Length("scope"),
        )
        # Equality, not LIKE: SQLite's LIKE ignores case.
        .filter(prefix=old_prefix)
        .exclude(pk_part="")
        .exclude(pk_part__contains=":")
        # A scope over 255 characters is stored as its hash, which no UPDATE can compute;
        # such records (primary keys of over 230 characters) are left behind.
        .filter(scope_length__lte=MAX_SCOPE_LENGTH - len(new_prefix) + len(old_prefix))
        .update(
            scope=Concat(Value(new_prefix), Substr("scope", start), output_field=CharField())
        )
    )


def forwards(apps, schema_editor):
    new_prefix = _new_prefix()
    if new_prefix is not None:
        _rewrite(apps, schema_editor, OLD_PREFIX, new_prefix)


def backwards(apps, schema_editor):
    new_prefix = _new_prefix()
    if new_prefix is not None:
        _rewrite(apps, schema_editor, new_prefix, OLD_PREFIX)


class Migration(migrations.Migration):

    dependencies = [
        ("idempotency_django", "0002_counters"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards, elidable=True),
    ]
