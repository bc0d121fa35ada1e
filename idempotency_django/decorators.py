"""``@idempotent`` for DRF ``@api_view`` functions, viewset ``@action`` methods and plain
Django function views."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar, overload

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponseBase
from rest_framework.request import Request
from rest_framework.views import APIView

from idempotency_django import drf, http
from idempotency_django.execution import USE_SETTING, Options, run
from idempotency_django.natural import NaturalKey

F = TypeVar("F", bound=Callable[..., Any])


@overload
def idempotent(func: F) -> F: ...


@overload
def idempotent(
    func: None = None,
    *,
    methods: Sequence[str] | None = None,
    required: bool | None = None,
    ttl: timedelta | float | None = USE_SETTING,
    conflict: str | None = None,
    using: Sequence[str] | None = None,
    key_source: str | None = None,
    natural_key: NaturalKey | None = None,
) -> Callable[[F], F]: ...


def idempotent(
    func: F | None = None,
    *,
    methods: Sequence[str] | None = None,
    required: bool | None = None,
    ttl: timedelta | float | None = USE_SETTING,
    conflict: str | None = None,
    using: Sequence[str] | None = None,
    key_source: str | None = None,
    natural_key: NaturalKey | None = None,
) -> F | Callable[[F], F]:
    """Make a view honour the ``Idempotency-Key`` header.

    Place it under ``@api_view``/``@action`` (closest to the function)::

        @api_view(["POST"])
        @idempotent(required=True)
        def create_payment(request): ...

    For DRF views it runs after authentication, permissions and throttling, since DRF
    calls the function only after those checks; for plain Django views, after the
    middleware (so ``request.user`` is set). Keyword arguments override the settings for
    this view; omitted ones use the ``IDEMPOTENCY`` setting (``ttl=None`` keeps forever).
    ``using`` lists further database aliases the view writes to, joined into its
    transaction (see :class:`~idempotency_django.mixins.IdempotentMixin`); ``key_source``
    which keys it accepts (``"client"``, ``"server"``, ``"either"``; see docs/keys.md);
    ``natural_key`` a :class:`~idempotency_django.natural.NaturalKey` deriving the key from
    the request.
    """
    options = Options(
        methods=methods,
        required=required,
        ttl=ttl,
        conflict=conflict,
        using=using,
        key_source=key_source,
        natural_key=natural_key,
    )

    def decorate(view_func: F) -> F:
        view_class = getattr(view_func, "cls", None) or getattr(view_func, "view_class", None)
        if isinstance(view_class, type) and issubclass(view_class, APIView):
            # Above @api_view (or on SomeAPIView.as_view()) the wrapper would run before
            # DRF's authentication and permission checks: keys would be scoped to the wrong
            # user and a stored response could reach an unauthenticated request.
            raise ImproperlyConfigured(
                f"@idempotent must be placed below @api_view/@action, closest to the "
                f"function, not around the DRF view {view_class.__name__}; for class-based "
                f"DRF views use IdempotentMixin."
            )

        @functools.wraps(view_func)
        def wrapper(*args: Any, **kwargs: Any) -> HttpResponseBase:
            position, request = _find_request(args)
            if isinstance(request, Request):
                view = request.parser_context.get("view") if request.parser_context else None
                if view is not None:
                    # DRF passes the handler the request positionally: call the undecorated
                    # function with the same leading arguments (``self`` for an action).
                    leading = args[:position]

                    def handler(req: Request, *rest: Any, **kw: Any) -> Any:
                        return view_func(*leading, req, *rest, **kw)

                    call = drf.handler_call(view, request, handler, args[position + 1 :], kwargs)
                    return run(request, call, options)
            return run(request, _plain_call(request, view_func, args, kwargs), options)

        wrapper.idempotency_wrapped = True  # type: ignore[attr-defined]
        wrapper.idempotency_options = options  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate


def _plain_call(
    request: HttpRequest, view_func: Callable[..., Any], args: Any, kwargs: Any
) -> Callable[[], HttpResponseBase]:
    """A zero-argument callable running a plain Django view, with the exceptions in
    ``http.CLIENT_ERRORS`` turned into the response Django would send (the project's
    ``handler404``/``handler403``/``handler400``) inside the idempotency transaction."""

    def call() -> HttpResponseBase:
        try:
            return view_func(*args, **kwargs)  # type: ignore[no-any-return]
        except http.CLIENT_ERRORS as exc:
            return http.client_error_response(request, exc)

    return call


def _find_request(args: tuple[Any, ...]) -> tuple[int, Any]:
    for position, arg in enumerate(args[:2]):
        if isinstance(arg, (HttpRequest, Request)):
            return position, arg
    raise TypeError("@idempotent decorates views: a request argument was expected.")
