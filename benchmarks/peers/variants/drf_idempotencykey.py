"""``drf-idempotencykey`` 0.2.0 (Mounir Messelmeni): the README's Quick Start, meaning the
app plus ``DrfIdempotencyKeyMixin`` before ``APIView``, with default settings.

Configuration: the README adds ``"drf_idempotencykey"`` to ``INSTALLED_APPS`` and puts
the mixin first in the view's bases. The client then sends ``Idempotency-Key`` (setting
``IDEMPOTENCY_KEY_HEADER``). The README also says the mixin does nothing for
unauthenticated requests: keys are scoped to ``request.user`` and the row has a foreign
key to the user model. The shared benchmark settings turn authentication off, so this
view authenticates every request as one fixed user, ``bench``. Its
``authentication_classes`` uses a small class that loads (or creates) that user once per
process. This keeps authentication from adding a query to each request that would be
counted against the package. The first request in each process costs one or two extra
queries.

Behaviour as found in the source (``mixins.py``, ``models.py``):
- The key must be a UUID (400 otherwise). Storage is the ``IdempotencyKey`` model, with
  UNIQUE (key, user).
- In ``transaction.atomic``, the mixin runs ``get_or_create``. For an existing row it
  runs ``SELECT ... FOR UPDATE`` and compares sha256(method + full path + body): a
  mismatch gives 409. A row with no response yet gives 409 with ``Retry-After: 5``.
  Each hit also runs ``UPDATE accessed_count``.
- The claim commits before the view runs. The view runs outside the package's
  transaction. Afterwards the row is locked again with ``SELECT ... FOR UPDATE`` and the
  status, body, headers and cookies are saved. A non-2xx response deletes the row.
- A replay returns the stored status (201) and body, plus the header
  ``Cached-From-Idempotency-Key: <key>``. Rows expire 60 minutes after creation
  (``IDEMPOTENCY_KEY_EXPIRATION_MINUTES``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

PACKAGE = "drf-idempotencykey==0.2.0"
EXTRA_REQUIREMENTS: list[str] = []
DJANGO_REQUIREMENT = "Django>=5.2,<5.3"  # the package itself requires Django>=5.2
HEADER = "Idempotency-Key"

INSTALLED_APPS = ["drf_idempotencykey"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {}

BENCH_USERNAME = "bench"


@cache
def bench_user() -> Any:
    """The one user every request is authenticated as, loaded once per process."""
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username=BENCH_USERNAME)
    return user


def view() -> Any:
    from drf_idempotencykey.mixins import DrfIdempotencyKeyMixin
    from rest_framework.authentication import BaseAuthentication
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from benchmarks.peers.bench_app.views import create_item

    class FixedUserAuthentication(BaseAuthentication):
        def authenticate(self, request: Request) -> tuple[Any, None]:
            return bench_user(), None

    class ItemView(DrfIdempotencyKeyMixin, APIView):
        authentication_classes = [FixedUserAuthentication]

        def post(self, request: Request) -> Response:
            return create_item(request)

    return ItemView.as_view()
