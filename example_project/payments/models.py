from django.db import models


class Account(models.Model):
    name = models.CharField(max_length=100, unique=True)
    balance = models.IntegerField(default=0, help_text="In cents.")

    def __str__(self) -> str:
        return f"{self.name} ({self.balance})"


class Transfer(models.Model):
    source = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="outgoing")
    target = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="incoming")
    amount = models.PositiveIntegerField(help_text="In cents.")
    refunded = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.source.name} -> {self.target.name}: {self.amount}"
