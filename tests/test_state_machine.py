"""Random interleavings of requests, expiries and retries, checked against a model of the contract.

A hypothesis state machine posts to ``/payments/`` as two users and an anonymous client, with a
few keys, two bodies per key and every handler outcome; it also expires records and resends
earlier requests. The model knows, per (scope, key), only the current record lifetime: absent,
or completed with the body its fingerprint covers and the response stored for it. Every
answer, every committed ``Payment`` and every stored record must match it after every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyRecord
from tests.factories import UserFactory
from tests.testapp.models import Payment

# Hypothesis runs every example inside one call of the test function. Under pytest-django's
# default ``django_db`` that whole call is one transaction, rolled back only at the end: rows
# would leak from one example into the next, and every request would take the package's
# inside-an-outer-transaction path (savepoints that never really commit) instead of the
# autocommit path of a production request. ``transaction=True`` gives each request real
# commits; the machine empties the two tables itself when each example starts, and
# pytest-django flushes the database once after the test.
pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
)

# Usernames; "" is the anonymous client (``AnonymousUser.username``), which /payments/ admits.
USERS = ("alice", "bob", "")
KEYS = ("k0", "k1", "k2")
VARIANTS = (0, 1)
# The handler's answer to each ``outcome`` (tests/testapp/views.py). A ``raise`` reaches the
# client as Django's 500 page because the clients do not re-raise handler exceptions.
OUTCOMES = {"ok": 201, "reject4xx": 402, "invalid": 400, "error500": 500, "raise": 500}
# Headers a replay must repeat (the handler sets Location and X-Handler on its answers).
REPLAYED_HEADERS = ("Content-Type", "Location", "X-Handler")


@dataclass(frozen=True)
class Request:
    user: str
    key: str
    variant: int
    outcome: str

    @property
    def body(self) -> dict[str, object]:
        # The same body from every user: only the scope tells two users' requests apart.
        return {
            "reference": f"{self.key}-v{self.variant}",
            "amount": 100 + self.variant,
            "outcome": self.outcome,
        }


@dataclass
class Lifetime:
    """One lifetime of a (scope, key) record: absent until a response below 500 is stored."""

    body: dict[str, object] | None = None  # what the fingerprint covers, once completed
    status: int | None = None
    content: bytes = b""
    headers: dict[str, str | None] = field(default_factory=dict)
    payments: list[int] = field(default_factory=list)  # committed rows of this lifetime

    @property
    def completed(self) -> bool:
        return self.status is not None


class IdempotentPayments(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        IdempotencyRecord.objects.all().delete()
        Payment.objects.all().delete()
        self.scopes = {"": "anonymous"}
        self.clients = {"": APIClient(raise_request_exception=False)}
        for name in filter(None, USERS):
            user = UserFactory(username=name)  # get_or_create: made by the first example
            self.scopes[name] = f"user:{user._meta.label_lower}:{user.pk}"
            self.clients[name] = APIClient(raise_request_exception=False)
            self.clients[name].force_authenticate(user)
        self.current = {(user, key): Lifetime() for user in USERS for key in KEYS}
        self.history = [(identity, life) for identity, life in self.current.items()]
        self.seen: set[int] = set()  # Payment rows already attributed to a lifetime

    @rule(
        target=requests,
        user=st.sampled_from(USERS),
        key=st.sampled_from(KEYS),
        variant=st.sampled_from(VARIANTS),
        outcome=st.sampled_from(list(OUTCOMES)),
    )
    def send(self, user: str, key: str, variant: int, outcome: str) -> Request:
        request = Request(user, key, variant, outcome)
        self._send(request)
        return request

    @rule(earlier=requests, sender=st.sampled_from(("same", *USERS)))
    def retry(self, earlier: Request, sender: str) -> None:
        """Resend an earlier request (same key, same body) from its own client or another."""
        self._send(earlier if sender == "same" else replace(earlier, user=sender))

    @rule(user=st.sampled_from(USERS), key=st.sampled_from(KEYS))
    def expire(self, user: str, key: str) -> None:
        IdempotencyRecord.objects.filter(scope=self.scopes[user], key=key).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
        if self.current[user, key].completed:  # an expired record behaves as absent
            self.current[user, key] = Lifetime()
            self.history.append(((user, key), self.current[user, key]))

    def _send(self, request: Request) -> None:
        response = self.clients[request.user].post(
            "/payments/",
            data=json.dumps(request.body),
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=request.key,
        )
        life = self.current[request.user, request.key]
        new = list(Payment.objects.exclude(pk__in=self.seen).order_by("pk"))
        self.seen.update(payment.pk for payment in new)
        replayed = response.headers.get("Idempotent-Replayed")
        answer = (response.status_code, replayed, response.content[:200])
        context = f"{request} answered {answer}; lifetime before: {life}"
        if life.completed and life.body != request.body:
            assert response.status_code == 422, context
            assert response.json()["code"] == "idempotency_key_mismatch", context
            assert replayed is None, context
        elif life.completed:
            assert replayed == "true", context
            assert (response.status_code, response.content) == (life.status, life.content), (
                f"a replay must repeat the stored original byte for byte: {context}"
            )
            replay_headers = {name: response.headers.get(name) for name in REPLAYED_HEADERS}
            assert replay_headers == life.headers, context
        else:
            assert response.status_code == OUTCOMES[request.outcome], context
            assert replayed is None, f"an original must not claim to be a replay: {context}"
        executed = not life.completed and response.status_code < 500
        assert len(new) == int(executed), f"committed {new}, expected {int(executed)}: {context}"
        if executed:
            payment = new[0]
            assert (payment.created_by, payment.reference) == (
                request.user,
                request.body["reference"],
            ), f"the committed row belongs to another request: {context}"
            life.body, life.status, life.content = (
                request.body,
                response.status_code,
                response.content,
            )
            life.headers = {name: response.headers.get(name) for name in REPLAYED_HEADERS}
            life.payments.append(payment.pk)
        self._assert_payment_in_answer_is_own(request, response.status_code, response.content)

    def _assert_payment_in_answer_is_own(
        self, request: Request, status: int, content: bytes
    ) -> None:
        """No cross-scope replay: a Payment named in an answer was made by the same client."""
        if status not in (201, 402):
            return
        data = json.loads(content)
        payment = Payment.objects.get(pk=data["id"] if status == 201 else data["payment"])
        assert payment.created_by == request.user, (
            f"{request} was answered with another client's payment {payment.pk} "
            f"({payment.created_by!r}): {content!r}"
        )
        assert payment.reference.startswith(f"{request.key}-"), (request, content)

    @invariant()
    def each_lifetime_committed_at_most_once(self) -> None:
        attributed: dict[int, tuple[str, str]] = {}
        for identity, life in self.history:
            expected = 1 if life.completed else 0
            assert len(life.payments) == expected, (
                f"{identity} lifetime {life} committed {len(life.payments)} payments, "
                f"expected {expected}"
            )
            attributed.update(dict.fromkeys(life.payments, identity))
        rows = dict(Payment.objects.values_list("pk", "created_by"))
        assert set(rows) == set(attributed), f"payments {rows}, expected {attributed}"
        for pk, (user, _key) in attributed.items():
            assert rows[pk] == user, (pk, rows[pk], user)

    @invariant()
    def stored_records_match_the_current_lifetimes(self) -> None:
        now = timezone.now()
        records = {(r.scope, r.key): r for r in IdempotencyRecord.objects.all()}
        for (user, key), life in self.current.items():
            record = records.get((self.scopes[user], key))
            if not life.completed:
                assert record is None or _expired(record.expires_at, now), (
                    f"({user!r}, {key}) should be absent (released or expired): {record!r}"
                )
                continue
            assert record is not None, f"({user!r}, {key}) completed but has no record"
            stored = (record.state, record.response_status, bytes(record.response_body or b""))
            assert stored == ("completed", life.status, life.content), (user, key, stored, life)
            assert not _expired(record.expires_at, now), (user, key, record.expires_at)


def _expired(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at <= now


def test_random_interleavings_follow_the_contract() -> None:
    run_state_machine_as_test(IdempotentPayments, settings=MACHINE_SETTINGS)
