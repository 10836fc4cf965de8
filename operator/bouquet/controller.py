"""The FederatedJob operator, run by kopf: `bouquet operator`, or `kopf run -m bouquet.controller`.

Level-based, in the shape of a controller-runtime controller: kopf's watches only say which
job to look at (the job itself changed, or a Deployment, Job or Pod labelled with its name
did), and a work queue hands each job to one worker at a time. A worker reconciles from
scratch every time:

    read the job  ->  observe its children  ->  status.derive  ->  write the status if it
    changed  ->  render  ->  server-side apply every child (one field manager, owner
    references)  ->  events for what changed

so a changed spec, a deleted child and a restarted operator all converge to the same state,
and nothing is created twice (server-side apply of a named object either creates or
updates it). Every job is also queued again every resync period, which restores a child
whose deletion no watch reported (a Secret, a ConfigMap).

Round progress is not observed here: the job's server reports it to status.progress (see
progress.py), and the operator reads it from the job.

kopf adds nothing to a FederatedJob (no finalizer, no annotation): only event handlers are
registered, and deletion is left to Kubernetes' garbage collector, which follows the owner
references.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import identity, keep, kube, leader, render, status, tls
from .render import API_VERSION, KIND, Settings, names

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "federatedjobs"
FIELD_MANAGER = "bouquet-operator"
CONTROLLER = "federatedjob"
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
JOB_LABEL = "bouquet.dev/job"
log = logging.getLogger("bouquet.operator")


@dataclass(frozen=True)
class Config:
    """The operator's settings; `bouquet operator` sets them from its options, `kopf run`
    from the environment (BOUQUET_IMAGE, ...)."""

    image: str = render.DEFAULT_IMAGE
    # NetworkPolicy peers that may scrape the job servers' metrics (none: nothing in the
    # cluster but the server's own node)
    metrics_scrapers: tuple[Mapping, ...] = ()
    dns_service: str = "kube-system/kube-dns"  # the cluster DNS Service, whose endpoints job pods may reach
    # Where the jobs' records (their private material, see keep.py) are kept: the operator's
    # own namespace.
    own_namespace: str = "bouquet-system"
    own_account: str | None = None  # the operator's ServiceAccount there, which then owns the records
    resync_seconds: float = 60.0
    workers: int = 4
    port: int = 8080  # /metrics and /healthz; 0 for none
    host: str = "0.0.0.0"
    # Only the replica holding the Lease bouquet-operator in own_namespace acts (leader.py).
    leader_election: bool = True

    @classmethod
    def from_environment(cls) -> Config:
        env = os.environ
        return cls(
            image=env.get("BOUQUET_IMAGE", cls.image),
            metrics_scrapers=tuple(json.loads(env.get("BOUQUET_METRICS_SCRAPERS", "[]"))),
            dns_service=env.get("BOUQUET_DNS_SERVICE", cls.dns_service),
            own_namespace=env.get("BOUQUET_OWN_NAMESPACE", cls.own_namespace),
            own_account=env.get("BOUQUET_OWN_SERVICE_ACCOUNT") or None,
            resync_seconds=float(env.get("BOUQUET_RESYNC_SECONDS", cls.resync_seconds)),
            workers=int(env.get("BOUQUET_WORKERS", cls.workers)),
            port=int(env.get("BOUQUET_OPERATOR_PORT", cls.port)),
            host=env.get("BOUQUET_OPERATOR_HOST", cls.host),
            leader_election=env.get("BOUQUET_LEADER_ELECTION", "true").lower() != "false",
        )


configured: Config | None = None  # set by `bouquet operator` before kopf starts


# --- what one reconcile does (blocking; runs in a worker thread) ---------------------------


@dataclass
class Outcome:
    requeue_after: float | None = None  # seconds until the job needs looking at again
    gone: bool = False  # the job no longer exists
    phase: str = ""


@dataclass
class Memory:
    """What the controller remembers of a job between reconciles: only shortcuts, never
    something a restarted operator would need."""

    applied: str = ""  # digest of the children last applied in full
    generation: int = -1  # the job's generation they were applied for
    # (kind, name) -> uid of the children seen to be the job's own, so not looked up again
    own: dict[tuple[str, str], str] = field(default_factory=dict)
    last_error: str = ""
    attempt: int = 0  # failed reconciles in a row, for the backoff


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _condition(obj: Mapping, kind: str) -> Mapping | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c.get("type") == kind and c.get("status") == "True"), None)


def _unschedulable(pods: list[Mapping]) -> str:
    """The scheduler's message for the first of pods it could not place, else ''."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        for c in pod.get("status", {}).get("conditions", []):
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return c.get("message", "Unschedulable")
    return ""


# Why a container waits that it will not get past by itself (the kubelet's reasons).
STUCK = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def _failing(pods: list[Mapping]) -> tuple[str, str] | None:
    """Kubernetes' reason and message for the first of pods whose container is stuck waiting
    (an image it cannot pull, a crash loop), else None."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        pod_status = pod.get("status", {})
        for container in pod_status.get("initContainerStatuses", []) + pod_status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") in STUCK:
                return waiting["reason"], waiting.get("message", "")
    return None


PODLESS_LOOK_SECONDS = 5.0


def _podless(site_job: Mapping, pods: list[Mapping]) -> bool:
    """Whether a site Job that should be running has no pod at all."""
    if pods or site_job.get("spec", {}).get("suspend") or site_job.get("status", {}).get("active"):
        return False
    return _condition(site_job, "Complete") is None and _condition(site_job, "Failed") is None


def _refused_pods(client: kube.Client, site_job: Mapping) -> tuple[str, str] | None:
    """Why a site Job has no pod, if its pods were refused at admission (a quota, a policy):
    the newest FailedCreate Event of the Job controller's, which a Job's status does not
    carry. Asked only while the Job has no pod at all, so a job at work lists no Events."""
    meta = site_job["metadata"]
    events = client.list("v1", "Event", meta["namespace"], fields=f"involvedObject.uid={meta['uid']},reason=FailedCreate")
    if not events:
        return None
    newest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp", ""))
    return "FailedCreate", newest.get("message", "")


ERROR_PREFIX = "error: "


def _site_error(pods: list[Mapping]) -> str:
    """Why the newest of a site's pods last stopped with an error, as `bouquet site` says it in
    its last line ("error: ..."), which the pod's termination message holds (its container's
    terminationMessagePolicy is FallbackToLogsOnError); '' if it did not."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        for container in pod.get("status", {}).get("containerStatuses", []):
            for state in (container.get("state", {}), container.get("lastState", {})):
                ended = state.get("terminated", {})
                said = [line[len(ERROR_PREFIX) :] for line in ended.get("message", "").splitlines() if line.startswith(ERROR_PREFIX)]
                if ended.get("exitCode") and said:
                    return said[-1]
    return ""


def _restarts(pods: list[Mapping]) -> int:
    return max((s.get("restartCount", 0) for p in pods for s in p.get("status", {}).get("containerStatuses", [])), default=0)


def _site_jobs(client: kube.Client, job: Mapping) -> dict[str, dict]:
    """The job's site Jobs by name (none in mode ServerOnly, which has no sites here)."""
    if job["spec"]["mode"] == "ServerOnly":
        return {}
    selector = f"{JOB_LABEL}={job['metadata']['name']},app.kubernetes.io/component=site"
    return {j["metadata"]["name"]: j for j in client.list("batch/v1", "Job", job["metadata"]["namespace"], selector)}


def _finished(site_job: Mapping) -> bool:
    """A site Job that has completed or failed: a record, left as it is."""
    return _condition(site_job, "Complete") is not None or _condition(site_job, "Failed") is not None


def observe(client: kube.Client, job: Mapping, site_jobs: Mapping[str, dict], now: datetime) -> status.Observation:
    """What the job's children (its site Jobs as listed by _site_jobs) and its server's
    report say."""
    spec, namespace, name = job["spec"], job["metadata"]["namespace"], job["metadata"]["name"]
    previous = job.get("status", {})
    pods = client.list("v1", "Pod", namespace, f"{JOB_LABEL}={name}")
    server_pods = [p for p in pods if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "server"]
    sites: dict[str, status.Site] = {}
    failing: dict[str, tuple[str, str]] = {}
    awaiting_pods = False
    if (stuck := _failing(server_pods)) is not None:
        failing["server"] = stuck
    progress = previous.get("progress", {})
    if spec["mode"] == "ServerOnly":
        sites = status.remote_sites(spec, progress)
    else:
        for site in spec["sites"]:
            found = site_jobs.get(render.site_job_name(job, site["name"]))
            if found is None:
                sites[site["name"]] = status.Site()
                continue
            site_pods = [p for p in pods if p["metadata"].get("labels", {}).get("bouquet.dev/site") == site["name"]]
            podless = _podless(found, site_pods)
            awaiting_pods = awaiting_pods or podless
            if (stuck := _failing(site_pods) or (_refused_pods(client, found) if podless else None)) is not None:
                failing[f"site {site['name']}"] = stuck
            sites[site["name"]] = status.Site(
                active=found.get("status", {}).get("ready", 0) or 0,
                succeeded=_condition(found, "Complete") is not None,
                failed=_condition(found, "Failed") is not None,
                unschedulable=_unschedulable(site_pods),
                error=_site_error(site_pods),
            )
    if spec["mode"] == "SitesOnly":
        server_ready = True  # the server is another cluster's; the sites say how it goes
    else:
        deployment = client.get("apps/v1", "Deployment", namespace, names(job)["server"])
        server_ready = bool(deployment and deployment.get("status", {}).get("readyReplicas", 0) >= 1)
        # Pods refused at admission (a quota, a policy): the Deployment says so, as its
        # ReplicaSet does, with reason FailedCreate and the API server's answer.
        refused = _condition(deployment, "ReplicaFailure") if deployment else None
        if refused is not None and "server" not in failing:
            failing["server"] = (refused.get("reason", "FailedCreate"), refused.get("message", ""))
    failure = progress.get("message", "training failed") if progress.get("state") == "Failed" else ""
    restarts, limit = _restarts(server_pods), spec["runPolicy"]["backoffLimit"]
    if not failure and restarts > limit:
        failure = f"the server restarted {restarts} times, more than runPolicy.backoffLimit ({limit})"
    model = None
    if progress.get("model"):
        model = {"claimName": names(job)["output"], **progress["model"]}
    return status.Observation(
        server_ready=server_ready,
        server_unschedulable=_unschedulable(server_pods),
        failing=failing,
        sites=sites,
        current_round=progress.get("round", 0),
        round_sites=progress.get("sites"),
        metrics=progress.get("metrics", {}),
        model=model,
        failure=failure,
        deadline_exceeded=_deadline_passed(job, now),
        refused_runs=progress.get("refusedRuns", {}),
        awaiting_pods=awaiting_pods,
    )


def _deadline_passed(job: Mapping, now: datetime) -> bool:
    previous = job.get("status", {})
    failed = next((c for c in previous.get("conditions", []) if c["type"] == status.FAILED), None)
    if failed and failed["status"] == "True" and failed["reason"] == "DeadlineExceeded":
        return True  # a failed job stays failed
    remaining = _deadline_remaining(job, now)
    return remaining is not None and remaining <= 0 and previous.get("phase") != "Succeeded"


def _deadline_remaining(job: Mapping, now: datetime) -> float | None:
    deadline = job["spec"]["runPolicy"].get("activeDeadlineSeconds")
    start = job.get("status", {}).get("startTime")
    if deadline is None or not start:
        return None
    return (_parse(start) + timedelta(seconds=deadline) - now).total_seconds()


def _ttl_remaining(ttl: int | None, job_status: Mapping, now: datetime) -> float | None:
    """Seconds until runPolicy.ttlSecondsAfterFinished deletes a finished job; None for a job
    not finished, or without a time to live."""
    if ttl is None or job_status.get("phase") not in status.FINAL or not job_status.get("completionTime"):
        return None
    return (_parse(job_status["completionTime"]) + timedelta(seconds=ttl) - now).total_seconds()


def _material(
    client: kube.Client, config: Config, job: Mapping
) -> tuple[tls.Bundle | None, dict[str, identity.SiteKey] | None, keep.Record]:
    """The job's TLS material and its sites' keys, from its record (see keep.py), or new.
    A copy that the operator made and that is gone was deleted by someone: a key revoked
    (or the TLS material, withdrawn); it is made again from new material, and the server
    restarts with it (a new site key is registered, the old one unregistered). A Secret of
    a copy's name that the operator did not make is refused."""
    spec = job["spec"]
    record = keep.load(client, config.own_namespace, job, keep.owner(client, config.own_namespace, config.own_account))
    before = record.snapshot() if record.exists else ""
    wants_tls = spec["mode"] != "SitesOnly" and spec["security"]["tls"]["mode"] == "Auto"
    sites = [s["name"] for s in spec["sites"]] if render.makes_site_keys(job) else []
    tls_name = names(job)["tls"]

    def revoked(name: str) -> bool:
        """Whether the copy `name` was made and has since been deleted (its material is to be
        replaced); a Secret of that name that the operator did not make is refused."""
        namespace = job["metadata"]["namespace"]
        probe = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}}
        if name not in record.copies:
            if keep.taken(client, probe):
                remedy = (
                    "name your own with spec.security.tls.mode Secret and secretName"
                    if name == tls_name
                    else f"rename site {render.site_of(job, name)}"
                )
                raise Refused(f"Secret {name} exists and is not this job's: delete it, or {remedy}")
            return False
        if record.copies[name] == "":  # being made when the operator stopped: made again
            client.delete("v1", "Secret", namespace, name)
            del record.copies[name]
            return False
        if keep.taken(client, probe):
            return False
        del record.copies[name]
        return True

    bundle = None
    if wants_tls:
        replace_it = revoked(tls_name)
        if not replace_it and all(k in record.data for k in ("tls.ca.crt", "tls.tls.crt", "tls.tls.key")):
            bundle = tls.Bundle(record.data["tls.ca.crt"], record.data["tls.tls.crt"], record.data["tls.tls.key"])
        else:
            bundle = tls.issue(job["metadata"]["name"], render.server_hostnames(job))
            record.data.update({f"tls.{k}": v for k, v in bundle.files().items()})
    keys = None
    if render.makes_site_keys(job):
        keys = {}
        for site in sites:
            private, public = f"site.{site}.{identity.PRIVATE}", f"site.{site}.{identity.PUBLIC}"
            replace_it = revoked(render.site_key_secret_name(job, site))
            if not replace_it and private in record.data and public in record.data:
                keys[site] = identity.SiteKey(record.data[private], record.data[public])
            else:
                keys[site] = identity.make()
                record.data.update({private: keys[site].private, public: keys[site].public})
    if record.snapshot() != before or record.stale:
        keep.save(client, config.own_namespace, job, record)
    return bundle, keys, record


def _remote_site_keys(client: kube.Client, job: Mapping) -> dict[str, str] | None:
    """Mode ServerOnly: the sites' public keys from the ConfigMap that
    security.siteKeys.configMapName names (None while it does not exist: the server's pod
    waits for it). A key that is not one is refused, naming it."""
    if job["spec"]["mode"] != "ServerOnly" or not render.authenticates_sites(job):
        return None
    name = render.site_keys_config_name(job)
    found = client.get("v1", "ConfigMap", job["metadata"]["namespace"], name)
    if found is None:
        return None
    data = dict(found.get("data", {}))
    for key, text in sorted(data.items()):
        problem = identity.public_key_problem(text) if key.endswith(".pub") else "not <site>.pub"
        if problem:
            raise Refused(f"security.siteKeys.configMapName: ConfigMap {name}, key {key}: {problem} (each site's public key as <site>.pub)")
    return data


class Refused(Exception):
    """The job cannot be reconciled until someone changes something; the message says what."""


def _with_progress(new_status: Mapping, before: Mapping) -> dict:
    """The whole status: what the operator writes and the progress, which is the server's."""
    return {**new_status, "progress": before["progress"]} if "progress" in before else dict(new_status)


def _write_status(client: kube.Client, job: Mapping, new_status: Mapping) -> None:
    """Writes new_status if it changes what job's status says, with an Event for each transition."""
    before = job.get("status", {})
    if _with_progress(new_status, before) != before:
        client.apply(_status_body(job, new_status), FIELD_MANAGER, subresource="status")
        _transition_events(client, job, before, new_status)


def _status_body(job: Mapping, new_status: Mapping) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job["metadata"]["name"], "namespace": job["metadata"]["namespace"]},
        "status": new_status,
    }


def _event(client: kube.Client, job: Mapping, kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on the job, as `kubectl describe fj` shows them."""
    meta, stamp = job["metadata"], _rfc3339(_now())
    try:
        client.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "type": kind,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": f"{GROUP}/operator",
                "reportingInstance": os.environ.get("HOSTNAME", "bouquet-operator"),
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            }
        )
    except kube.ApiError as error:  # an event lost is not worth failing the reconcile for
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error)


def _transition_events(client: kube.Client, job: Mapping, before: Mapping, after: Mapping) -> None:
    was = {c["type"]: c for c in before.get("conditions", [])}
    if before.get("phase") != after["phase"]:
        failed = next(c for c in after["conditions"] if c["type"] == status.FAILED)
        succeeded = next(c for c in after["conditions"] if c["type"] == status.SUCCEEDED)
        if after["phase"] == "Failed":
            _event(client, job, "Warning", failed["reason"], failed["message"])
        elif after["phase"] == "Succeeded":
            _event(client, job, "Normal", succeeded["reason"], succeeded["message"])
        else:
            moved = f"phase {before['phase']} -> {after['phase']}" if before.get("phase") else f"phase {after['phase']}"
            _event(client, job, "Normal", after["phase"], moved)
    refused_before = {s["name"]: s.get("refusedRuns", 0) for s in before.get("sites", [])}
    for site in after["sites"]:
        if site.get("refusedRuns", 0) > refused_before.get(site["name"], 0):
            _event(
                client,
                job,
                "Warning",
                "ForeignRunRefused",
                f"site {site['name']} has refused {site['refusedRuns']} run(s) of an app that is not the job's: "
                "someone who reaches its server submitted other code; nothing of it ran at the site",
            )
    for c in after["conditions"]:
        if c["type"] in (status.UNSCHEDULABLE, status.PODS_FAILING) and c["status"] == "True":
            old = was.get(c["type"], {})
            if old.get("status") != "True" or old.get("message") != c["message"]:
                _event(client, job, "Warning", c["reason"], c["message"])


def _network(client: kube.Client, namespace: str, service: str) -> render.Destination | None:
    """The addresses and ports of a Service's endpoints, from its EndpointSlices (None when
    it has none)."""
    slices = client.list("discovery.k8s.io/v1", "EndpointSlice", namespace, f"kubernetes.io/service-name={service}")
    addresses = sorted(
        {a for s in slices if s.get("addressType") in ("IPv4", "IPv6") for e in s.get("endpoints") or [] for a in e["addresses"]}
    )
    ports = sorted({(p["port"], p.get("protocol", "TCP")) for s in slices for p in s.get("ports") or [] if p.get("port")})
    return render.Destination(tuple(addresses), tuple(ports)) if addresses and ports else None


class ClusterNetwork:
    """Where the cluster's DNS and API server listen, as a NetworkPolicy sees them: the
    endpoints of the DNS Service and of the `kubernetes` Service, read at most every
    `seconds` (they change seldom, and a change reaches every job's policies within that)."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds, self.read_at, self.value = seconds, float("-inf"), (None, None)
        self.lock = threading.Lock()

    def get(self, client: kube.Client, dns_service: str) -> tuple[render.Destination | None, render.Destination | None]:
        with self.lock:
            if time.monotonic() - self.read_at > self.seconds:
                namespace, service = dns_service.split("/", 1)
                self.value = (_network(client, namespace, service), _network(client, "default", "kubernetes"))
                self.read_at = time.monotonic()
            return self.value


cluster_network = ClusterNetwork()


def _not_its_own(client: kube.Client, job: Mapping, child: Mapping, site_jobs: Mapping[str, dict]) -> str:
    """Why child cannot be applied: an object of its kind and name exists that the job does
    not control (made by someone else, or another job's of a name that renders the same).
    Server-side apply would take it over; it is refused instead. "" when there is none."""
    meta = child["metadata"]
    # The job's site Jobs are listed already (by its labels); any other object is looked up.
    live = site_jobs.get(meta["name"]) if child["kind"] == "Job" else None
    live = live or client.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
    if live is None:
        return ""
    owner = next((o for o in live["metadata"].get("ownerReferences", []) if o.get("controller")), None)
    if owner is not None and owner.get("uid") == job["metadata"]["uid"]:
        return ""
    whose = f"{owner['kind']} {owner['name']}'s" if owner else "made by someone else"
    return f"{child['kind']} {meta['name']} exists and is not this job's ({whose}): delete or rename it, or rename the job"


def _settled(before: Mapping, after: Mapping, memory: Memory, generation: int, force: bool) -> bool:
    """Whether the job finished before this look, and its children were applied for its spec
    as it is: then they are left alone (no key is probed, nothing applied), unless a deleted
    child forces it."""
    finished = after["phase"] in status.FINAL and before.get("phase") == after["phase"]
    return finished and not force and bool(memory.applied) and memory.generation == generation


def _apply_children(
    client: kube.Client,
    config: Config,
    job: Mapping,
    children: list[dict],
    site_jobs: Mapping[str, dict],
    record: keep.Record,
    memory: Memory,
) -> float | None:
    """Applies every child but finished site Jobs; returns seconds to requeue after when one
    had to be replaced. No pod of the job is created unguarded: the job's NetworkPolicies are
    applied first, and each is read back before the server's Deployment or a site's Job is
    applied. An object of a child's name that the job does not control is refused, never
    taken over (each child is looked up once: memory keeps those seen to be the job's)."""
    own = memory.own
    finished = {name for name, site_job in site_jobs.items() if _finished(site_job)}
    going = {name for name, site_job in site_jobs.items() if site_job["metadata"].get("deletionTimestamp")}
    requeue = None
    guarded = False
    for child in children:
        if child["kind"] == "Job" and child["metadata"]["name"] in finished:
            continue
        if child["kind"] == "Job" and child["metadata"]["name"] in going:
            requeue = 1.0  # its replacement is made once it is gone, with its pods
            continue
        if child["kind"] == "Secret":
            # A copy of the job's record, made once and never read back (see keep.py).
            if child["metadata"]["name"] not in record.copies:
                keep.make_copy(client, config.own_namespace, job, record, child)
            continue
        if child["kind"] in ("Deployment", "Job") and not guarded:
            for policy in (c for c in children if c["kind"] == "NetworkPolicy"):
                if client.get("networking.k8s.io/v1", "NetworkPolicy", policy["metadata"]["namespace"], policy["metadata"]["name"]) is None:
                    raise Refused(
                        f"NetworkPolicy {policy['metadata']['name']} does not exist after it was applied: no pod of the job starts without it"
                    )
            guarded = True
        key, owned = (child["kind"], child["metadata"]["name"]), bool(child["metadata"].get("ownerReferences"))
        if owned and key not in own:
            problem = _not_its_own(client, job, child, site_jobs)
            if problem:
                raise Refused(problem)
        try:
            applied = client.apply(child, FIELD_MANAGER)
            if owned:
                own[key] = applied["metadata"]["uid"]
        except kube.ApiError as error:
            immutable = error.status == 422 and "field is immutable" in str(error)
            if child["kind"] == "Job" and immutable:
                # A Job's pod template cannot change: the spec did, so the site starts again
                # from a new Job (training continues from the server's checkpoint), made once
                # the old one's pods are gone: never two SuperNodes of one site at once.
                namespace, name = child["metadata"]["namespace"], child["metadata"]["name"]
                client.delete("batch/v1", "Job", namespace, name, propagation="Foreground")
                own.pop(key, None)
                _event(client, job, "Normal", "SiteRestarted", f"Job {name} is replaced: the job's spec changed")
                requeue = 1.0
                continue
            raise Refused(f"cannot apply {child['kind']} {child['metadata']['name']}: {error}") from error
    return requeue


def _prune(
    client: kube.Client, config: Config, job: Mapping, children: list[dict], site_jobs: Mapping[str, dict], record: keep.Record
) -> dict[str, list[str]]:
    """Deletes the site Jobs and site key Secrets the job has and render no longer gives (a
    site taken out of spec.sites, sites or keys no longer kept here, children of an earlier
    naming); returns what it deleted, by site. Only the job's own objects are deleted: its
    site Jobs as listed, and the key copies its record lists, so that no Secret needs listing."""
    meta = job["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    deleted: dict[str, list[str]] = {}
    for name, obj in sorted(site_jobs.items()):
        if ("Job", name) in wanted or uid not in {o.get("uid") for o in obj["metadata"].get("ownerReferences", [])}:
            continue
        site = obj["metadata"].get("labels", {}).get("bouquet.dev/site") or render.site_of(job, name)
        if client.delete("batch/v1", "Job", namespace, name, uid=obj["metadata"]["uid"]):
            deleted.setdefault(site, []).append(f"Job {name}")
    tls_name = names(job)["tls"]  # (kept: a job that turns TLS off may turn it on again)
    for name in sorted(record.copies):
        if name == tls_name or ("Secret", name) in wanted:
            continue
        # A copy of the record's (never read: see keep.py)
        if keep.delete_copy(client, config.own_namespace, job, record, name):
            deleted.setdefault(render.site_of(job, name), []).append(f"Secret {name}")
    kept = {s["name"] for s in job["spec"]["sites"]} if render.makes_site_keys(job) else set()
    dropped = [k for k in record.data if k.startswith("site.") and k.split(".")[1] not in kept]
    for k in dropped:
        del record.data[k]
    if dropped:
        keep.save(client, config.own_namespace, job, record)
    return deleted


def _pruned_events(client: kube.Client, job: Mapping, deleted: Mapping[str, list[str]]) -> None:
    named = {s["name"] for s in job["spec"]["sites"]}
    for site, objects in deleted.items():
        if site in named:
            _event(client, job, "Normal", "Pruned", f"site {site}: deleted {' and '.join(objects)}, which the job's spec no longer needs")
        else:
            server = (
                "the aggregator's server admits its key until it is taken out of the ConfigMap its security.siteKeys names"
                if job["spec"]["mode"] == "SitesOnly"
                else "the server no longer admits its key"
            )
            message = f"site {site} was removed from spec.sites: deleted {' and '.join(objects)}; {server}"
            log.info("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
            _event(client, job, "Normal", "SiteRemoved", message)


def reconcile(client: kube.Client, config: Config, namespace: str, name: str, memory: Memory, force: bool) -> Outcome:
    job = client.get(API_VERSION, KIND, namespace, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        keep.forget(client, config.own_namespace, namespace, name)
        return Outcome(gone=True)
    now = _now()
    spec, before = job["spec"], job.get("status", {})

    ttl = spec["runPolicy"].get("ttlSecondsAfterFinished")
    left = _ttl_remaining(ttl, before, now)
    if left is not None and left <= 0:
        _event(client, job, "Normal", "Deleted", f"runPolicy.ttlSecondsAfterFinished ({ttl}s) has passed since the job finished")
        client.delete(API_VERSION, KIND, namespace, name, uid=job["metadata"]["uid"])
        return Outcome(gone=True)

    site_jobs = _site_jobs(client, job)
    remote_site_keys = _remote_site_keys(client, job)
    seen = observe(client, job, site_jobs, now)
    if remote_site_keys is None and spec["mode"] == "ServerOnly" and render.authenticates_sites(job):
        missing = (
            f"ConfigMap {render.site_keys_config_name(job)} (security.siteKeys.configMapName), the sites' public keys, does not exist yet"
        )
        seen = replace(seen, server_waits_for=missing)
    after = status.derive(job, seen, _rfc3339(now))
    observed = job
    # The children are rendered from the new status (a job that ended scales its server to 0),
    # which is written once they are applied: what it says of the spec's generation was done.
    job = {**job, "status": _with_progress(after, before)}
    requeue = None
    generation = observed["metadata"].get("generation", 0)
    if _settled(before, after, memory, generation, force):
        _write_status(client, observed, after)
        return Outcome(requeue_after=_ttl_remaining(ttl, after, now), phase=after["phase"])
    try:
        dns, api_server = cluster_network.get(client, config.dns_service)
        bundle, site_keys, record = _material(client, config, job)
        settings = Settings(
            config.image,
            bundle,
            site_keys,
            config.metrics_scrapers,
            dns,
            api_server,
            remote_site_keys,
        )
        children = render.render(job, settings)
        digest = json.dumps(children, sort_keys=True)
        if force or digest != memory.applied:
            requeue = _apply_children(client, config, job, children, site_jobs, record, memory)
            _pruned_events(client, job, _prune(client, config, job, children, site_jobs, record))
            memory.applied = "" if requeue else digest
        memory.generation = generation
    except (Refused, kube.ApiError) as error:
        try:
            _write_status(client, observed, status.refused(observed, after, str(error), _rfc3339(now)))
        except kube.ApiError as unwritten:
            log.warning("could not write the status of %s/%s: %s", namespace, name, unwritten)
        raise
    _write_status(client, observed, after)

    # When to look again without being told: the deadline, the time to live, a replaced Job,
    # a site Job with no pod yet (pods refused at admission change nothing that is watched).
    deadline = _deadline_remaining(job, now) if after["phase"] == "Running" else None
    podless = PODLESS_LOOK_SECONDS if seen.awaiting_pods and after["phase"] not in status.FINAL else None
    waits = [w for w in (requeue, deadline, _ttl_remaining(ttl, after, now), podless) if w is not None]
    return Outcome(requeue_after=max(0.5, min(waits)) if waits else None, phase=after["phase"])


# --- the work queue and its workers ---------------------------------------------------------


class WorkQueue:
    """Each key at most once in the queue and at most one worker on it; a key added while
    a worker has it is queued again when the worker is done (client-go's workqueue)."""

    def __init__(self, added: Callable[[], None] = lambda: None, waited: Callable[[float], None] = lambda seconds: None) -> None:
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.pending: set = set()
        self.active: set = set()
        self.dirty: set = set()
        self.forced: set = set()
        self.timers: dict = {}
        self.queued_at: dict = {}  # key -> when it was queued
        self.added, self.waited = added, waited  # for the metrics: a key queued; how long one waited

    def add(self, key: tuple[str, str], force: bool = False) -> None:
        if force:
            self.forced.add(key)
        if key in self.active:
            self.dirty.add(key)
        elif key not in self.pending:
            self.pending.add(key)
            self.queued_at[key] = time.monotonic()
            self.added()
            self.queue.put_nowait(key)

    def add_after(self, key: tuple[str, str], seconds: float, force: bool = False) -> None:
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
        self.timers[key] = asyncio.get_running_loop().call_later(seconds, self.add, key, force)

    async def get(self) -> tuple[tuple[str, str], bool]:
        key = await self.queue.get()
        self.waited(time.monotonic() - self.queued_at.pop(key, time.monotonic()))
        self.pending.discard(key)
        self.active.add(key)
        force = key in self.forced
        self.forced.discard(key)
        return key, force

    def done(self, key: tuple[str, str]) -> None:
        self.active.discard(key)
        if key in self.dirty:
            self.dirty.discard(key)
            self.add(key)

    def forget(self, key: tuple[str, str]) -> None:
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()


class Metrics:
    """The operator's metrics, named after controller-runtime's with a bouquet_ prefix."""

    def __init__(self, phases, requests=dict, leading=lambda: True) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RequestCollector(requests))
        self.leader = Gauge("bouquet_leader", "1 while this replica holds the Lease and acts, else 0.", registry=self.registry)
        self.leader.set_function(lambda: 1.0 if leading() else 0.0)
        self.reconciles = Counter(
            "bouquet_reconcile",
            "Reconciles by controller and result (success, error, requeue).",
            ["controller", "result"],
            registry=self.registry,
        )
        self.errors = Counter("bouquet_reconcile_errors", "Reconciles that ended in an error.", ["controller"], registry=self.registry)
        self.duration = Histogram(
            "bouquet_reconcile_time_seconds",
            "How long a reconcile took.",
            ["controller"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.registry.register(_PhaseCollector(phases))
        # As client-go's workqueue metrics: how many keys wait, were queued, and how long they waited.
        self.depth = Gauge("bouquet_workqueue_depth", "Jobs waiting in the work queue.", registry=self.registry)
        self.adds = Counter("bouquet_workqueue_adds", "Jobs queued for a reconcile.", registry=self.registry)
        self.queue_duration = Histogram(
            "bouquet_workqueue_queue_duration_seconds",
            "How long a job waited in the work queue before a worker took it.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        for result in ("success", "error", "requeue"):
            self.reconciles.labels(CONTROLLER, result)
        self.errors.labels(CONTROLLER)
        self.duration.labels(CONTROLLER)


class _RequestCollector:
    """The operator's requests to the API server, by method, as its client counted them."""

    def __init__(self, requests) -> None:
        self.requests = requests

    def collect(self):
        family = CounterMetricFamily("bouquet_api_requests", "Requests the operator made to the API server, by method.", labels=["method"])
        counts = {method: 0 for method in ("GET", "POST", "PATCH", "DELETE")} | self.requests()
        for method, count in sorted(counts.items()):
            family.add_metric([method], count)
        yield family


class _PhaseCollector:
    def __init__(self, phases) -> None:
        self.phases = phases

    def collect(self):
        family = GaugeMetricFamily("bouquet_federatedjobs", "FederatedJobs the operator watches, by phase.", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for phase in list(self.phases().values()):
            counts[phase or "Pending"] = counts.get(phase or "Pending", 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


@dataclass
class Controller:
    config: Config
    client: kube.Client
    queue: WorkQueue = field(default_factory=WorkQueue)
    jobs: dict = field(default_factory=dict)  # (namespace, name) -> phase, from the watch
    memory: dict = field(default_factory=dict)
    uids: dict = field(default_factory=dict)  # (namespace, name) -> uid, from the watch
    tasks: list = field(default_factory=list)
    metrics: Metrics | None = None
    elector: leader.Elector | None = None

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.jobs, lambda: dict(self.client.requests), lambda: self.leading())
        self.queue.added, self.queue.waited = self.metrics.adds.inc, self.metrics.queue_duration.observe
        self.metrics.depth.set_function(lambda: len(self.queue.pending))

    async def start(self) -> None:
        """Serves the metrics and acts: at once, or (with leader election) once it holds the
        Lease. Meanwhile the watches keep the jobs it would act on."""
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
        self.queue.add(key)

    def _forget(self, key: tuple[str, str]) -> None:
        self.jobs.pop(key, None)
        self.uids.pop(key, None)
        self.memory.pop(key, None)
        self.queue.forget(key)

    def child_seen(self, event_type: str | None, body: Mapping) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta.get("labels", {}).get(JOB_LABEL))
        if key in self.jobs:
            self.queue.add(key, force=event_type == "DELETED")

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            self._queue_every_job()
            try:
                await asyncio.to_thread(keep.collect, self.client, self.config.own_namespace, self._job_exists)
            except kube.ApiError as error:
                log.warning("could not look for the records of deleted jobs: %s", error)

    def _job_exists(self, namespace: str, name: str, uid: str) -> bool:
        if self.uids.get((namespace, name)) == uid:
            return True
        found = self.client.get(API_VERSION, KIND, namespace, name)
        return found is not None and found["metadata"]["uid"] == uid

    async def _worker(self, number: int) -> None:
        while True:
            key, force = await self.queue.get()
            memory = self.memory.setdefault(key, Memory())
            started = time.monotonic()
            try:
                outcome = await asyncio.to_thread(reconcile, self.client, self.config, *key, memory, force)
            except Exception as error:  # noqa: BLE001 - any failure: report it, and try again
                self.metrics.errors.labels(CONTROLLER).inc()
                self.metrics.reconciles.labels(CONTROLLER, "error").inc()
                text = str(error)
                memory.attempt += 1
                delay = min(60.0, 0.5 * 2**memory.attempt)
                if text != memory.last_error:
                    memory.last_error = text
                    level = logging.WARNING if isinstance(error, Refused | kube.ApiError) else logging.ERROR
                    log.log(level, "reconciling %s/%s failed (again in %.0fs): %s", *key, delay, text, exc_info=level == logging.ERROR)
                    await asyncio.to_thread(self._error_event, key, text)
                self.queue.add_after(key, delay, force=True)
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
        try:
            job = self.client.get(API_VERSION, KIND, *key)
        except kube.ApiError:
            return
        if job:
            _event(self.client, job, "Warning", "ReconcileFailed", text)

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


for _api_version, _plural in (("apps/v1", "deployments"), ("batch/v1", "jobs"), ("v1", "pods")):

    @kopf.on.event(_api_version, _plural, labels={JOB_LABEL: kopf.PRESENT})
    def _child_event(event: Mapping, body: kopf.Body, memo: kopf.Memo, **_) -> None:
        memo.controller.child_seen(event.get("type"), body)
