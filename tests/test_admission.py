"""Coordinator admission (services/coordinator/admission.py): bounded running, bounded queue with bounded wait,
503 overloaded with Retry-After beyond it, and the queue/running metrics."""

from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal

import pytest

from services.coordinator.admission import AdmissionGate, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_slots_queue_fifo_and_hand_over():
    async def scenario():
        gate = AdmissionGate("m", max_running=2, max_waiting=2, max_wait_s=5)
        first, second = await gate.acquire(), await gate.acquire()
        assert gate.running == 2
        order = []

        async def wait(name):
            release = await gate.acquire()
            order.append(name)
            return release

        third = asyncio.create_task(wait("third"))
        await asyncio.sleep(0)
        fourth = asyncio.create_task(wait("fourth"))
        await asyncio.sleep(0.01)
        assert gate.waiting == 2 and gate.running == 2
        with pytest.raises(Overloaded) as error:  # queue full: refused at once
            await gate.acquire()
        assert error.value.retry_after_s == 2
        first()
        first()  # idempotent
        release_third = await third
        assert order == ["third"] and gate.running == 2 and gate.waiting == 1
        second()
        release_fourth = await fourth
        release_third(), release_fourth()
        assert gate.running == 0 and gate.waiting == 0

    run(scenario())


def test_bounded_wait_then_overloaded_and_cancelled_waiter_leaves_the_queue():
    async def scenario():
        gate = AdmissionGate("m", max_running=1, max_waiting=4, max_wait_s=0.05, retry_after_s=3)
        release = await gate.acquire()
        with pytest.raises(Overloaded, match="no generation slot freed") as error:
            await gate.acquire()
        assert error.value.retry_after_s == 3 and gate.waiting == 0
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        waiter.cancel()  # the client went away while queued
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
        release()
        assert gate.running == 0

    run(scenario())


def test_service_answers_503_overloaded_with_retry_after_and_metrics():
    from prometheus_client import REGISTRY

    from services.coordinator.serving import InferenceService, ServingError
    from services.coordinator.store import Pricing

    class FakeModel:
        model_id = "admission-test"
        failure_listeners: list = []
        failover_listeners: list = []

    async def scenario():
        service = InferenceService(store=None, accounts=None, limiter=None, models={"admission-test": FakeModel()},
                                   readiness={}, default_model_id="admission-test",
                                   pricing=Pricing(Decimal("0.001"), Decimal("0.0005"), 0), coordinator_id="c",
                                   jwt_secret=secrets.token_urlsafe(32), max_running=1, max_waiting=1,
                                   max_queue_wait_s=5, overloaded_retry_after_s=4)
        release = await service.take_slot("admission-test")
        queued = asyncio.create_task(service.take_slot("admission-test"))
        await asyncio.sleep(0.01)
        assert REGISTRY.get_sample_value("farmesh_num_requests_waiting", {"model_id": "admission-test"}) == 1
        with pytest.raises(ServingError) as error:
            await service.take_slot("admission-test")
        assert error.value.status == 503 and error.value.code == "overloaded"
        assert error.value.headers == {"Retry-After": "4"}
        assert error.value.body()["error"]["retry_after_s"] == 4
        assert REGISTRY.get_sample_value("farmesh_requests_total",
                                         {"model_id": "admission-test", "outcome": "overloaded"}) == 1
        release()
        (await queued)()
        assert REGISTRY.get_sample_value("farmesh_num_requests_waiting", {"model_id": "admission-test"}) == 0
        service.executor.shutdown()

    run(scenario())
