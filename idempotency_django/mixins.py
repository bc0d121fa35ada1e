"""``IdempotentMixin`` for DRF ``APIView``, ``GenericAPIView`` and viewsets."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.http import HttpResponseBase
from rest_framework.request import Request

from idempotency_django import drf
from idempotency_django.execution import USE_SETTING, Options, run
from idempotency_django.natural import NaturalKey


class IdempotentMixin:
    """Make a DRF view's POST/PATCH handlers honour the ``Idempotency-Key`` header.

    Put it before the DRF base class::

        class PaymentViewSet(IdempotentMixin, viewsets.ModelViewSet):
            idempotency_required = True

    ``idempotency_using`` lists further database aliases the handler writes to: each gets a
    nested ``transaction.atomic(using=...)`` around the handler, so a 5xx, an exception or a
    lost lease rolls those writes back too (committed one after the other, not a two-phase
    commit: see the storage docs).

    It runs after DRF's authentication, permission and throttle checks (in ``initial``),
    around the handler. Class attributes override the settings for this view; ``None``
    (``USE_SETTING`` for ``idempotency_ttl``, where ``None`` means "keep forever") uses the
    ``IDEMPOTENCY`` setting. Override the ``get_idempotency_*`` hooks to decide per request.
    """

    idempotency_methods: Sequence[str] | None = None
    idempotency_required: bool | None = None
    idempotency_ttl: timedelta | float | None = USE_SETTING
    idempotency_conflict: str | None = None
    #: Further database aliases the handler writes to, joined into its transaction.
    idempotency_using: Sequence[str] | None = None
    #: Which keys this view accepts: "client", "server" (only keys issued by this server to
    #: the caller) or "either"; None uses the KEY_SOURCE setting.
    idempotency_key_source: str | None = None
    #: A key derived from the request (idempotency_django.natural.NaturalKey), for senders
    #: that send no Idempotency-Key header (webhooks).
    idempotency_natural_key: NaturalKey | None = None

    def get_idempotency_methods(self) -> Sequence[str] | None:
        return self.idempotency_methods

    def get_idempotency_required(self) -> bool | None:
        return self.idempotency_required

    def get_idempotency_ttl(self) -> timedelta | float | None:
        return self.idempotency_ttl

    def get_idempotency_conflict(self) -> str | None:
        return self.idempotency_conflict

    def get_idempotency_using(self) -> Sequence[str] | None:
        return self.idempotency_using

    def get_idempotency_key_source(self) -> str | None:
        return self.idempotency_key_source

    def get_idempotency_natural_key(self) -> NaturalKey | None:
        return self.idempotency_natural_key

    def get_idempotency_options(self) -> Options:
        return Options(
            methods=self.get_idempotency_methods(),
            required=self.get_idempotency_required(),
            ttl=self.get_idempotency_ttl(),
            conflict=self.get_idempotency_conflict(),
            using=self.get_idempotency_using(),
            key_source=self.get_idempotency_key_source(),
            natural_key=self.get_idempotency_natural_key(),
        )

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        name = (request.method or "").lower()
        if name not in self.http_method_names:  # type: ignore[attr-defined]
            return
        handler = getattr(self, name, None)
        if handler is None or getattr(handler, "idempotency_wrapped", False):
            return
        options = self.get_idempotency_options()
        view: Any = self

        def idempotent_handler(request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return run(request, drf.handler_call(view, request, handler, args, kwargs), options)

        # ``dispatch`` looks the handler up right after ``initial`` returns; shadowing it on
        # this per-request instance wraps exactly the handler of this request.
        setattr(self, name, idempotent_handler)
