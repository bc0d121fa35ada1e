from __future__ import annotations

from django.db import models


class Item(models.Model):
    """One row per executed request; ``marker`` names the logical operation (one per key),
    so duplicate executions show as several rows with one marker."""

    marker = models.CharField(max_length=64, db_index=True)
    amount = models.IntegerField()

    class Meta:
        app_label = "bench_app"

    def __str__(self) -> str:
        return self.marker
