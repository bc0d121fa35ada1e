"""An index on the records' (state, lease_expires_at): the monitoring gauges count records in
processing and those whose lease ran out by it, reading only those rows however large the
table (built without blocking writes, see ``_operations``)."""

from django.db import migrations, models

from idempotency_django.migrations._operations import AddIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("idempotency_django", "0003_model_label_scopes"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name="idempotencyrecord",
            index=models.Index(
                fields=["state", "lease_expires_at"], name="idempotency_state_lease_idx"
            ),
        ),
    ]
