"""``djangorestframework-idempotency-key`` 1.0.3 (hardcoretech): the app,
``IdempotencyKeyMiddleware`` and ``@simple_idempotency_key_method`` on ``APIView.post``.

Configuration: the README says only that this is an installable middleware for DRF that
stores keys in the database. It has no usage section, so the setup comes from the source.
The app (model ``IdempotencyKey``, table ``idempotency_key``) goes in ``INSTALLED_APPS``
and the middleware in ``MIDDLEWARE``. The middleware claims the key before the view runs.
Without the decorator, a replay would run the view again. The decorator, for methods
whose second argument is the DRF request, runs the view and stores or replays the
response. ``IDEMPOTENCY_KEY_LOCK_TIMEOUT`` must be set because there is no default. It is
90 s here, the value in brandur.org/idempotency-keys, which the model's comments point to.

Behaviour as found in the source (``middleware.py``, ``decorators.py``, ``models.py``):
- The key is read from ``Idempotency-Key``. The decorator validates it as a UUID (400
  otherwise), and the model field is a ``UUIDField``.
- A DB row is stored with a UNIQUE constraint on the key, which is global (not scoped to a
  user). Inside ``transaction.atomic``, the middleware runs ``get_or_create``. For an
  existing row it does ``SELECT ... FOR UPDATE`` and checks sha256(method + body + path):
  a mismatch gives 409. A ``locked_at`` newer than the timeout also gives 409 ("Request
  in progress"). Otherwise it sets ``locked_at`` and lets the request through.
- The view and the save of its response run in one ``transaction.atomic`` (``proceed``).
  The row moves from ``started`` to ``finished`` with the response code and the body as
  JSON. When the request ends, ``locked_at`` is cleared, and a 400 response deletes the
  row.
- A replay returns a new ``Response`` built from the stored data, with the original
  status (201) and the same JSON body. No replay header is added.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "djangorestframework-idempotency-key==1.0.3"
EXTRA_REQUIREMENTS = ["data-spec-validator==3.5.1"]  # its declared dependency
DJANGO_REQUIREMENT = "Django>=5.2,<5.3"
HEADER = "Idempotency-Key"

INSTALLED_APPS = ["rest_framework_idempotency_key"]
MIDDLEWARE = ["rest_framework_idempotency_key.middleware.IdempotencyKeyMiddleware"]
SETTINGS: dict[str, Any] = {"IDEMPOTENCY_KEY_LOCK_TIMEOUT": 90}


def view() -> Any:
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView
    from rest_framework_idempotency_key.decorators import simple_idempotency_key_method

    from benchmarks.peers.bench_app.views import create_item

    class ItemView(APIView):
        @simple_idempotency_key_method
        def post(self, request: Request) -> Response:
            return create_item(request)

    return ItemView.as_view()
