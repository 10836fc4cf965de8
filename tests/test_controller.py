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


def test_the_resync_takes_up_a_job_no_watch_event_brought_and_queues_one_gone():
    """kopf's watch of the jobs, taken up from its resourceVersion on an API server that
    restarted, can miss a job's ADDED event: the resync lists the jobs, so that such a job is
    reconciled all the same, and one listed no more is looked at (to be found gone)."""
    from collections import Counter

    from bouquet import controller
    from bouquet.reconcile import Config

    def job(namespace, name, uid):
        return {"metadata": {"namespace": namespace, "name": name, "uid": uid}, "status": {}}

    class Client:
        requests: Counter = Counter()
        urls: list = []

        def request(self, method, url, **_):
            self.urls.append((method, url))
            jobs = {"/apis/bouquet.dev/v1alpha1/namespaces/a/federatedjobs": [job("a", "missed", "1"), job("a", "known", "2")]}
            return {"items": jobs.get(url, [])}

    running = controller.Controller(Config(namespaces=("a", "b"), port=0, leader_election=False), Client())
    running.cache.watch = lambda namespace: None  # no informers here
    running.jobs[("a", "known")], running.uids[("a", "known")] = "Running", "2"
    running.jobs[("b", "deleted")], running.uids[("b", "deleted")] = "Running", "3"

    running._listed(running._list_jobs(), began=0.0)

    assert Client.urls == [
        ("GET", "/apis/bouquet.dev/v1alpha1/namespaces/a/federatedjobs"),
        ("GET", "/apis/bouquet.dev/v1alpha1/namespaces/b/federatedjobs"),
    ]
    assert running.uids[("a", "missed")] == "1"
    assert set(running.queue.pending) == {("a", "missed"), ("b", "deleted")}, "a job the watches knew and still listed waits for its resync"

    everywhere = controller.Controller(Config(port=0, leader_election=False), Client())
    Client.urls.clear()
    everywhere._list_jobs()
    assert Client.urls == [("GET", "/apis/bouquet.dev/v1alpha1/federatedjobs")]


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


def test_a_job_deleted_while_the_resync_listed_is_not_brought_back_and_records_it_cannot_judge_are_kept():
    """A job forgotten (deleted) after the resync's list began is not taken up from that list;
    and the sweep of deleted jobs' records keeps the record of a job in a namespace the
    operator does not watch or may not read, instead of failing on it (which once stopped
    the sweep of every other record)."""
    import time
    from collections import Counter

    from bouquet import controller, kube
    from bouquet.reconcile import Config

    class Client:
        requests: Counter = Counter()

        def get(self, _api_version, _kind, namespace, name):
            if namespace == "forbidden":
                raise kube.ApiError(403, {"message": "forbidden"})
            return None

    running = controller.Controller(Config(namespaces=("a", "forbidden"), port=0, leader_election=False), Client())
    running.cache.watch = lambda namespace: None
    began = time.monotonic()
    running._forget(("a", "deleted"))
    running._listed({("a", "deleted"): {"metadata": {"namespace": "a", "name": "deleted", "uid": "1"}}}, began)
    assert ("a", "deleted") not in running.jobs and not running.uids

    assert running._job_exists("elsewhere", "x", "1"), "a namespace not watched: not this operator's to judge"
    assert running._job_exists("forbidden", "x", "1"), "a 403: not this operator's to judge"
    assert not running._job_exists("a", "x", "1"), "a job of a watched namespace that is gone"
