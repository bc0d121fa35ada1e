"""Settings of the scale benchmark's servers: the peer benchmark's (``BENCH_VARIANT``,
``BENCH_DATABASE``) on the database engine ``BENCH_ENGINE`` (postgres or mariadb)."""

from __future__ import annotations

import os

from benchmarks.peers.settings import *  # noqa: F403
from benchmarks.scale_servers import database

DATABASES = {
    "default": database(
        os.environ["BENCH_ENGINE"],
        os.environ["BENCH_DATABASE"],
        CONN_MAX_AGE=None,  # persistent connections, as production runs
    )
}
IDEMPOTENCY = {
    # The requests' keys belong to the generated records' users (see benchmarks.scale_data).
    "SCOPE": "benchmarks.scale_data.scope",
    # As the peer benchmark's idempotency_django variant, whose virtualenv has neither.
    "PROMETHEUS": False,
    "OPENTELEMETRY": False,
}
