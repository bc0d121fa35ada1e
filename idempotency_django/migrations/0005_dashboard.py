"""The admin dashboard's table-size snapshots (the counters' lifetime index is 0006, built
concurrently outside a transaction, so a failure there leaves this one applied and 0006 can
simply be run again)."""

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('idempotency_django', '0004_state_lease_index'),
    ]

    operations = [
        migrations.CreateModel(
            name='IdempotencySnapshot',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('taken_at', models.DateTimeField(default=django.utils.timezone.now, verbose_name='taken at')),
                ('records', models.PositiveBigIntegerField(help_text="Rows in the record table: the database's own estimate on a large table (PostgreSQL, MariaDB/MySQL), counted on a small one.", verbose_name='records')),
                ('table_bytes', models.PositiveBigIntegerField(blank=True, help_text='Bytes the record table and its indexes take; empty where not known.', null=True, verbose_name='table size')),
                ('expired', models.PositiveBigIntegerField(blank=True, help_text='Expired records the cleanup run that took this snapshot deleted; empty when the dashboard took it.', null=True, verbose_name='expired')),
            ],
            options={
                'verbose_name': 'idempotency snapshot',
                'verbose_name_plural': 'idempotency snapshots',
                'ordering': ['-taken_at'],
            },
        ),
        migrations.AddIndex(
            model_name='idempotencysnapshot',
            index=models.Index(fields=['taken_at'], name='idempotency_snapshot_taken_idx'),
        ),
    ]
