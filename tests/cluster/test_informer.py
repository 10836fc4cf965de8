"""The operator's caches (informer.py) against the real API server: only the objects labelled
as a job's come, the cache follows their changes, lists are answered from it without a
request, and a lookup by name of what it does not hold still asks the API server."""

from __future__ import annotations

import copy
import json
import threading

from kubernetes import client as k8s

from bouquet import kube
from bouquet.informer import CachedClient
from support.cluster import kubectl
from support.kubelet import wait_for
from support.proxy import SilentCut


def suspended_job(namespace: str, name: str, labels: dict) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}},
    }


def test_only_the_jobs_objects_are_cached_and_followed_and_lists_cost_no_request(cluster, client, namespace):
    seen: list[tuple[str, str, str]] = []
    heard = threading.Lock()

    def changed(kind: str, event: str, obj: dict) -> None:
        with heard:
            seen.append((kind, event, obj["metadata"]["name"]))

    own = kube.Client(client.api)  # its own request counter
    cache = CachedClient(own, changed)
    kubectl(cluster, "create", "-f", "-", input=json.dumps(suspended_job(namespace, "before", {"bouquet.dev/job": "j", "x": "1"})))
    cache.watch(namespace)
    try:
        wait_for(lambda: all(i.synced.is_set() for i in cache.informers.values()), what="the first lists in")
        for name, labels in (("labelled", {"bouquet.dev/job": "j"}), ("other-job", {"bouquet.dev/job": "k"}), ("unlabelled", {})):
            kubectl(cluster, "create", "-f", "-", input=json.dumps(suspended_job(namespace, name, labels)))
        wait_for(lambda: ("Job", "ADDED", "other-job") in seen, what="the labelled Jobs heard of")

        requests = sum(own.requests.values())
        listed = cache.list("batch/v1", "Job", namespace, "bouquet.dev/job=j")
        assert sorted(j["metadata"]["name"] for j in listed) == ["before", "labelled"]
        assert [j["metadata"]["name"] for j in cache.list("batch/v1", "Job", namespace, "bouquet.dev/job=j,x=1")] == ["before"]
        assert cache.get("batch/v1", "Job", namespace, "labelled")["kind"] == "Job"
        assert sum(own.requests.values()) == requests, "answered from the cache"
        assert not [s for s in seen if s[2] == "unlabelled"], "the API server sends only the jobs' objects"
        # What the cache does not hold is asked for: an object of a child's name made by
        # someone else is found.
        assert cache.get("batch/v1", "Job", namespace, "unlabelled")["metadata"]["name"] == "unlabelled"
        assert sum(own.requests.values()) == requests + 1
        # Other kinds, and lists by other selectors, go to the API server.
        assert [j["metadata"]["name"] for j in cache.list("batch/v1", "Job", namespace, "")] == [
            "before",
            "labelled",
            "other-job",
            "unlabelled",
        ]

        kubectl(cluster, "delete", "job", "labelled", "-n", namespace)
        wait_for(lambda: ("Job", "DELETED", "labelled") in seen, what="the deletion heard of")
        assert [j["metadata"]["name"] for j in cache.list("batch/v1", "Job", namespace, "bouquet.dev/job=j")] == ["before"]
    finally:
        cache.stop()
    wait_for(lambda: not any(i.thread.is_alive() for i in cache.informers.values()), timeout=10, what="the informers stopped at once")


def test_a_watch_gone_silent_is_given_up_and_what_changed_meanwhile_comes(cluster, client, namespace, monkeypatch):
    """A watch whose connection goes quiet without a reset is given up after READ_SECONDS, and
    the kind listed and watched again: what changed meanwhile comes."""
    from urllib.parse import urlsplit

    from bouquet import informer

    monkeypatch.setattr(informer, "READ_SECONDS", 3)  # the API server's bookmarks come each minute
    lists = []
    listing = informer.Informer._list
    monkeypatch.setattr(informer.Informer, "_list", lambda self, url: lists.append(self.kind) or listing(self, url))
    seen: list[tuple[str, str, str]] = []
    api = urlsplit(client.api.configuration.host)
    proxy = SilentCut(api.hostname, api.port)
    configuration = copy.copy(client.api.configuration)
    configuration.host = f"https://{api.hostname}:{proxy.port}"
    cache = CachedClient(
        kube.Client(k8s.ApiClient(configuration)), lambda kind, event, obj: seen.append((kind, event, obj["metadata"]["name"]))
    )
    cache.watch(namespace)
    try:
        wait_for(lambda: all(i.synced.is_set() for i in cache.informers.values()), what="the first lists in")
        assert sorted(lists) == ["Deployment", "Job", "Pod"]
        assert proxy.cut() >= 3, "the watches' connections cut"
        kubectl(cluster, "create", "-f", "-", input=json.dumps(suspended_job(namespace, "meanwhile", {"bouquet.dev/job": "j"})))
        wait_for(lambda: ("Job", "ADDED", "meanwhile") in seen, timeout=30, what="the Job made while the watch was silent heard of")
        assert cache.informers[namespace, "Job"].get("meanwhile") is not None
        assert lists.count("Job") >= 2, "listed again"
    finally:
        cache.stop()
        proxy.stop()
