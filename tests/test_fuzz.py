"""Hostile input: arbitrary key headers and bodies never produce a 500 or a traceback page.

Property-based (hypothesis): every answer is a success, a replay, or a 4xx problem, and
the handler runs at most once per (scope, key).
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from idempotency_django.http import _dumps_without_recursion, canonical_json
from tests.testapp.models import Payment

pytestmark = [pytest.mark.django_db, pytest.mark.reliability]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# WSGI carries header values as latin-1 strings: every byte value can arrive.
header_values = st.binary(max_size=600).map(lambda raw: raw.decode("latin-1"))


def _answer(client: APIClient, body: bytes, content_type: str, **headers: str):
    return client.generic("POST", "/payments/", body, content_type, **headers)


def _assert_handled(response) -> None:
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code >= 400:
        assert response["Content-Type"] in {"application/problem+json", "application/json"}
        assert b"Traceback" not in response.content


@FUZZ
@given(key=header_values)
def test_any_key_header_is_answered_without_a_server_error(key):
    client = APIClient()
    response = _answer(
        client, b'{"reference": "r", "amount": 1}', "application/json", HTTP_IDEMPOTENCY_KEY=key
    )
    _assert_handled(response)
    if response.status_code == 400:
        assert response.json()["code"] in {"idempotency_key_invalid", "idempotency_key_missing"}


@FUZZ
@given(
    body=st.binary(max_size=2000),
    content_type=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin-1",
        ]
    ),
)
def test_any_body_is_answered_without_a_server_error(body, content_type):
    client = APIClient()
    _assert_handled(_answer(client, body, content_type, HTTP_IDEMPOTENCY_KEY="fuzz-body"))


@FUZZ
@given(keys=st.lists(header_values, min_size=2, max_size=20))
def test_many_key_values_in_one_header_are_answered_without_a_server_error(keys):
    # Repeated header fields reach the application joined with commas (RFC 9110 5.3).
    client = APIClient()
    joined = ", ".join(keys)
    _assert_handled(
        _answer(
            client,
            b'{"reference": "r", "amount": 1}',
            "application/json",
            HTTP_IDEMPOTENCY_KEY=joined,
        )
    )


header_names = st.from_regex(r"\AHTTP_[A-Z0-9_]{1,40}\Z").filter(
    lambda name: name != "HTTP_IDEMPOTENCY_KEY"
)


@FUZZ
@given(headers=st.dictionaries(header_names, header_values, max_size=200))
def test_many_other_headers_are_answered_without_a_server_error_and_run_once(headers):
    client = APIClient()
    body = b'{"reference": "headers", "amount": 1}'
    response = _answer(
        client, body, "application/json", HTTP_IDEMPOTENCY_KEY="fuzz-headers", **headers
    )
    # Django itself answers some headers first (an invalid Host is its own 400 page).
    assert response.status_code < 500, (response.status_code, response.content[:300])
    assert b"Traceback" not in response.content
    assert Payment.objects.filter(reference="headers").count() <= 1


@pytest.mark.parametrize("size", [256, 10_000, 1_000_000])
def test_huge_keys_are_invalid_not_a_server_error(size):
    response = APIClient().post(
        "/payments/",
        {"reference": "r", "amount": 1},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k" * size,
    )
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_invalid"
    assert Payment.objects.count() == 0


def test_body_larger_than_djangos_upload_limit_is_a_client_error(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    client = APIClient(raise_request_exception=False)
    response = _answer(
        client,
        b'{"reference": "' + b"r" * 5000 + b'", "amount": 1}',
        "application/json",
        HTTP_IDEMPOTENCY_KEY="too-big",
    )
    assert response.status_code == 400
    assert Payment.objects.count() == 0


@FUZZ
@given(
    key=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
    ),
    bodies=st.lists(st.binary(max_size=64), min_size=1, max_size=4),
)
def test_one_key_executes_at_most_once_whatever_bodies_follow(key, bodies):
    client = APIClient()
    before = Payment.objects.count()
    valid = b'{"reference": "r", "amount": 1}'
    first = _answer(client, valid, "application/json", HTTP_IDEMPOTENCY_KEY=f"once-{key}")
    for body in bodies:
        _assert_handled(
            _answer(client, body, "application/json", HTTP_IDEMPOTENCY_KEY=f"once-{key}")
        )
    again = _answer(client, valid, "application/json", HTTP_IDEMPOTENCY_KEY=f"once-{key}")
    assert again.content == first.content
    assert Payment.objects.count() - before <= 1


@st.composite
def nested_json(draw: st.DrawFn) -> bytes:
    """Valid JSON nested up to 5,000 levels, arrays and objects mixed, odd whitespace."""
    depth = draw(st.integers(min_value=1, max_value=5_000))
    kinds = draw(st.lists(st.sampled_from("[{"), min_size=depth, max_size=depth))
    space = draw(st.sampled_from(["", " ", "\n\t"]))
    opening = "".join('{"k":' + space if kind == "{" else "[" + space for kind in kinds)
    closing = "".join(space + ("}" if kind == "{" else "]") for kind in reversed(kinds))
    return (opening + draw(st.sampled_from(["1", '"x"', "null", "[]", "{}"])) + closing).encode()


@FUZZ
@given(body=nested_json(), path=st.sampled_from(["/deep/", "/plain-deep/"]))
def test_nested_json_body_of_any_depth_is_answered_by_the_view_and_replayed(body, path):
    client = APIClient()
    key = f"nested-{uuid.uuid4()}"  # examples share the database: one key each
    before = Payment.objects.count()
    first = _answer_at(client, path, body, key)
    retry = _answer_at(client, path, body, key)
    assert first.status_code < 500, first.content[:300]
    assert retry.content == first.content
    assert retry["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() - before == 1


def _answer_at(client: APIClient, path: str, body: bytes, key: str):
    return client.generic("POST", path, body, "application/json", HTTP_IDEMPOTENCY_KEY=key)


json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@FUZZ
@given(data=json_data, separators=st.sampled_from([(",", ":"), (", ", ": ")]))
def test_canonical_json_without_recursion_is_the_text_json_dumps_gives(data, separators):
    expected = json.dumps(data, sort_keys=True, separators=separators, default=str)
    assert _dumps_without_recursion(data, separators, str) == expected


def test_canonical_json_of_data_too_deep_for_json_dumps_is_built_without_recursion():
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep, {"b": 1, "a": None}]
    text = canonical_json(deep, separators=(", ", ": "), default=str)
    assert text == b"[" * 100_000 + b"[]" + b', {"a": null, "b": 1}]' * 100_000
