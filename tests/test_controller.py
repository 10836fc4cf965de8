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


def test_a_worker_goes_on_after_a_failure_it_cannot_post_as_an_event(monkeypatch):
    """A reconcile that fails while the API server is away, whose Warning event cannot be
    posted either (connection refused, not an API error), is retried, and its worker takes
    the next job: once, each such failure ended a worker, and after a few API server
    restarts no worker was left and no job was reconciled again."""
    from collections import Counter

    from urllib3.exceptions import MaxRetryError

    from bouquet import controller
    from bouquet.reconcile import Config, Outcome

    reconciled = []

    def reconcile(_client, _config, namespace, name, _memory, _force):
        reconciled.append(name)
        if reconciled.count(name) == 1:
            raise MaxRetryError(None, f"/apis/bouquet.dev/v1alpha1/namespaces/{namespace}/federatedjobs/{name}", "Connection refused")
        return Outcome(phase="Running")

    class Client:
        requests: Counter = Counter()

        def get(self, *_args):
            raise MaxRetryError(None, "/apis/bouquet.dev/v1alpha1", "Connection refused")

    monkeypatch.setattr(controller, "reconcile", reconcile)

    async def run():
        running = controller.Controller(Config(port=0, leader_election=False), Client())
        worker = asyncio.create_task(running._worker(0))
        for name in ("a", "b"):
            running.queue.add(("ns", name))
        for _ in range(300):
            if reconciled.count("a") >= 2 and reconciled.count("b") >= 2 or worker.done():
                break
            await asyncio.sleep(0.01)
        assert not worker.done(), f"the worker ended: {worker.exception()!r}"
        assert sorted(reconciled) == ["a", "a", "b", "b"], "each job failed once, and was reconciled again"
        worker.cancel()

    asyncio.run(run())
