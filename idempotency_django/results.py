"""How an idempotent function's outcome is stored and given back to a duplicate call: its
return value (JSON by default, dataclasses and pydantic models rebuilt as their own type) or
a final exception (rebuilt from its type and arguments, and raised again).

A stored outcome is a :class:`~idempotency_django.storage.StoredResponse`: status 200 and
``Idempotency-Result: return`` for a returned value, status 400 and
``Idempotency-Result: raise`` for a final exception; the body is JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from typing import Any, Protocol

from idempotency_django.http import canonical_json
from idempotency_django.storage.base import StoredResponse

RESULT_HEADER = "Idempotency-Result"
"""The stored header saying whether the call returned (``return``) or raised (``raise``)."""
RETURNED_STATUS = 200
"""The stored status of a returned value."""
RAISED_STATUS = 400
"""The stored status of a final exception."""


class Serializer(Protocol):
    """Turns a function's return value into bytes and back."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JSONSerializer:
    """The default. JSON values come back as JSON gives them (a tuple as a list). A
    dataclass or a pydantic model (v2) returned as the result comes back as an instance of
    its own class; inside a list or a dict it is not supported (use a serializer of your
    own). Anything JSON cannot hold is a ``TypeError`` at the first call, and its writes
    roll back."""

    def dumps(self, value: Any) -> bytes:
        kind, name, data = _envelope(value)
        # Not canonical: a dict's keys keep their order, as the caller built it.
        try:
            encoded = json.dumps({"kind": kind, "type": name, "value": data}, allow_nan=False)
            again = self.loads(encoded.encode())
        except (ValueError, TypeError, AttributeError, ImportError) as error:
            raise TypeError(f"the result cannot be stored and read back: {error}") from error
        # A duplicate must get what the first call got: {1: "a"} would come back as
        # {"1": "a"}, a nested tuple as a list. Refused at the first call, its writes undone.
        if again != value:
            raise TypeError(
                "the result does not come back equal from JSON (non-string dict keys, "
                "tuples, nested dataclasses?): return JSON types or pass serializer="
            )
        return encoded.encode()

    def loads(self, data: bytes) -> Any:
        document = json.loads(data)
        kind, value = document["kind"], document["value"]
        if kind == "json":
            return value
        cls = _import(document["type"])
        if kind == "dataclass" and dataclasses.is_dataclass(cls) and isinstance(cls, type):
            return cls(**value)
        if kind == "pydantic" and hasattr(cls, "model_validate"):
            return cls.model_validate(value)
        raise TypeError(f"cannot rebuild a stored {kind} result of type {document['type']}")


class PairSerializer:
    """A serializer from two functions: ``dumps(value) -> bytes`` and
    ``loads(bytes) -> value``."""

    def __init__(self, dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]) -> None:
        self._dumps = dumps
        self._loads = loads

    def dumps(self, value: Any) -> bytes:
        return self._dumps(value)

    def loads(self, data: bytes) -> Any:
        return self._loads(data)


def serializer_from(spec: Serializer | tuple[Callable[..., Any], Callable[..., Any]] | None) -> Any:
    """``None`` (JSON), a serializer object, or a ``(dumps, loads)`` pair."""
    if spec is None:
        return JSONSerializer()
    if isinstance(spec, tuple):
        dumps, loads = spec
        return PairSerializer(dumps, loads)
    return spec


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(name: str) -> Any:
    module, _, qualname = name.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _envelope(value: Any) -> tuple[str, str | None, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass", _qualified(type(value)), dataclasses.asdict(value)
    if hasattr(value, "model_dump") and hasattr(type(value), "model_validate"):
        return "pydantic", _qualified(type(value)), value.model_dump(mode="json")
    # Raises TypeError for anything JSON cannot hold: better at the first call than a
    # duplicate that cannot be answered.
    json.dumps(value)
    return "json", None, value


def returned(value: Any, serializer: Serializer) -> StoredResponse:
    """The stored form of a returned value."""
    return StoredResponse(
        status=RETURNED_STATUS,
        headers=[("Content-Type", "application/json"), (RESULT_HEADER, "return")],
        body=serializer.dumps(value),
    )


def raised(error: BaseException) -> StoredResponse:
    """The stored form of a final exception: its type and arguments (arguments JSON cannot
    hold are kept as their ``str``)."""
    body = canonical_json(
        {"type": _qualified(type(error)), "args": list(error.args), "message": str(error)},
        default=str,
    )
    return StoredResponse(
        status=RAISED_STATUS,
        headers=[("Content-Type", "application/json"), (RESULT_HEADER, "raise")],
        body=body,
    )


def is_raised(stored: StoredResponse) -> bool:
    """Whether ``stored`` holds a final exception rather than a returned value."""
    return (RESULT_HEADER, "raise") in stored.headers


def rebuild_exception(
    stored: StoredResponse, final: tuple[type[BaseException], ...]
) -> BaseException:
    """The stored final exception as an instance of its own type, which must still be one
    of ``final`` (a stored record never makes the code raise an arbitrary type)."""
    document = json.loads(stored.body)
    cls = _import(document["type"])
    if not (isinstance(cls, type) and issubclass(cls, final)):
        raise TypeError(
            f"the stored exception {document['type']} is not one of this function's final "
            f"exceptions {[_qualified(kind) for kind in final]}"
        )
    try:
        error: BaseException = cls(*document["args"])
    except TypeError:
        # An __init__ with another signature: rebuilt without calling it, with its args.
        error = cls.__new__(cls)
        error.args = tuple(document["args"])
    return error
