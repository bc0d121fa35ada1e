"""``drf-idempotency`` 1.0.0 (Mahmoud Gamal): its Quick Start, which is the app plus
``IdempotencyMiddleware`` with the ``DatabaseBackend``, in front of a plain ``APIView``.

Configuration: the README's Quick Start adds ``"drf_idempotency"`` to ``INSTALLED_APPS``
and the middleware to ``MIDDLEWARE``, sets ``IDEMPOTENCY = {"BACKEND":
"drf_idempotency.backends.database.DatabaseBackend"}`` (also the default in
``settings.py``) and runs migrate. After that, every POST/PUT/PATCH that carries
``Idempotency-Key`` is deduplicated. A Redis backend (``SET NX``) exists as an extra, but
the Quick Start uses the database one, and so does this variant. All other settings keep
their defaults: 24 h TTL, 30 s in-progress lock TTL, 4xx responses cached.

Behaviour as found in the source (``core.py``, ``backends/database.py``, ``models.py``):
- Storage is the ``IdempotencyRecord`` model, with ``key`` UNIQUE (global, not scoped to a
  user). ``acquire_or_get`` runs ``get_or_create`` in ``transaction.atomic``, so the
  unique constraint picks a single winner among concurrent requests. A loser whose
  record is still ``in_progress`` gets 409.
- A fingerprint is sha256(method + path + body). The same key with a different
  fingerprint gets 422.
- The view runs outside any transaction of the package. Afterwards the response (status,
  headers, body as base64) is stored with an ``UPDATE``. A 5xx response or an exception
  deletes the record.
- A replay returns the stored status (201), body and headers, plus
  ``Idempotent-Replayed: true``. A fresh response gets ``Idempotent-Replayed: false``.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "drf-idempotency==1.0.0"
EXTRA_REQUIREMENTS: list[str] = []
DJANGO_REQUIREMENT = "Django>=5.2,<5.3"  # the package itself requires Django<5.3
HEADER = "Idempotency-Key"

INSTALLED_APPS = ["drf_idempotency"]
MIDDLEWARE = ["drf_idempotency.middleware.IdempotencyMiddleware"]
SETTINGS: dict[str, Any] = {
    "IDEMPOTENCY": {"BACKEND": "drf_idempotency.backends.database.DatabaseBackend"},
}


def view() -> Any:
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from benchmarks.peers.bench_app.views import create_item

    class ItemView(APIView):
        def post(self, request: Request) -> Response:
            return create_item(request)

    return ItemView.as_view()
