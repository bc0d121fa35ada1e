from django.db import models


class Account(models.Model):
    name = models.CharField(max_length=100, unique=True)
    balance = models.IntegerField(default=0, help_text="In cents.")

    def __str__(self) -> str:
        return f"{self.name} ({self.balance})"


class Receipt(models.Model):
    """A receipt sent for a settled transfer: the side effect of the ``send_receipt`` task,
    which must happen once per transfer however often the task is delivered."""

    transfer = models.ForeignKey("Transfer", on_delete=models.CASCADE, related_name="receipts")
    sent_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"receipt for transfer {self.transfer_id}"


class Transfer(models.Model):
    source = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="outgoing")
    target = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="incoming")
    amount = models.PositiveIntegerField(help_text="In cents.")
    refunded = models.BooleanField(default=False)
    settled = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.source.name} -> {self.target.name}: {self.amount}"
