"""An index on the counters' lifetime: the admin dashboard sums counters by lifetime range.

The counter table may hold millions of rows: the index is built without blocking counter
writes (``CREATE INDEX CONCURRENTLY`` on PostgreSQL, see ``_operations``), which cannot run
in a transaction; alone in its migration, a build that failed is simply run again.
"""

from django.db import migrations, models

from idempotency_django.migrations._operations import AddIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('idempotency_django', '0005_dashboard'),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name='idempotencycounter',
            index=models.Index(fields=['lifetime'], name='idempotency_counter_life_idx'),
        ),
    ]
