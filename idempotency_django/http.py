"""HTTP details: reading the key, fingerprinting the request, problem responses, replays."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import timedelta

import http_sf
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from idempotency_django.conf import idempotency_settings
from idempotency_django.storage.base import StoredResponse

MAX_SCOPE_LENGTH = 255

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


def _canonical_body(content_type: str, body: bytes) -> bytes:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            data = json.loads(body)
        except ValueError:
            return body
        # Key order and whitespace carry no meaning in JSON (RFC 8259 section 4).
        # ASCII escapes keep any decoded string (lone surrogates included) encodable.
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return body


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
    """``user:<pk>`` for an authenticated user; one shared ``anonymous`` scope otherwise."""
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return f"user:{user.pk}"
    return "anonymous"


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
