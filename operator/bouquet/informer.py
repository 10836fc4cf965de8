"""The operator's caches of the kinds it watches: each job namespace's Pods, Deployments and
Jobs labelled bouquet.dev/job, listed and then watched with that label selector, so that the
API server sends only the jobs' own objects (not every pod event of the cluster), and a
reconcile reads them from memory instead of asking for them again.

A namespace's informers start when its first job is seen (the operator's RBAC may allow it
only the namespaces it watches). Until their first list is in, and for any other kind,
CachedClient asks the API server, as does a lookup by name of an object the cache does not
hold: an object of a child's name that is not labelled as a job's is still found, and
refused (reconcile._not_its_own).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping

from . import kube
from .render import JOB_LABEL

KINDS = (("v1", "Pod"), ("apps/v1", "Deployment"), ("batch/v1", "Job"))
WATCH_SECONDS = 300  # each watch is renewed after this, from where it stood
# The API server sends a bookmark on every watch about once a minute: a watch silent for longer
# is taken for dead (a connection gone without a reset, a server gone quiet) and made again,
# so that the cache is never stale for long. As kopf's watching.inactivity_timeout.
READ_SECONDS = 70
BACKOFF_CAP = 15  # seconds, between attempts to watch again
log = logging.getLogger("bouquet.operator")


class Informer:
    """One kind's objects labelled JOB_LABEL in one namespace, kept as the API server last
    said; on_change(kind, event type, object) hears of each change (in the informer's
    thread)."""

    def __init__(self, client: kube.Client, api_version: str, kind: str, namespace: str, on_change: Callable) -> None:
        self.client, self.api_version, self.kind, self.namespace = client, api_version, kind, namespace
        self.on_change = on_change
        self.objects: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.stopping = threading.Event()
        self.response = None  # the watch under way, shut down by stop()
        self.version = ""  # the resourceVersion the cache stands at (empty: to be listed)
        self.thread = threading.Thread(target=self._run, name=f"informer {namespace} {kind}", daemon=True)

    def start(self) -> Informer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        response = self.response
        if response is not None:
            response.shutdown()  # its read returns at once

    def get(self, name: str) -> dict | None:
        with self.lock:
            return self.objects.get(name)

    def matching(self, labels: Mapping[str, str]) -> list[dict]:
        with self.lock:
            return [o for o in self.objects.values() if all(o["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]

    def _run(self) -> None:
        url = kube.path(self.api_version, self.kind, self.namespace)
        failures = 0
        while not self.stopping.is_set():
            try:
                if not self.version:
                    self.version = self._list(url)
                self._watch(url)
                failures = 0
            except Exception as error:  # noqa: BLE001 - the API server away, a watch expired or gone quiet
                if self.stopping.is_set():
                    return
                if isinstance(error, kube.ApiError) and error.status == 410:
                    self.version = ""  # too old to watch from: list again, at once
                    continue
                # Anything else (refused, reset, silent for READ_SECONDS): listed again, after
                # a pause, as client-go's reflector does, so that the cache is whole whatever
                # the API server that answers now knows of the watch it had. The pause grows,
                # with jitter, so that the watches of many namespaces do not all come back at
                # one moment to an API server starting.
                self.version = ""
                failures += 1
                pause = min(BACKOFF_CAP, 2**failures) * random.uniform(0.5, 1.0)
                log.warning("watching %s in %s failed (again in %.0fs): %s", self.kind, self.namespace, pause, error)
                self.stopping.wait(pause)

    def _list(self, url: str) -> str:
        listed = self.client.request("GET", url, query={"labelSelector": JOB_LABEL})
        fresh = {o["metadata"]["name"]: {**o, "apiVersion": self.api_version, "kind": self.kind} for o in listed["items"]}
        with self.lock:
            gone = [o for name, o in self.objects.items() if name not in fresh]
            changed = [
                o
                for name, o in fresh.items()
                if self.objects.get(name, {}).get("metadata", {}).get("resourceVersion") != o["metadata"]["resourceVersion"]
            ]
            self.objects = fresh
        self.synced.set()
        for obj in gone:
            self.on_change(self.kind, "DELETED", obj)
        for obj in changed:
            self.on_change(self.kind, "ADDED", obj)
        return listed["metadata"]["resourceVersion"]

    def _watch(self, url: str) -> None:
        """Follows the watch from self.version until the API server ends it, moving
        self.version on with each event (a watch the server ends is taken up from there)."""
        api = self.client.api
        query = [
            ("watch", "true"),
            ("labelSelector", JOB_LABEL),
            ("resourceVersion", self.version),
            ("timeoutSeconds", str(WATCH_SECONDS)),
            ("allowWatchBookmarks", "true"),
        ]
        params = api.param_serialize(
            "GET", url, query_params=query, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        with self.client.counting:
            self.client.requests["GET", False] += 1
        response = self.response = api.call_api(*params, _request_timeout=(10, READ_SECONDS)).response
        try:
            if response.status >= 400:
                raise kube.ApiError(response.status, {"message": response.read()[:500].decode(errors="replace")})
            for line in response:
                if self.stopping.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise kube.ApiError(obj.get("code", 500), obj)
                if event["type"] == "BOOKMARK":
                    self.version = obj["metadata"].get("resourceVersion", self.version)
                    continue
                obj = {**obj, "apiVersion": self.api_version, "kind": self.kind}
                with self.lock:
                    if event["type"] == "DELETED":
                        self.objects.pop(obj["metadata"]["name"], None)
                    else:
                        self.objects[obj["metadata"]["name"]] = obj
                    self.version = obj["metadata"].get("resourceVersion", self.version)
                self.on_change(self.kind, event["type"], obj)
        finally:
            self.response = None
            response.release_conn()


class CachedClient:
    """kube.Client, but lists of KINDS by a selector that names JOB_LABEL, and lookups by name
    of what the caches hold, are answered from the caches of namespaces whose first list is
    in. Everything else goes to the API server."""

    def __init__(self, client: kube.Client, on_change: Callable) -> None:
        self.client = client
        self.on_change = on_change
        self.informers: dict[tuple[str, str], Informer] = {}
        self.lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def watch(self, namespace: str) -> None:
        """Starts the informers of a namespace, unless they run."""
        with self.lock:
            for api_version, kind in KINDS:
                if (namespace, kind) not in self.informers:
                    self.informers[namespace, kind] = Informer(self.client, api_version, kind, namespace, self.on_change).start()

    def stop(self) -> None:
        for informer in self.informers.values():
            informer.stop()

    def _informer(self, api_version: str, kind: str, namespace: str) -> Informer | None:
        if (api_version, kind) not in KINDS:
            return None
        informer = self.informers.get((namespace, kind))
        return informer if informer is not None and informer.synced.is_set() else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        informer = self._informer(api_version, kind, namespace)
        cached = informer.get(name) if informer else None
        return cached if cached is not None else self.client.get(api_version, kind, namespace, name)

    def list(self, api_version: str, kind: str, namespace: str, selector: str = "", fields: str = "") -> list[dict]:
        informer = self._informer(api_version, kind, namespace)
        labels = dict(part.split("=", 1) for part in selector.split(",") if "=" in part) if selector else {}
        simple = selector and all("=" in part and "!" not in part for part in selector.split(","))
        if informer is None or fields or not simple or JOB_LABEL not in labels:
            return self.client.list(api_version, kind, namespace, selector, fields)
        return informer.matching(labels)
