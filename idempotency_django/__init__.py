"""Idempotency-Key support for Django REST Framework and Django views."""

__version__ = "0.1.0"
