"""Dotted-path hooks used by the settings tests."""

from __future__ import annotations

from typing import Any


def by_tenant_header(request: Any) -> str:
    return "tenant:" + request.META.get("HTTP_X_TENANT", "none")


def fingerprint_ignoring_body(request: Any, body: bytes) -> str:
    return f"{request.method} {request.path}"
