"""Test helpers for projects that use idempotency_django (imported by tests only: needs pytest).

:class:`StorageConformance` checks a storage class against the storage contract; see
:mod:`idempotency_django.testing.conformance` for how to run it.
"""

from __future__ import annotations

import pytest

# Plain asserts in the kit report their values as a test's own asserts do (pytest rewrites
# only test modules and the modules registered before they are imported).
pytest.register_assert_rewrite("idempotency_django.testing.conformance")

from idempotency_django.testing.conformance import StorageConformance  # noqa: E402

__all__ = ["StorageConformance"]
