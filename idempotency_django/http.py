"""HTTP details: reading the key, fingerprinting the request, problem responses, replays."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from datetime import timedelta
from itertools import accumulate
from json.encoder import encode_basestring_ascii
from typing import Any

import http_sf
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.core.handlers.exception import response_for_exception
from django.db import connections, transaction
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)

from idempotency_django.conf import idempotency_settings
from idempotency_django.storage.base import StoredResponse

MAX_SCOPE_LENGTH = 255

# A JSON body nested deeper than this is fingerprinted byte for byte, not canonicalised.
# Python's parser recurses once per level, so the depth at which it gives up depends on the
# interpreter and on the call stack; the same bytes must always give the same fingerprint.
# serde_json's default recursion limit is the same.
MAX_JSON_DEPTH = 128

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://idempotency-django.readthedocs.io/en/latest/semantics/#"

# Response headers never stored nor replayed: cookies belong to the session that received
# them, and hop-by-hop headers (RFC 9110 section 7.6.1) to one connection.
UNSTORED_HEADERS = frozenset(
    {
        "set-cookie",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class IdempotencyError(Exception):
    """A request the package answers itself, as an RFC 9457 problem."""

    status = 400
    code = ""
    title = ""

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> HttpResponse:
        return problem_response(self.status, self.code, self.title, self.detail, self.headers)


class KeyMissing(IdempotencyError):
    code = "idempotency_key_missing"
    title = "Idempotency-Key header missing"


class KeyInvalid(IdempotencyError):
    code = "idempotency_key_invalid"
    title = "Idempotency-Key header invalid"


class KeyUnknown(IdempotencyError):
    # Only keys this server issued to the caller are accepted here (KEY_SOURCE = "server").
    code = "idempotency_key_unknown"
    title = "Idempotency-Key not issued by this server"


class KeyInUse(IdempotencyError):
    # draft-ietf-httpapi-idempotency-key-header section 2.7: a request still being
    # processed is answered 409 Conflict.
    status = 409
    code = "idempotency_key_in_use"
    title = "A request with this Idempotency-Key is being processed"


class KeyMismatch(IdempotencyError):
    # Same draft, section 2.7: a key reused with a different payload is answered 422.
    status = 422
    code = "idempotency_key_mismatch"
    title = "Idempotency-Key reused with a different request"


class StorageUnavailable(IdempotencyError):
    # The database failed at the connection level (server down, connection killed): nothing
    # committed, so the client may retry the same key; 503 says the failure is temporary.
    status = 503
    code = "idempotency_storage_unavailable"
    title = "The database is unavailable"


def unavailable() -> StorageUnavailable:
    return StorageUnavailable(
        "The database was unavailable, so nothing was done. Retry with the same key.",
        headers={"Retry-After": "1"},
    )


class ResponseTooLarge(IdempotencyError):
    # The handler's answer cannot be stored for replay, so it is not sent either: a success
    # that a retry could not replay would let the retry execute a second time.
    status = 500
    code = "idempotency_response_too_large"
    title = "Response too large to store for replay"

    def __init__(self, detail: str, *, handler_status: int) -> None:
        super().__init__(detail)
        self.handler_status = handler_status


def problem_response(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> HttpResponse:
    """An RFC 9457 problem details response with a ``code`` extension member."""
    body = {
        "type": PROBLEM_TYPE_BASE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    response = HttpResponse(
        json.dumps(body).encode(), status=status, content_type=PROBLEM_CONTENT_TYPE
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def in_use(retry_after: timedelta | None, detail: str | None = None) -> KeyInUse:
    seconds = max(1, math.ceil(retry_after.total_seconds())) if retry_after else 1
    return KeyInUse(
        detail
        or "The original request with this key has not finished. Retry after the delay given "
        "in Retry-After to receive its response.",
        headers={"Retry-After": str(seconds)},
    )


def _meta_name(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def read_key(request: HttpRequest) -> str | None:
    """The key sent in the ``HEADER`` request header, or None when it is absent.

    Accepts a bare key (``abc``) and the RFC 8941 sf-string the IETF draft uses
    (``"abc"``); both mean the same key. Raises :class:`KeyInvalid` for an empty, too long,
    non-visible-ASCII, malformed or repeated header.
    """
    header = idempotency_settings.HEADER
    raw = request.META.get(_meta_name(header))
    if raw is None:
        return None
    value = raw.strip(" \t")
    if value.startswith('"'):
        try:
            parsed = http_sf.parse(value.encode("latin-1"), tltype="item")
        except (http_sf.StructuredFieldError, UnicodeEncodeError, ValueError):
            raise KeyInvalid(_repeat_or_malformed(header, value)) from None
        item = parsed[0] if isinstance(parsed, tuple) else parsed
        if not isinstance(item, str) or isinstance(item, http_sf.Token):
            raise KeyInvalid(f"The {header} header must be a string.")
        key = item
    else:
        # A header sent twice reaches WSGI joined by commas ("a,b" or "a, b").
        if "," in value:
            raise KeyInvalid(f"The {header} header was sent more than once.")
        key = value
    if not key:
        raise KeyInvalid(f"The {header} header is empty.")
    if not all("\x21" <= char <= "\x7e" for char in key):
        raise KeyInvalid(f"The {header} header may only contain visible ASCII characters.")
    max_length = idempotency_settings.MAX_KEY_LENGTH
    if len(key) > max_length:
        raise KeyInvalid(f"The {header} header is longer than {max_length} characters.")
    return key


def _repeat_or_malformed(header: str, value: str) -> str:
    if "," in value:
        return f"The {header} header was sent more than once, or is not a valid string."
    return f"The {header} header is not a valid structured-field string."


# A JSON string (RFC 8259 section 7), unrolled so that long strings match in linear time.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` opens more than ``limit`` arrays or objects inside each
    other, brackets inside strings aside (text that is no JSON fails to parse anyway)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0) > limit


def _canonical_body(content_type: str, body: bytes) -> bytes:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            # What json.loads does with bytes (RFC 8259 section 8.1, and UTF-16/32).
            text = body.decode(json.detect_encoding(body), "surrogatepass")
        except UnicodeDecodeError:
            return body
        if _nests_deeper_than(text, MAX_JSON_DEPTH):
            return body
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return body
        # Key order and whitespace carry no meaning in JSON (RFC 8259 section 4).
        # ASCII escapes keep any decoded string (lone surrogates included) encodable.
        return canonical_json(data)
    return body


def canonical_json(
    data: Any,
    *,
    separators: tuple[str, str] = (",", ":"),
    default: Callable[[Any], Any] | None = None,
) -> bytes:
    """``json.dumps(data, sort_keys=True, separators=..., default=...)``, encoded, for data
    nested at any depth: where ``json.dumps`` runs out of recursion, the same text is built
    without recursion. Never raises ``RecursionError``."""
    try:
        return json.dumps(data, sort_keys=True, separators=separators, default=default).encode()
    except RecursionError:
        return _dumps_without_recursion(data, separators, default).encode()


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, float):
        return _float(key)
    if key is True or key is False or key is None:
        return {True: "true", False: "false", None: "null"}[key]
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _dumps_without_recursion(
    data: Any, separators: tuple[str, str], default: Callable[[Any], Any] | None
) -> str:
    """The text ``json.dumps(data, sort_keys=True, ...)`` gives, built with an explicit
    stack (the C encoder's rules: same type checks in the same order)."""
    item_separator, key_separator = separators
    parts: list[str] = []
    # ("value", object) to encode, ("text", str) to emit, ("close", id) ending a container.
    stack: list[tuple[str, Any]] = [("value", data)]
    open_containers: set[int] = set()
    while stack:
        kind, item = stack.pop()
        if kind == "text":
            parts.append(item)
        elif kind == "close":
            open_containers.discard(item)
        elif item is None:
            parts.append("null")
        elif item is True:
            parts.append("true")
        elif item is False:
            parts.append("false")
        elif isinstance(item, str):
            parts.append(encode_basestring_ascii(item))
        elif isinstance(item, int):
            parts.append(int.__repr__(item))
        elif isinstance(item, float):
            parts.append(_float(item))
        else:
            if id(item) in open_containers:
                raise ValueError("Circular reference detected")
            if isinstance(item, list | tuple):
                members: list[tuple[str, Any]] = [("value", value) for value in item]
                opening, closing = "[", "]"
            elif isinstance(item, dict):
                members = []
                for key, value in sorted(item.items()):
                    members.append(("text", encode_basestring_ascii(_key(key)) + key_separator))
                    members.append(("value", value))
                opening, closing = "{", "}"
            elif default is not None:
                open_containers.add(id(item))
                stack.append(("close", id(item)))
                stack.append(("value", default(item)))
                continue
            else:
                raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")
            open_containers.add(id(item))
            parts.append(opening)
            stack.append(("close", id(item)))
            stack.append(("text", closing))
            step = 2 if isinstance(item, dict) else 1
            for index in range(len(members) - step, -1, -step):
                stack.extend(reversed(members[index : index + step]))
                if index:
                    stack.append(("text", item_separator))
    return "".join(parts)


def default_fingerprint(request: HttpRequest, body: bytes) -> str:
    """SHA-256 of the method, path with query string, and body (JSON canonicalised)."""
    digest = hashlib.sha256()
    digest.update(request.method.encode() if request.method else b"")
    digest.update(b"\n")
    digest.update(request.get_full_path().encode())
    digest.update(b"\n")
    digest.update(_canonical_body(request.content_type or "", body))
    return digest.hexdigest()


def fingerprint(request: HttpRequest, body: bytes) -> str:
    function = idempotency_settings.FINGERPRINT or default_fingerprint
    return str(function(request, body))


def default_scope(request: HttpRequest) -> str:
    """``user:<model label>:<pk>`` for an authenticated principal (``user:auth.user:1``);
    one shared ``anonymous`` scope otherwise.

    The label keeps apart principals of two models with equal primary keys (a ``User`` and
    an API client that an authentication class returns as ``request.user``). A principal
    that is no model instance is named by its class's module and qualified name.
    """
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        meta = getattr(user, "_meta", None)
        label = meta.label_lower if meta is not None else _qualified_name(type(user))
        return f"user:{label}:{user.pk}"
    return "anonymous"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def scope(request: HttpRequest) -> str:
    function = idempotency_settings.SCOPE or default_scope
    value = str(function(request))
    # The column holds 255 characters; a longer scope is stored as its hash rather than cut
    # (a cut could make two scopes one).
    if len(value) > MAX_SCOPE_LENGTH:
        value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def capture(response: HttpResponseBase) -> tuple[HttpResponseBase, StoredResponse]:
    """What to store of ``response``; a streaming response is read into memory first."""
    if isinstance(response, StreamingHttpResponse):
        body = b"".join(response.streaming_content)  # type: ignore[arg-type]
        buffered = HttpResponse(body, status=response.status_code)
        for name, value in response.items():
            buffered[name] = value
        buffered.cookies = response.cookies
        response = buffered
    else:
        body = response.content  # type: ignore[attr-defined]
    headers = [
        (name, value)
        for name, value in response.items()
        if name.lower() not in UNSTORED_HEADERS
        and name.lower() != idempotency_settings.REPLAY_HEADER.lower()
    ]
    return response, StoredResponse(status=response.status_code, headers=headers, body=body)


def replay_response(stored: StoredResponse) -> HttpResponse:
    """The stored response again, byte for byte, marked as a replay."""
    response = HttpResponse(stored.body, status=stored.status)
    del response["Content-Type"]
    for name, value in stored.headers:
        response[name] = value
    response[idempotency_settings.REPLAY_HEADER] = "true"
    return response


# The exceptions Django answers with a 4xx of its own (``response_for_exception``): business
# answers like a DRF 4xx, so stored and replayed rather than releasing the key.
CLIENT_ERRORS = (Http404, PermissionDenied, BadRequest, SuspiciousOperation)


def client_error_response(request: HttpRequest, exc: Exception) -> HttpResponseBase:
    """The response Django sends for one of ``CLIENT_ERRORS`` (the project's
    ``handler404``/``handler403``/``handler400``). An exception leaving the view would undo
    an ATOMIC_REQUESTS transaction: that is kept (as DRF does for its 4xx); in autocommit
    mode the handler's writes commit with the stored answer."""
    for connection in connections.all(initialized_only=True):
        if connection.settings_dict["ATOMIC_REQUESTS"] and connection.in_atomic_block:
            transaction.set_rollback(True, using=connection.alias)
    return response_for_exception(request, exc)
