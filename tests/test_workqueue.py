"""The operator's work queue, alone (the controller as a whole runs against a real API server
in tests/cluster/test_operator.py)."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from bouquet.metrics import Metrics
from bouquet.workqueue import WorkQueue


def test_a_job_is_queued_once_however_often_it_is_added_and_its_wait_is_measured():
    added, waits = [], []
    queue = WorkQueue(lambda: added.append(1), waits.append)

    async def run():
        queue.add(("ns", "a"))
        queue.add(("ns", "a"), force=True)  # already waiting: once in the queue, now forced
        queue.add(("ns", "b"))
        assert len(queue.pending) == 2 and len(added) == 2
        await asyncio.sleep(0.05)
        key, force = await queue.get()
        assert (key, force) == (("ns", "a"), True)
        queue.add(key)  # while a worker has it: queued again once it is done
        assert len(added) == 2
        queue.done(key)
        assert len(added) == 3 and len(queue.pending) == 2
        assert (await queue.get()) == (("ns", "b"), False)

    asyncio.run(run())
    assert len(waits) == 2 and waits[0] >= 0.05


def test_the_queue_metrics_are_exported():
    metrics = Metrics(dict)
    queue = WorkQueue(metrics.adds.inc, metrics.queue_duration.observe)
    metrics.depth.set_function(lambda: len(queue.pending))

    async def run():
        queue.add(("ns", "a"))
        queue.add(("ns", "b"))
        await queue.get()

    asyncio.run(run())
    text = generate_latest(metrics.registry).decode()
    assert "bouquet_workqueue_depth 1.0" in text
    assert "bouquet_workqueue_adds_total 2.0" in text
    assert "bouquet_workqueue_queue_duration_seconds_count 1.0" in text
