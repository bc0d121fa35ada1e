from django.db import migrations, models


def copy_counters(apps, schema_editor):
    """Carry the counts kept on the records until now into the counter table."""
    Record = apps.get_model("idempotency_django", "IdempotencyRecord")
    Counter = apps.get_model("idempotency_django", "IdempotencyCounter")
    alias = schema_editor.connection.alias
    counted = (
        Record.objects.using(alias)
        .exclude(replay_count=0, conflict_count=0, mismatch_count=0)
        .values_list(
            "pk", "created_at", "replay_count", "conflict_count", "mismatch_count",
            "last_replayed_at",
        )
        .iterator(chunk_size=2000)
    )
    batch = []
    for pk, created_at, replays, conflicts, mismatches, last_replayed_at in counted:
        batch.append(
            Counter(
                record_id=pk,
                lifetime=created_at,
                replays=replays,
                conflicts=conflicts,
                mismatches=mismatches,
                last_replayed_at=last_replayed_at,
            )
        )
        if len(batch) == 2000:
            Counter.objects.using(alias).bulk_create(batch)
            batch = []
    Counter.objects.using(alias).bulk_create(batch)


class Migration(migrations.Migration):

    dependencies = [
        ('idempotency_django', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='IdempotencyCounter',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('record_id', models.BigIntegerField(verbose_name='record id')),
                ('lifetime', models.DateTimeField(help_text="The record's created_at when these answers were given.", verbose_name='lifetime')),
                ('replays', models.PositiveIntegerField(default=0, verbose_name='replays')),
                ('conflicts', models.PositiveIntegerField(default=0, help_text='Requests answered 409 while in flight.', verbose_name='conflicts')),
                ('mismatches', models.PositiveIntegerField(default=0, help_text='Requests answered 422: same key, other body.', verbose_name='mismatches')),
                ('last_replayed_at', models.DateTimeField(blank=True, null=True, verbose_name='last replayed at')),
            ],
            options={
                'verbose_name': 'idempotency counter',
                'verbose_name_plural': 'idempotency counters',
                'ordering': ['-lifetime'],
                'constraints': [models.UniqueConstraint(fields=('record_id', 'lifetime'), name='idempotency_counter_lifetime_uniq')],
            },
        ),
        migrations.RunPython(copy_counters, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name='idempotencyrecord',
            name='conflict_count',
        ),
        migrations.RemoveField(
            model_name='idempotencyrecord',
            name='last_replayed_at',
        ),
        migrations.RemoveField(
            model_name='idempotencyrecord',
            name='mismatch_count',
        ),
        migrations.RemoveField(
            model_name='idempotencyrecord',
            name='replay_count',
        ),
    ]
