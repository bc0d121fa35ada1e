"""OpenAPI for idempotent operations, with drf-spectacular (the ``openapi`` extra).

Set the schema class once and every idempotent operation (``IdempotentMixin`` views and
``@idempotent`` functions and actions) documents the ``Idempotency-Key`` header (required or
not, as configured) and the 400/409/422 problem responses::

    REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "idempotency_django.openapi.AutoSchema"}

A project with its own ``AutoSchema`` subclass adds ``IdempotencySchemaMixin`` to it instead.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter

from idempotency_django.conf import idempotency_settings
from idempotency_django.execution import Options
from idempotency_django.http import PROBLEM_CONTENT_TYPE, KeyInUse, KeyInvalid, KeyMismatch
from idempotency_django.mixins import IdempotentMixin

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {
            "type": "string",
            "enum": [
                "idempotency_key_missing",
                "idempotency_key_invalid",
                "idempotency_key_unknown",
                "idempotency_key_in_use",
                "idempotency_key_mismatch",
            ],
        },
    },
    "required": ["type", "title", "status", "detail", "code"],
}


def idempotency_options(view: Any, method: str) -> Options | None:
    """The idempotency options of ``view``'s handler for ``method``, or None."""
    # A decorated handler wins over the mixin, as at run time (the mixin skips it).
    handler = getattr(view, getattr(view, "action", None) or method.lower(), None)
    options = _decorated_options(handler)
    if options is None and isinstance(view, IdempotentMixin):
        options = view.get_idempotency_options()
    if options is None or method.upper() not in options.resolved_methods():
        return None
    return options


def _decorated_options(handler: Any) -> Options | None:
    options = getattr(handler, "idempotency_options", None)
    if options is not None:
        return options  # type: ignore[no-any-return]
    # @api_view puts the decorated function inside a generated handler: look in its closure.
    for cell in getattr(getattr(handler, "__func__", handler), "__closure__", None) or ():
        options = getattr(cell.cell_contents, "idempotency_options", None)
        if options is not None:
            return options  # type: ignore[no-any-return]
    return None


class IdempotencySchemaMixin:
    """Adds the idempotency header and problem responses to drf-spectacular operations."""

    view: Any
    method: str

    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())  # type: ignore[misc]
        options = idempotency_options(self.view, self.method)
        if options is not None:
            description = (
                "A unique key per operation (e.g. a UUIDv4), sent again unchanged on "
                "every retry. Retries get the first response back, marked with "
                f"`{idempotency_settings.REPLAY_HEADER}: true`. Up to "
                f"{idempotency_settings.MAX_KEY_LENGTH} visible ASCII characters; "
                'a bare key or an RFC 8941 string ("key").'
            )
            natural = options.natural_key
            if natural is not None:
                description = f"{natural.describe()} {description}"
            parameters.append(
                OpenApiParameter(
                    name=idempotency_settings.HEADER,
                    type=OpenApiTypes.STR,
                    location=OpenApiParameter.HEADER,
                    required=options.resolved_required() and natural is None,
                    description=description,
                )
            )
        return parameters

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)  # type: ignore[misc]
        if idempotency_options(self.view, self.method) is None:
            return responses
        for error, description in (
            (
                KeyInvalid,
                "The Idempotency-Key header is missing (when required) or malformed, or (for "
                "views accepting only server-issued keys) not issued by this server to the "
                "caller.",
            ),
            (KeyInUse, "A request with this key is still being processed; see Retry-After."),
            (KeyMismatch, "This key was already used with a different request."),
        ):
            response = responses.setdefault(
                str(error.status), {"description": description, "content": {}}
            )
            response.setdefault("content", {})[PROBLEM_CONTENT_TYPE] = {"schema": PROBLEM_SCHEMA}
            if error is KeyInUse:
                response["headers"] = {
                    "Retry-After": {
                        "schema": {"type": "integer"},
                        "description": "Seconds to wait before retrying.",
                    }
                }
        return responses


class AutoSchema(IdempotencySchemaMixin, SpectacularAutoSchema):
    """drf-spectacular's ``AutoSchema`` with idempotency documented."""
