from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from tests.factories import UserFactory

# The real Redis servers' fixtures (redis_server, redis_tls_server, redis_cluster, ...).
pytest_plugins = ["tests.redis_servers"]

SERVER_DATABASES = ("postgresql", "mysql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if connection.vendor in SERVER_DATABASES:
        return
    skip = pytest.mark.skip(
        reason="needs row locks and concurrent writers: run with TEST_DATABASE=postgres or mariadb"
    )
    for item in items:
        if "requires_server_db" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def client() -> APIClient:
    return APIClient()


@pytest.fixture
def user(db: Any) -> Any:
    return UserFactory(username="alice")


@pytest.fixture
def other_user(db: Any) -> Any:
    return UserFactory(username="bob")


Post = Callable[..., Any]


@pytest.fixture
def post(client: APIClient) -> Post:
    """POST a JSON body with an optional Idempotency-Key."""

    def _post(
        path: str,
        body: dict[str, Any] | None = None,
        key: str | None = None,
        *,
        via: APIClient | None = None,
        method: str = "post",
        **headers: str,
    ) -> Any:
        if key is not None:
            headers["HTTP_IDEMPOTENCY_KEY"] = key
        sender = getattr(via or client, method)
        return sender(path, data=json.dumps(body or {}), content_type="application/json", **headers)

    return _post


@pytest.fixture
def idempotency(settings: Any) -> Callable[..., None]:
    """Change ``IDEMPOTENCY`` keys for one test."""

    def _set(**values: Any) -> None:
        settings.IDEMPOTENCY = {**getattr(settings, "IDEMPOTENCY", {}), **values}

    return _set


@pytest.fixture
def atomic_requests() -> Iterator[None]:
    original = connection.settings_dict["ATOMIC_REQUESTS"]
    connection.settings_dict["ATOMIC_REQUESTS"] = True
    yield
    connection.settings_dict["ATOMIC_REQUESTS"] = original


assert settings.configured
