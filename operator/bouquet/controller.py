"""The FederatedJob operator, run by kopf: `bouquet operator`, or `kopf run -m bouquet.controller`.

Level-based, in the shape of a controller-runtime controller: watches only say which job to
look at (kopf's of the jobs; informer.py's of the Deployments, Jobs and Pods labelled with a
job's name, which also cache them for the reconciles), and a work queue hands each job to
one worker at a time. A worker reconciles from
scratch every time (reconcile.py, observe.py). Every job is also queued again every resync
period, which restores a child whose deletion no watch reported (a Secret, a ConfigMap).
The queue is workqueue.py's, the metrics metrics.py's.

Round progress is not observed here: the job's server reports it to status.progress (see
progress.py), and the operator reads it from the job.

kopf adds nothing to a FederatedJob (no finalizer, no annotation): only event handlers are
registered, and deletion is left to Kubernetes' garbage collector, which follows the owner
references.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import kopf
from urllib3.exceptions import HTTPError

from . import keep, kube, leader, status
from .informer import CachedClient
from .metrics import CONTROLLER, Metrics
from .reconcile import Config, Memory, Refused, reconcile, record_event
from .render import API_VERSION, JOB_LABEL, KIND
from .workqueue import WorkQueue

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "federatedjobs"
log = logging.getLogger("bouquet.operator")

configured: Config | None = None  # set by `bouquet operator` before kopf starts


@dataclass
class Controller:
    config: Config
    client: kube.Client
    queue: WorkQueue = field(default_factory=WorkQueue)
    jobs: dict = field(default_factory=dict)  # (namespace, name) -> phase, from the watch
    memory: dict = field(default_factory=dict)
    uids: dict = field(default_factory=dict)  # (namespace, name) -> uid, from the watch
    forgotten: dict = field(default_factory=dict)  # (namespace, name) -> when, since the resync's last list
    tasks: list = field(default_factory=list)
    metrics: Metrics | None = None
    elector: leader.Elector | None = None
    cache: CachedClient | None = None  # what reconciles read through: the watched kinds from memory
    loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self.cache = CachedClient(self.client, self._child_changed)
        self.metrics = Metrics(lambda: self.jobs, lambda: dict(self.client.requests), lambda: self.leading())
        self.queue.added, self.queue.waited = self.metrics.adds.inc, self.metrics.queue_duration.observe
        self.metrics.depth.set_function(lambda: len(self.queue.pending))

    async def start(self) -> None:
        """Serves the metrics and acts: at once, or (with leader election) once it holds the
        Lease. Meanwhile the watches keep the jobs it would act on."""
        self.loop = asyncio.get_running_loop()
        if self.config.port:
            self.tasks.append(asyncio.create_task(self._serve()))
        if self.config.leader_election:
            self.elector = leader.Elector(self.client, self.config.own_namespace)
            self.tasks.append(asyncio.create_task(self.elector.run(self._act, _stop_acting)))
        else:
            await self._act()

    async def _act(self) -> None:
        self.tasks += [asyncio.create_task(self._worker(i)) for i in range(self.config.workers)]
        self.tasks.append(asyncio.create_task(self._resync()))
        self._queue_every_job()  # what the watches brought while following

    def _queue_every_job(self) -> None:
        """Queues every job, forcing its children to be applied again unless it is finished: a
        finished job's are applied only if they would change, so it costs no writes at rest.
        (Its server's Deployment or a Job deleted since is still restored: their watch forces
        an apply.)"""
        for key, phase in list(self.jobs.items()):
            self.queue.add(key, force=phase not in status.FINAL)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.cache.stop()
        if self.elector is not None:
            await asyncio.to_thread(self.elector.release)

    def alive(self) -> bool:
        return bool(self.tasks) and not any(t.done() for t in self.tasks)

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading

    def job_seen(self, event_type: str | None, body: Mapping) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self._forget(key)
            self.queue.add(key)  # to find it gone, and delete its record
            return
        self.jobs[key] = body.get("status", {}).get("phase")
        self.uids[key] = body["metadata"].get("uid")
        self.cache.watch(key[0])
        self.queue.add(key)

    def _forget(self, key: tuple[str, str]) -> None:
        self.forgotten[key] = time.monotonic()
        self.jobs.pop(key, None)
        self.uids.pop(key, None)
        self.memory.pop(key, None)
        self.queue.forget(key)

    def _child_changed(self, kind: str, event_type: str, obj: Mapping) -> None:
        """From an informer's thread: a Pod, Deployment or Job of a job changed."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.child_seen, event_type, obj)

    def child_seen(self, event_type: str | None, body: Mapping) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta.get("labels", {}).get(JOB_LABEL))
        if key in self.jobs:
            self.queue.add(key, force=event_type == "DELETED")

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            try:
                began = time.monotonic()
                self._listed(await asyncio.to_thread(self._list_jobs), began)
            except Exception as error:  # noqa: BLE001 - the API server away: the jobs known are queued
                log.warning("could not list the jobs: %s", error)
            self._queue_every_job()
            try:
                await asyncio.to_thread(keep.collect, self.client, self.config.own_namespace, self._job_exists)
            except Exception as error:  # noqa: BLE001 - refused, or the API server away: next time
                # Whatever it is, the resync goes on: it is what brings every job back to be
                # looked at after an outage.
                log.warning("could not look for the records of deleted jobs: %s", error)

    def _list_jobs(self) -> dict:
        """Lists the jobs of the namespaces watched, so that what a resync looks at is the API
        server's set of jobs, not only what kopf's watch brought: one no event brought is
        taken up, one listed no more is queued, to be found gone. (kopf finds the jobs' API
        once, at start, in the API server's discovery, and watches nothing if it missed it
        there; in one benchmark trial an operator started just after an API server restart
        heard of no job for a minute.)"""
        found = []
        for namespace in self.config.namespaces or (None,):
            url = kube.path(API_VERSION, KIND, namespace) if namespace else f"/apis/{API_VERSION}/{PLURAL}"
            found += self.client.request("GET", url)["items"]
        return {(j["metadata"]["namespace"], j["metadata"]["name"]): j for j in found}

    def _listed(self, listed: dict, began: float) -> None:
        """Takes up what the list found that the watches did not bring; a job forgotten since
        the list began (deleted meanwhile) is not brought back from it."""
        self.forgotten = {key: at for key, at in self.forgotten.items() if at >= began}
        for key, body in listed.items():
            if key in self.forgotten:
                continue
            if key not in self.jobs or self.uids.get(key) != body["metadata"].get("uid"):
                log.info("job %s/%s, which no watch event brought, is taken up", *key)
                self._forget(key)  # what was kept of another job of its name
                self.job_seen(None, body)
        for key in [k for k in self.jobs if k not in listed]:
            self.queue.add(key)

    def _job_exists(self, namespace: str, name: str, uid: str) -> bool:
        """Whether the job of a record exists. A job in a namespace this operator does not
        watch, or may not read, is taken to exist: its record is not this operator's to
        judge (another release's, or one kept from before watchNamespaces changed), and one
        such record must not stop the sweep of all the others."""
        if self.uids.get((namespace, name)) == uid:
            return True
        if self.config.namespaces and namespace not in self.config.namespaces:
            return True
        try:
            found = self.client.get(API_VERSION, KIND, namespace, name)
        except kube.ApiError as error:
            if error.status == 403:
                return True
            raise
        return found is not None and found["metadata"]["uid"] == uid

    async def _worker(self, number: int) -> None:
        while True:
            key, force = await self.queue.get()
            try:
                await self._work(key, force)
            except Exception:  # noqa: BLE001 - a bug: logged, the job looked at again, the worker goes on
                log.exception("worker %d failed on %s/%s", number, *key)
                self.queue.add_after(key, 5.0, force=True)

    async def _work(self, key: tuple[str, str], force: bool) -> None:
        """One reconcile of a job the queue handed out; the job is queued again after a
        failure (with a growing delay) or when its outcome asks for it."""
        memory = self.memory.setdefault(key, Memory())
        started = time.monotonic()
        try:
            outcome = await asyncio.to_thread(reconcile, self.cache, self.config, *key, memory, force)
        except Exception as error:  # noqa: BLE001 - any failure: report it, and try again
            self.metrics.errors.labels(CONTROLLER).inc()
            self.metrics.reconciles.labels(CONTROLLER, "error").inc()
            text = str(error)
            memory.attempt += 1
            delay = min(60.0, 0.5 * 2**memory.attempt)
            self.queue.add_after(key, delay, force=True)
            if text != memory.last_error:
                memory.last_error = text
                # A refusal, an API error or the API server unreachable is a line; anything
                # else, a bug, comes with its traceback.
                level = logging.WARNING if isinstance(error, Refused | kube.ApiError | HTTPError) else logging.ERROR
                log.log(level, "reconciling %s/%s failed (again in %.0fs): %s", *key, delay, text, exc_info=level == logging.ERROR)
                await asyncio.to_thread(self._error_event, key, text)
        else:
            memory.last_error, memory.attempt = "", 0
            if outcome.gone:
                self._forget(key)
            else:
                self.jobs[key] = outcome.phase
                if outcome.requeue_after is not None:
                    self.queue.add_after(key, outcome.requeue_after)
            result = "requeue" if outcome.requeue_after is not None and not outcome.gone else "success"
            self.metrics.reconciles.labels(CONTROLLER, result).inc()
        finally:
            self.metrics.duration.labels(CONTROLLER).observe(time.monotonic() - started)
            self.queue.done(key)

    def _error_event(self, key: tuple[str, str], text: str) -> None:
        """The failure as a Warning on the job, if it can be posted. It is posted from the
        worker's own error path, so nothing may escape from here: a connection refused (the
        API server away, the likeliest cause of the failure itself) once ended the worker,
        and after a few outages no worker was left and no job was reconciled again."""
        try:
            job = self.client.get(API_VERSION, KIND, *key)
            if job:
                record_event(self.client, job, "Warning", "ReconcileFailed", text)
        except Exception as error:  # noqa: BLE001 - an event lost is only an event lost
            log.warning("could not post the failure of %s/%s as an event: %s", *key, error)

    async def _serve(self) -> None:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics(_request):
            return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_request):
            return web.Response(text="ok") if self.alive() else web.Response(status=500, text="a worker stopped")

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        log.info("metrics on http://%s:%d/metrics, liveness on /healthz", self.config.host, self.config.port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def _stop_acting() -> None:
    """The Lease was lost: another replica may act by now, and a reconcile of this one may be
    under way in a thread that cannot be stopped. So the process ends at once (its pod starts
    again, following), as client-go's leader election ends it."""
    logging.shutdown()
    os._exit(1)


# --- kopf's handlers ------------------------------------------------------------------------


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.posting.enabled = False  # the events are the operator's own, on transitions
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per watch event
    settings.peering.standalone = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    config = configured or Config.from_environment()
    client = await asyncio.to_thread(kube.Client.from_environment, config.workers * 4)
    memo.controller = Controller(config, client)
    await memo.controller.start()


@kopf.on.login()
def _login(**kwargs) -> kopf.ConnectionInfo | None:
    """In a pod, its service account; elsewhere $KUBECONFIG, read now (kopf's default login
    goes through the Kubernetes client, which reads $KUBECONFIG once, when first imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_) -> None:
    await memo.controller.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def _job_event(event: Mapping, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    memo.controller.job_seen(event.get("type"), body)
