"""The example's payment provider client: every charge it sends inside an operation carries
``Idempotency-Key: <derived key>`` (``idempotency_django.outgoing``), so a transfer retried
after a failure is charged once at the provider too.

``PAYMENT_PROVIDER_URL`` (a setting, from the environment) points at the provider; the demo
runs a small local one that deduplicates on the key, as real providers do. Without it the
example charges nothing.
"""

from django.conf import settings

from idempotency_django import outgoing

# One line installs the hook: POST and PATCH sent inside an operation get a derived key.
_session = None


def _provider():
    global _session
    if _session is None:
        import requests

        _session = outgoing.install(requests.Session())
    return _session


def charge(transfer) -> dict | None:
    """Charge the transfer's amount at the provider; ``None`` when no provider is set."""
    url = getattr(settings, "PAYMENT_PROVIDER_URL", "")
    if not url:
        return None
    with outgoing.named("provider:charge"):
        answer = _provider().post(
            f"{url}/charges", json={"amount": transfer.amount, "transfer": transfer.pk}, timeout=10
        )
    answer.raise_for_status()
    return answer.json()
