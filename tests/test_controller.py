"""The controller's own loops, alone (the controller as a whole runs against a real API
server in tests/cluster)."""

from __future__ import annotations

import asyncio


def test_the_resync_goes_on_through_an_api_server_that_does_not_answer(monkeypatch):
    """The resync queues every job again after an outage: a failure of its sweep for the
    records of deleted jobs (the API server away: a connection refused, not an API error)
    must not end it."""
    from collections import Counter

    from urllib3.exceptions import MaxRetryError

    from bouquet import controller, keep
    from bouquet.reconcile import Config

    sweeps = []

    def collect(*_args):
        sweeps.append(1)
        if len(sweeps) <= 2:
            raise MaxRetryError(None, "/api/v1/namespaces/bouquet-system/secrets", "Connection refused")

    class Client:
        requests: Counter = Counter()

    monkeypatch.setattr(keep, "collect", collect)

    async def run():
        running = controller.Controller(Config(resync_seconds=0.01, port=0, leader_election=False), Client())
        running.jobs[("ns", "a")] = "Running"
        task = asyncio.create_task(running._resync())
        for _ in range(200):
            if len(sweeps) >= 4 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), f"the resync ended: {task.exception()!r}"
        assert len(sweeps) >= 4
        assert ("ns", "a") in running.queue.pending
        task.cancel()

    asyncio.run(run())
