"""``django-idempotency-key`` 1.3.0 (yoyowallet): ``ExemptIdempotencyKeyMiddleware`` plus
the ``@idempotency_key`` decorator on an ``@api_view`` function, with the response store
and the lock moved to Redis.

Configuration, from its README: the middleware goes in ``MIDDLEWARE``; the "exempt" variant
leaves every view alone unless it opts in with ``@idempotency_key``. That decorator has to
sit above ``@api_view`` or the middleware does not see the mark (``decorators.py``). The
key comes in the ``Idempotency-Key`` header (setting ``HEADER``, default
``HTTP_IDEMPOTENCY_KEY``).

Storage: the README's defaults are ``MemoryKeyStorage`` (a dict in each process) and
``ThreadLock`` (a ``threading.Lock``). The lock's own docstring says it is only for a single
process. Under gunicorn with several workers, a retry that reaches another worker would run
the view again. So this variant uses the README's other documented pair:
``CacheKeyStorage`` on a django-redis cache and ``MultiProcessRedisLock``, both on
redis://127.0.0.1:6379/14. The package already requires django-redis and redis.

Behaviour as found in the source (``middleware.py``, ``storage.py``, ``encoders.py``,
``locks/``):
- The stored key is sha256(key + path + method + body [+ Authorization]). A different
  body under the same key is therefore a different entry: it runs the view again, with no
  mismatch error.
- The pickled response is stored only after the view returns 2xx, using ``cache.set``
  with the cache's default timeout (300 s). Nothing marks a key as "in progress".
- A replay returns the stored response with status ``CONFLICT_STATUS_CODE`` (default
  409) and the original body. No replay header is added.
- The lock is a single global Redis lock (``NAME``, default "MyLock") held only around
  the lookup. It is released before the view runs, so it does not stop concurrent
  first requests from all executing. If the lock cannot be taken within ``TIMEOUT``
  (0.1 s), the request gets 423.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "django-idempotency-key==1.3.0"
EXTRA_REQUIREMENTS = ["django-redis==7.0.0", "redis==8.1.0"]
# README lists Django up to 4.2; the code uses nothing removed since and runs on 5.2.
DJANGO_REQUIREMENT = "Django>=5.2,<5.3"
HEADER = "Idempotency-Key"

REDIS_URL = "redis://127.0.0.1:6379/14"

INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["idempotency_key.middleware.ExemptIdempotencyKeyMiddleware"]
SETTINGS: dict[str, Any] = {
    "CACHES": {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
        }
    },
    "IDEMPOTENCY_KEY": {
        "HEADER": "HTTP_IDEMPOTENCY_KEY",
        "STORAGE": {
            "CLASS": "idempotency_key.storage.CacheKeyStorage",
            "CACHE_NAME": "default",
        },
        "LOCK": {
            "CLASS": "idempotency_key.locks.redis.MultiProcessRedisLock",
            "LOCATION": REDIS_URL,
        },
    },
}


def view() -> Any:
    from idempotency_key.decorators import idempotency_key
    from rest_framework.decorators import api_view
    from rest_framework.request import Request
    from rest_framework.response import Response

    from benchmarks.peers.bench_app.views import create_item

    @idempotency_key
    @api_view(["POST"])
    def items(request: Request) -> Response:
        return create_item(request)

    return items
