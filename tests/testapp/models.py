from __future__ import annotations

from django.db import models


class Payment(models.Model):
    """The side effect the tests count: one row per committed execution."""

    reference = models.CharField(max_length=100)
    amount = models.IntegerField()
    created_by = models.CharField(max_length=100, default="")

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"{self.reference}: {self.amount}"
