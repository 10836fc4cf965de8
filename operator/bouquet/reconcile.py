"""One reconcile of one job, from scratch (blocking; the controller runs it in a worker
thread):

    read the job  ->  observe its children  ->  status.derive  ->  render  ->  server-side
    apply every child (one field manager, owner references)  ->  write the status from what
    was applied and observed  ->  events for what changed

so a changed spec, a deleted child and a restarted operator all converge to the same state,
and nothing is created twice (server-side apply of a named object either creates or
updates it)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from . import identity, keep, kube, observe, render, status, tls
from .render import API_VERSION, KIND, Settings, names

GROUP = API_VERSION.split("/")[0]
FIELD_MANAGER = "bouquet-operator"
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
    # The namespaces watched (none: every namespace): where the resync lists the jobs.
    namespaces: tuple[str, ...] = ()
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
            namespaces=tuple(n for n in env.get("BOUQUET_NAMESPACES", "").split(",") if n),
            workers=int(env.get("BOUQUET_WORKERS", cls.workers)),
            port=int(env.get("BOUQUET_OPERATOR_PORT", cls.port)),
            host=env.get("BOUQUET_OPERATOR_HOST", cls.host),
            leader_election=env.get("BOUQUET_LEADER_ELECTION", "true").lower() != "false",
        )


configured: Config | None = None  # set by `bouquet operator` before kopf starts


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
    last_error: str = ""
    attempt: int = 0  # failed reconciles in a row, for the backoff


def _not_its_secret(job: Mapping, name: str) -> str:
    remedy = (
        "name your own with spec.security.tls.mode Secret and secretName"
        if name == names(job)["tls"]
        else f"rename site {render.site_of(job, name)}"
    )
    return f"Secret {name} exists and is not this job's: delete it, or {remedy}"


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
                raise Refused(_not_its_secret(job, name))
            return False
        if record.copies[name] == "":
            # Being made when the operator stopped, and maybe made: the operator may not read
            # it to know, so it is made again (from the same material).
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


def record_event(client: kube.Client, job: Mapping, kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on the job, as `kubectl describe fj` shows them."""
    meta, stamp = job["metadata"], observe.rfc3339(observe.utcnow())
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
            record_event(client, job, "Warning", failed["reason"], failed["message"])
        elif after["phase"] == "Succeeded":
            record_event(client, job, "Normal", succeeded["reason"], succeeded["message"])
        else:
            moved = f"phase {before['phase']} -> {after['phase']}" if before.get("phase") else f"phase {after['phase']}"
            record_event(client, job, "Normal", after["phase"], moved)
    refused_before = {s["name"]: s.get("refusedRuns", 0) for s in before.get("sites", [])}
    failed_before = {s["name"] for s in before.get("sites", []) if s["state"] == "Failed"}
    for site in after["sites"]:
        if site["state"] == "Failed" and site["name"] not in failed_before and after["phase"] != "Failed":
            record_event(
                client,
                job,
                "Warning",
                "SiteFailed",
                f"site {site['name']} {site['message']}; the run goes on without it, "
                f"as enough sites are left for {status.min_sites_rule(job['spec'])}",
            )
        if site.get("refusedRuns", 0) > refused_before.get(site["name"], 0):
            record_event(
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
                record_event(client, job, "Warning", c["reason"], c["message"])


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


def _live(client: kube.Client, child: Mapping, site_jobs: Mapping[str, dict]) -> dict | None:
    """The object of child's kind and name as it is (the job's site Jobs are listed already,
    by its labels: a Job not among them is looked up)."""
    meta = child["metadata"]
    listed = site_jobs.get(meta["name"]) if child["kind"] == "Job" else None
    if listed is not None:  # (a list's items do not say their kind)
        return {**listed, "apiVersion": child["apiVersion"], "kind": child["kind"]}
    return client.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])


def _not_its_own(job: Mapping, child: Mapping, live: Mapping | None) -> str:
    """Why child cannot be applied: an object of its kind and name exists (live) that the job
    does not control (made by someone else, or another job's). Server-side apply would take
    it over; it is refused instead. "" when there is none."""
    if live is None:
        return ""
    owner = next((o for o in live["metadata"].get("ownerReferences", []) if o.get("controller")), None)
    if owner is not None and owner.get("uid") == job["metadata"]["uid"]:
        return ""
    whose = f"{owner['kind']} {owner['name']}'s" if owner else "made by someone else"
    return f"{child['kind']} {child['metadata']['name']} exists and is not this job's ({whose}): delete or rename it, or rename the job"


def holds(live, wanted) -> bool:
    """Whether live already has every field that wanted sets, as wanted sets it: then a
    server-side apply of wanted would change nothing. Fields live has besides (defaults,
    other managers' fields, status) do not count; an empty map or list wanted is held by a
    field the API server left out."""
    if isinstance(wanted, Mapping):
        if not isinstance(live, Mapping):
            return not wanted and live is None
        return all(holds(live.get(key), value) for key, value in wanted.items())
    if isinstance(wanted, list):
        if not isinstance(live, list):
            return not wanted and live is None
        return len(live) == len(wanted) and all(holds(have, want) for have, want in zip(live, wanted, strict=True))
    return live == wanted


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
    compare: bool = False,
) -> float | None:
    """Applies every child but finished site Jobs; returns seconds to requeue after when one
    had to be replaced. No pod of the job is created unguarded: the job's NetworkPolicies are
    applied first, and each is read back before the server's Deployment or a site's Job is
    applied. An object of a child's name that the job does not control is refused, never
    taken over: each child is looked up before it is applied (the watched kinds in the
    informers' caches), so one deleted and made again by someone else is refused too.
    With compare, a child is applied only if it is not as rendered (a resync: nothing
    changed but what someone else may have done to the children), so a job at rest costs
    reads, never writes; without, every child is applied (what is rendered changed, and
    an apply also removes the fields the operator no longer sets)."""
    finished = {name for name, site_job in site_jobs.items() if observe.finished(site_job)}
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
            if child["metadata"]["name"] not in record.copies and not keep.make_copy(client, config.own_namespace, job, record, child):
                raise Refused(_not_its_secret(job, child["metadata"]["name"]))
            continue
        if child["kind"] in ("Deployment", "Job") and not guarded:
            for policy in (c for c in children if c["kind"] == "NetworkPolicy"):
                if client.get("networking.k8s.io/v1", "NetworkPolicy", policy["metadata"]["namespace"], policy["metadata"]["name"]) is None:
                    raise Refused(
                        f"NetworkPolicy {policy['metadata']['name']} does not exist after it was applied: no pod of the job starts without it"
                    )
            guarded = True
        live = _live(client, child, site_jobs)
        if child["metadata"].get("ownerReferences") and (problem := _not_its_own(job, child, live)):
            raise Refused(problem)
        if compare and live is not None and holds(live, child):
            continue
        try:
            client.apply(child, FIELD_MANAGER)
        except kube.ApiError as error:
            immutable = error.status == 422 and "field is immutable" in str(error)
            if child["kind"] == "Job" and immutable:
                # A Job's pod template cannot change: the spec did, so the site starts again
                # from a new Job (training continues from the server's checkpoint), made once
                # the old one's pods are gone: never two SuperNodes of one site at once.
                namespace, name = child["metadata"]["namespace"], child["metadata"]["name"]
                client.delete("batch/v1", "Job", namespace, name, propagation="Foreground")
                record_event(client, job, "Normal", "SiteRestarted", f"Job {name} is replaced: the job's spec changed")
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
            record_event(
                client, job, "Normal", "Pruned", f"site {site}: deleted {' and '.join(objects)}, which the job's spec no longer needs"
            )
        else:
            server = (
                "the aggregator's server admits its key until it is taken out of the ConfigMap its security.siteKeys names"
                if job["spec"]["mode"] == "SitesOnly"
                else "the server no longer admits its key"
            )
            message = f"site {site} was removed from spec.sites: deleted {' and '.join(objects)}; {server}"
            log.info("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
            record_event(client, job, "Normal", "SiteRemoved", message)


def reconcile(client: kube.Client, config: Config, namespace: str, name: str, memory: Memory, force: bool) -> Outcome:
    job = client.get(API_VERSION, KIND, namespace, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        keep.forget(client, config.own_namespace, namespace, name)
        return Outcome(gone=True)
    now = observe.utcnow()
    spec, before = job["spec"], job.get("status", {})

    ttl = spec["runPolicy"].get("ttlSecondsAfterFinished")
    left = observe.ttl_remaining(ttl, before, now)
    if left is not None and left <= 0:
        record_event(client, job, "Normal", "Deleted", f"runPolicy.ttlSecondsAfterFinished ({ttl}s) has passed since the job finished")
        client.delete(API_VERSION, KIND, namespace, name, uid=job["metadata"]["uid"])
        return Outcome(gone=True)

    site_jobs = observe.site_jobs(client, job)
    remote_site_keys = _remote_site_keys(client, job)
    seen = observe.observe(client, job, site_jobs, now)
    if remote_site_keys is None and spec["mode"] == "ServerOnly" and render.authenticates_sites(job):
        missing = (
            f"ConfigMap {render.site_keys_config_name(job)} (security.siteKeys.configMapName), the sites' public keys, does not exist yet"
        )
        seen = replace(seen, server_waits_for=missing)
    after = status.derive(job, seen, observe.rfc3339(now))
    observed = job
    # The children are rendered from the new status (a job that ended scales its server to 0),
    # which is written once they are applied: what it says of the spec's generation was done.
    job = {**job, "status": _with_progress(after, before)}
    requeue = None
    generation = observed["metadata"].get("generation", 0)
    if _settled(before, after, memory, generation, force):
        _write_status(client, observed, after)
        return Outcome(requeue_after=observe.ttl_remaining(ttl, after, now), phase=after["phase"])
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
            # Rendered as last applied (a resync, a child's event): only what is not as
            # rendered is applied.
            compare = digest == memory.applied
            requeue = _apply_children(client, config, job, children, site_jobs, record, compare)
            _pruned_events(client, job, _prune(client, config, job, children, site_jobs, record))
            memory.applied = "" if requeue else digest
        memory.generation = generation
    except (Refused, kube.ApiError) as error:
        try:
            _write_status(client, observed, status.refused(observed, after, str(error), observe.rfc3339(now)))
        except kube.ApiError as unwritten:
            log.warning("could not write the status of %s/%s: %s", namespace, name, unwritten)
        raise
    _write_status(client, observed, after)

    # When to look again without being told: the deadline, the time to live, a replaced Job,
    # a site Job with no pod yet (pods refused at admission change nothing that is watched).
    deadline = observe.deadline_remaining(job, now) if after["phase"] == "Running" else None
    podless = observe.PODLESS_LOOK_SECONDS if seen.awaiting_pods and after["phase"] not in status.FINAL else None
    waits = [w for w in (requeue, deadline, observe.ttl_remaining(ttl, after, now), podless) if w is not None]
    return Outcome(requeue_after=max(0.5, min(waits)) if waits else None, phase=after["phase"])
