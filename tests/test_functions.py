"""Idempotent functions (``@idempotent_function``): run once per key, the effects committed
with the record, duplicates answered from the store. On SQLite, PostgreSQL and MariaDB; the
races use threads (each its own connection) on all three."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connections, transaction
from django.test import override_settings
from django.utils import timezone

from idempotency_django import maintenance
from idempotency_django.functions import (
    CallInFlight,
    CallMismatch,
    ResultTooLargeError,
    idempotent_function,
)
from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

try:
    import pydantic
except ImportError:  # the tox env without optional extras
    pydantic = None  # type: ignore[assignment]

pytestmark = pytest.mark.django_db(transaction=True)

calls: list[str] = []  # every run of a function body, in order


@pytest.fixture(autouse=True)
def _no_calls_yet() -> None:
    calls.clear()


class CardDeclined(Exception):
    def __init__(self, code: str, amount: int) -> None:
        super().__init__(code, amount)
        self.code = code
        self.amount = amount


class ProviderDown(Exception):
    pass


@dataclasses.dataclass
class Receipt:
    reference: str
    amount: int


@idempotent_function(key="reference", final_exceptions=(CardDeclined,))
def charge(reference: str, amount: int, *, sleep: float = 0.0, fail: str = "") -> dict[str, Any]:
    calls.append(reference)
    Payment.objects.create(reference=reference, amount=amount)
    time.sleep(sleep)
    if fail == "declined":
        raise CardDeclined("card_declined", amount)
    if fail == "down":
        raise ProviderDown("the provider timed out")
    return {"reference": reference, "amount": amount, "charged": True}


@idempotent_function(key=lambda reference, amount: f"receipt-{reference}")
def receipt(reference: str, amount: int) -> Receipt:
    calls.append(reference)
    return Receipt(reference, amount)


if pydantic is not None:

    class Invoice(pydantic.BaseModel):
        number: str
        total: int

    @idempotent_function(key=lambda number, total: number)
    def invoice(number: str, total: int) -> Invoice:
        calls.append(number)
        return Invoice(number=number, total=total)


@idempotent_function(key="reference", conflict="wait", wait_timeout=10)
def charge_waiting(reference: str, amount: int, sleep: float = 0.0) -> dict[str, Any]:
    calls.append(reference)
    Payment.objects.create(reference=reference, amount=amount)
    time.sleep(sleep)
    return {"reference": reference, "amount": amount}


def payments(reference: str) -> int:
    return Payment.objects.filter(reference=reference).count()


# -- once per key -------------------------------------------------------------------------


def test_a_duplicate_call_returns_the_stored_result_without_running():
    first = charge("order-1", 500)
    second = charge("order-1", 500)
    assert first == second == {"reference": "order-1", "amount": 500, "charged": True}
    assert calls == ["order-1"]
    assert payments("order-1") == 1


def test_different_keys_run_separately():
    charge("order-1", 500)
    charge("order-2", 500)
    assert calls == ["order-1", "order-2"]


def test_a_key_reused_with_other_arguments_raises_call_mismatch():
    charge("order-1", 500)
    with pytest.raises(CallMismatch) as raised:
        charge("order-1", 999)
    assert raised.value.key == "order-1"
    assert payments("order-1") == 1


def test_a_default_argument_counts_as_given():
    # charge(ref, amount) and charge(ref, amount, sleep=0.0) are the same call.
    charge("order-1", 500)
    assert charge("order-1", 500, sleep=0.0)["charged"] is True
    assert calls == ["order-1"]


def test_the_record_is_a_function_call_in_its_own_scope():
    charge("order-1", 500)
    record = IdempotencyRecord.objects.get(key="order-1")
    assert record.method == "CALL"
    assert record.path == "tests.test_functions.charge"
    assert record.scope == "function:tests.test_functions.charge"
    assert record.state == IdempotencyRecord.State.COMPLETED
    assert record.response_status == 200


def test_replays_are_counted_on_the_record():
    charge("order-1", 500)
    charge("order-1", 500)
    charge("order-1", 500)
    assert IdempotencyRecord.objects.get(key="order-1").replay_count == 2


# -- results come back as their type --------------------------------------------------------


def test_a_dataclass_result_comes_back_as_the_dataclass():
    assert receipt("r-1", 20) == receipt("r-1", 20) == Receipt("r-1", 20)
    assert isinstance(receipt("r-1", 20), Receipt)
    assert calls == ["r-1"]


@pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")
def test_a_pydantic_result_comes_back_as_the_model():
    first = invoice("inv-1", 30)
    again = invoice("inv-1", 30)
    assert isinstance(again, Invoice)
    assert again == first == Invoice(number="inv-1", total=30)
    assert calls == ["inv-1"]


def test_a_custom_serializer_pair_is_used_both_ways():
    @idempotent_function(
        key="word",
        serializer=(lambda value: value.upper().encode(), lambda data: data.decode().lower()),
    )
    def shout(word: str) -> str:
        calls.append(word)
        return word

    assert shout("hello") == "hello"
    assert shout("hello") == "hello"
    assert bytes(IdempotencyRecord.objects.get(key="hello").response_body) == b"HELLO"
    assert calls == ["hello"]


def test_a_result_json_cannot_hold_raises_and_keeps_nothing():
    @idempotent_function(key="reference")
    def opaque(reference: str) -> object:
        Payment.objects.create(reference=reference, amount=1)
        return object()

    with pytest.raises(TypeError):
        opaque("o-1")
    assert payments("o-1") == 0
    assert not IdempotencyRecord.objects.filter(key="o-1").exists()


# -- exceptions -------------------------------------------------------------------------------


def test_an_exception_is_not_stored_and_releases_the_key():
    with pytest.raises(ProviderDown):
        charge("order-1", 500, fail="down")
    assert payments("order-1") == 0  # rolled back
    assert not IdempotencyRecord.objects.filter(key="order-1").exists()
    assert charge("order-1", 500)["charged"] is True  # the retry runs
    assert calls == ["order-1", "order-1"]
    assert payments("order-1") == 1


def test_a_final_exception_is_stored_and_raised_again_for_duplicates():
    with pytest.raises(CardDeclined) as first:
        charge("order-1", 500, fail="declined")
    with pytest.raises(CardDeclined) as again:
        charge("order-1", 500, fail="declined")
    assert (again.value.code, again.value.amount) == ("card_declined", 500)
    assert str(again.value) == str(first.value)
    assert calls == ["order-1"]
    # Its writes rolled back, as atomic() does for an exception; the outcome is kept.
    assert payments("order-1") == 0
    record = IdempotencyRecord.objects.get(key="order-1")
    assert (record.state, record.response_status) == (IdempotencyRecord.State.COMPLETED, 400)


def test_a_result_over_max_response_size_is_not_stored_and_releases_the_key():
    with override_settings(IDEMPOTENCY={"MAX_RESPONSE_SIZE": 10}):
        with pytest.raises(ResultTooLargeError):
            charge("order-1", 500)
        assert payments("order-1") == 0
        assert not IdempotencyRecord.objects.filter(key="order-1").exists()


# -- keys -----------------------------------------------------------------------------------


def test_a_missing_key_raises_unless_the_function_allows_it():
    @idempotent_function(key=lambda reference: None)
    def strict(reference: str) -> int:
        return 1

    @idempotent_function(key=lambda reference: None, required=False)
    def lenient(reference: str) -> int:
        calls.append(reference)
        return 1

    with pytest.raises(ValueError, match="returned None"):
        strict("x")
    assert lenient("x") == lenient("x") == 1
    assert calls == ["x", "x"]  # no key: no idempotency
    assert not IdempotencyRecord.objects.exists()


def test_a_key_naming_no_parameter_is_refused_at_decoration():
    with pytest.raises(TypeError):

        @idempotent_function(key="missing")
        def nothing(reference: str) -> None:
            return None


def test_an_overlong_key_is_refused():
    with pytest.raises(ValueError, match="1 to 255 characters"):
        charge("x" * 256, 500)


def test_the_scope_function_keeps_equal_keys_apart():
    @idempotent_function(key="reference", scope=lambda tenant, reference: tenant)
    def book(tenant: str, reference: str) -> str:
        calls.append(f"{tenant}/{reference}")
        return tenant

    assert book("acme", "r-1") == "acme"
    assert book("globex", "r-1") == "globex"
    assert book("acme", "r-1") == "acme"
    assert calls == ["acme/r-1", "globex/r-1"]


def test_model_instances_are_fingerprinted_by_label_and_primary_key():
    @idempotent_function(key=lambda payment, note: f"refund-{payment.pk}")
    def refund(payment: Payment, note: str) -> int:
        calls.append(note)
        return int(payment.pk)

    payment = Payment.objects.create(reference="p", amount=1)
    assert refund(payment, "n") == refund(Payment.objects.get(pk=payment.pk), "n")
    assert calls == ["n"]


def test_an_argument_without_a_default_fingerprint_names_its_type():
    @idempotent_function(key=lambda thing: "k")
    def take(thing: object) -> None:
        return None

    with pytest.raises(TypeError, match="object"):
        take(object())


def test_a_fingerprint_function_replaces_the_default():
    @idempotent_function(key=lambda thing: "k", fingerprint=lambda thing: "same")
    def take(thing: object) -> int:
        calls.append("ran")
        return 7

    assert take(object()) == take(object()) == 7
    assert calls == ["ran"]


# -- transactions ---------------------------------------------------------------------------


def test_inside_an_outer_transaction_that_rolls_back_nothing_is_kept():
    def caller() -> None:
        with transaction.atomic():
            charge("order-1", 500)
            raise RuntimeError("the caller fails after the call")

    with pytest.raises(RuntimeError):
        caller()
    assert payments("order-1") == 0
    assert not IdempotencyRecord.objects.filter(key="order-1").exists()
    charge("order-1", 500)
    assert calls == ["order-1", "order-1"]


# -- cleanup and stats --------------------------------------------------------------------


def test_expired_function_records_are_cleaned_up_and_then_run_again():
    @idempotent_function(key="reference", ttl=timedelta(seconds=1))
    def short(reference: str) -> str:
        calls.append(reference)
        return reference

    short("s-1")
    IdempotencyRecord.objects.filter(key="s-1").update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )
    assert maintenance.delete_expired(IdempotencyRecord.objects.all()).deleted == 1
    short("s-1")
    assert calls == ["s-1", "s-1"]


def test_stats_count_function_calls_apart_from_http_requests():
    charge("order-1", 500)
    receipt("r-1", 1)
    stats = maintenance.collect("default")
    assert stats["by_entry_point"] == {"function": 2, "http": 0, "task": 0}


# -- async -----------------------------------------------------------------------------------


@idempotent_function(key="reference")
async def charge_async(reference: str, amount: int) -> dict[str, Any]:
    calls.append(reference)
    await Payment.objects.acreate(reference=reference, amount=amount)
    await sync_to_async(Payment.objects.create)(reference=f"{reference}-b", amount=amount)
    return {"reference": reference}


def test_an_async_function_runs_once_with_its_orm_writes_in_the_transaction():
    assert async_to_sync(charge_async)("a-1", 5) == {"reference": "a-1"}
    assert async_to_sync(charge_async)("a-1", 5) == {"reference": "a-1"}
    assert calls == ["a-1"]
    assert payments("a-1") == payments("a-1-b") == 1


@idempotent_function(key="reference")
async def fail_async(reference: str) -> None:
    await Payment.objects.acreate(reference=reference, amount=1)
    raise ProviderDown("down")


def test_an_async_function_that_raises_rolls_back_its_orm_writes():
    with pytest.raises(ProviderDown):
        async_to_sync(fail_async)("a-2")
    assert payments("a-2") == 0
    assert not IdempotencyRecord.objects.filter(key="a-2").exists()


# -- races (threads, one connection each) ------------------------------------------------


def _race(count: int, call: Callable[[], Any], *, stagger: float = 0.0) -> list[Any]:
    """``count`` threads run ``call`` at once; each outcome is a value or an exception."""
    outcomes: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def worker(index: int) -> None:
        barrier.wait()
        time.sleep(stagger * index)
        try:
            outcomes[index] = call()
        except Exception as error:
            outcomes[index] = error
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_ten_threads_calling_one_key_run_it_once_and_the_others_are_told_it_is_in_flight():
    outcomes = _race(10, lambda: charge("race-1", 500, sleep=0.5))
    values = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    in_flight = [outcome for outcome in outcomes if isinstance(outcome, CallInFlight)]
    assert len(values) + len(in_flight) == 10, outcomes
    assert values == [{"reference": "race-1", "amount": 500, "charged": True}] * len(values)
    assert len(values) >= 1
    assert calls == ["race-1"]
    assert payments("race-1") == 1
    assert all(error.retry_after is not None for error in in_flight)


def test_in_wait_mode_racing_calls_all_get_the_one_result():
    outcomes = _race(5, lambda: charge_waiting("race-2", 7, sleep=0.5), stagger=0.05)
    assert outcomes == [{"reference": "race-2", "amount": 7}] * 5, outcomes
    assert calls == ["race-2"]
    assert payments("race-2") == 1


@pytest.mark.parametrize("result", [{1: "a"}, (1, 2), [(1, 2)], float("nan")])
def test_a_result_that_would_come_back_different_is_refused_at_the_first_call(result):
    @idempotent_function(key="reference")
    def lossy(reference: str) -> Any:
        Payment.objects.create(reference=reference, amount=1)
        return result

    with pytest.raises(TypeError):
        lossy("l-1")
    assert payments("l-1") == 0
    assert not IdempotencyRecord.objects.filter(key="l-1").exists()
