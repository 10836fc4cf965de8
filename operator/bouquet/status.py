"""A FederatedJob's status, as a pure function of what the operator observes.

The operator observes the job's children (the server Deployment, each site's Job and its
pods) and the training's progress, and this module turns that into the status it writes:
phase, conditions in the metav1.Condition shape, rounds, per-site states, metrics, the
model. Being pure, the same observations always give the same status, which is what lets
the operator reconcile from scratch after a restart. The status recorded before is one of
them: a Succeeded or Failed phase is final, as a Kubernetes Job's is, whatever is left to
observe afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Digits of the metrics in status.metrics (the Accuracy column).
METRIC_DECIMALS = 4

# Condition types, as `kubectl wait --for=condition=<type>` names them.
READY = "Ready"  # the server is up and every site is running (but those failed for good)
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
FINAL = (SUCCEEDED, FAILED)  # phases that never change once recorded
UNSCHEDULABLE = "Unschedulable"
PODS_FAILING = "PodsFailing"  # a pod of the job cannot start, keeps crashing or is refused (Kubernetes' reason)
RECONCILED = "Reconciled"  # the job's children are as its spec (of observedGeneration) says


@dataclass(frozen=True)
class Site:
    """What the operator saw of one site's Job."""

    active: int = 0
    succeeded: bool = False
    failed: bool = False
    unschedulable: str = ""  # the scheduler's message for a pod it cannot place
    error: str = ""  # why its last attempt stopped, as the site said it (the server refused its key)


@dataclass(frozen=True)
class Observation:
    server_ready: bool = False
    server_unschedulable: str = ""  # the scheduler's message for a server pod it cannot place
    sites: Mapping[str, Site] = field(default_factory=dict)
    current_round: int = 0  # the last round that finished
    round_sites: int | None = None  # how many sites took part in it (None before round 1)
    metrics: Mapping[str, float] = field(default_factory=dict)
    model: Mapping | None = None  # set once the final model is written
    failure: str = ""  # why training failed, if it did (the server's report, or its restarts)
    deadline_exceeded: bool = False
    refused_runs: Mapping[str, int] = field(default_factory=dict)  # site -> runs of other apps it refused
    server_waits_for: str = ""  # what the server cannot start without (the sites' public keys)
    # "server" or "site <name>" -> (Kubernetes' reason, its message) for a pod of it that
    # cannot start (ErrImagePull, ImagePullBackOff, ...), keeps crashing (CrashLoopBackOff)
    # or is refused at admission (FailedCreate)
    failing: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    awaiting_pods: bool = False  # a site Job that should run has no pod yet


def remote_sites(spec: Mapping, progress: Mapping) -> dict[str, Site]:
    """What a ServerOnly job knows of its sites, which run in other clusters: the server's
    report of who took part in the last round (running, or once the run has succeeded,
    done). A site that took no part in it reads Pending."""
    taking_part = set(progress.get("takingPart", []))
    done = progress.get("state") == "Succeeded"
    return {
        s["name"]: Site(active=int(s["name"] in taking_part and not done), succeeded=done and s["name"] in taking_part)
        for s in spec["sites"]
    }


def derive(job: Mapping, seen: Observation, now: str) -> dict:
    """The status to write for the job, given what was observed at time now (RFC 3339)."""
    spec, previous = job["spec"], job.get("status", {})
    generation = job["metadata"].get("generation", 0)
    rounds = spec["rounds"]
    phase, reason, message = _ended(previous) or _phase(spec, seen)
    status: dict = {
        "phase": phase,
        "observedGeneration": generation,
        "currentRound": seen.current_round,
        "totalRounds": rounds,
        "round": f"{seen.current_round}/{rounds}",
        "sitesReady": sum(1 for s in seen.sites.values() if s.active),
        "sites": [
            _site_status(name, seen.sites.get(name, Site()), seen.refused_runs.get(name, 0)) for name in (s["name"] for s in spec["sites"])
        ]
        + _removed(spec, previous),
    }
    if seen.round_sites is not None:
        status["roundSites"] = seen.round_sites
    if seen.metrics:
        # As `kubectl get fj` shows them; status.progress.metrics keeps every digit.
        status["metrics"] = {k: round(v, METRIC_DECIMALS) for k, v in seen.metrics.items()}
    if seen.model:
        status["model"] = dict(seen.model)
    # As for a Kubernetes Job, a suspended job has no start time, and one that resumes
    # starts again: runPolicy.activeDeadlineSeconds counts from it.
    start = None if phase == "Suspended" else previous.get("startTime") or (now if phase in ("Running", "Succeeded", "Failed") else None)
    if start:
        status["startTime"] = start
    if phase in FINAL:
        status["completionTime"] = previous.get("completionTime") or now
    wanted = {
        READY: (
            seen.server_ready and all(s.active for s in seen.sites.values() if not s.failed) and phase == "Running",
            "Running" if phase == "Running" else phase,
            message,
        ),
        SUCCEEDED: (phase == "Succeeded", reason if phase == "Succeeded" else "NotFinished", message if phase == "Succeeded" else ""),
        FAILED: (phase == "Failed", reason if phase == "Failed" else "NoFailure", message if phase == "Failed" else ""),
        SUSPENDED: (phase == "Suspended", "Suspended" if phase == "Suspended" else "NotSuspended", ""),
    }
    unschedulable = [f"site {name}: {s.unschedulable}" for name, s in sorted(seen.sites.items()) if s.unschedulable]
    if seen.server_unschedulable:
        unschedulable.insert(0, f"server: {seen.server_unschedulable}")
    wanted[UNSCHEDULABLE] = (bool(unschedulable), "Unschedulable" if unschedulable else "Scheduled", "; ".join(unschedulable))
    failing = sorted(seen.failing.items(), key=lambda item: (item[0] != "server", item[0]))
    wanted[PODS_FAILING] = (
        bool(failing),
        failing[0][1][0] if failing else "NoFailingPods",
        "; ".join(f"{who}: {why}: {message}" if message else f"{who}: {why}" for who, (why, message) in failing),
    )
    # Written once the children are applied; `refused` makes it False when they could not be.
    wanted[RECONCILED] = (True, "Applied", "")
    status["conditions"] = [
        condition(previous.get("conditions", []), kind, is_true, why, text, generation, now)
        for kind, (is_true, why, text) in wanted.items()
    ]
    return status


def refused(job: Mapping, derived: Mapping, why: str, now: str) -> dict:
    """The status derived for the job, for when its children could not be applied: the
    Reconciled condition False with why, and observedGeneration still the last generation
    whose children were applied (absent if none was)."""
    previous = job.get("status", {})
    result = {k: v for k, v in derived.items() if k != "observedGeneration"}
    if "observedGeneration" in previous:
        result["observedGeneration"] = previous["observedGeneration"]
    generation = job["metadata"].get("generation", 0)
    failed = condition(previous.get("conditions", []), RECONCILED, False, "ApplyFailed", why[:1024], generation, now)
    result["conditions"] = [failed if c["type"] == RECONCILED else c for c in derived["conditions"]]
    return result


def _ended(previous: Mapping) -> tuple[str, str, str] | None:
    """A phase that is final, as recorded: Succeeded or Failed, with its reason and message.
    What made it so may be gone (the pods of a server that restarted past backoffLimit go
    when it is scaled down), and a verdict recomputed from what is left would take it back."""
    phase = previous.get("phase")
    if phase not in FINAL:
        return None
    recorded = next((c for c in previous.get("conditions", []) if c["type"] == phase and c["status"] == "True"), None)
    return (phase, recorded["reason"], recorded["message"]) if recorded else None


def _phase(spec: Mapping, seen: Observation) -> tuple[str, str, str]:
    """(phase, reason, message)."""
    failed = sorted(name for name, s in seen.sites.items() if s.failed)
    if seen.model:
        return "Succeeded", "TrainingComplete", f"the final model is written after {spec['rounds']} rounds"
    if (
        spec["mode"] == "SitesOnly"
        and seen.sites
        and all(s.succeeded or s.failed for s in seen.sites.values())
        and not too_few(spec, failed)
    ):
        if not failed:
            return "Succeeded", "SitesComplete", "every site finished its part of the run (the model is the remote server's)"
        done = len(seen.sites) - len(failed)
        return (
            "Succeeded",
            "SitesComplete",
            f"{done} of {len(seen.sites)} sites finished their part of the run, site {', '.join(failed)} failed (the model is the remote server's)",
        )
    if seen.deadline_exceeded:
        return (
            "Failed",
            "DeadlineExceeded",
            f"the job ran longer than runPolicy.activeDeadlineSeconds ({spec['runPolicy'].get('activeDeadlineSeconds')}s)",
        )
    if seen.failure:
        return "Failed", "TrainingFailed", seen.failure
    if too_few(spec, failed):
        why = "".join(f"; site {name}: {seen.sites[name].error}" for name in failed if seen.sites[name].error)
        left = len(spec["sites"]) - len(failed)
        return (
            "Failed",
            "SiteFailed",
            f"site {', '.join(failed)} failed more than runPolicy.backoffLimit times, leaving {left} of {len(spec['sites'])} sites, "
            f"fewer than {min_sites_rule(spec)}{why}",
        )
    if spec["runPolicy"]["suspend"]:
        return "Suspended", "Suspended", "runPolicy.suspend is true"
    if spec["mode"] == "SitesOnly":
        # The server is another cluster's: the job runs (and its deadline counts) once a site does.
        if any(s.active for s in seen.sites.values()):
            return "Running", "Running", f"{sum(1 for s in seen.sites.values() if s.active)} of {len(seen.sites)} sites running"
        return "Pending", "Pending", "waiting for a site's pod to run"
    if seen.server_ready:
        return "Running", "Running", f"{seen.current_round} of {spec['rounds']} rounds done"
    return "Pending", "Pending", f"waiting for the server{': ' + seen.server_waits_for if seen.server_waits_for else ''}"


def min_sites(spec: Mapping) -> int:
    """strategy.minSites: the fewest sites a round goes ahead with (default: every site)."""
    return spec["strategy"].get("minSites", len(spec["sites"]))


def min_sites_rule(spec: Mapping) -> str:
    default = "" if "minSites" in spec["strategy"] else ", the default: every site"
    return f"strategy.minSites ({min_sites(spec)}{default})"


def too_few(spec: Mapping, failed: list[str]) -> bool:
    """Whether the sites that failed for good leave fewer than a round needs: until then the
    run goes on without them (the server's rounds need only strategy.minSites sites)."""
    return bool(failed) and len(spec["sites"]) - len(failed) < min_sites(spec)


def _site_status(name: str, site: Site, refused_runs: int = 0) -> dict:
    entry = _site_state(name, site)
    if refused_runs:
        entry["refusedRuns"] = refused_runs
    return entry


def _site_state(name: str, site: Site) -> dict:
    if site.succeeded:
        return {"name": name, "state": "Succeeded"}
    if site.failed:
        why = f": {site.error}" if site.error else ""
        return {"name": name, "state": "Failed", "message": f"failed more than runPolicy.backoffLimit times{why}"}
    if site.unschedulable:
        return {"name": name, "state": "Pending", "message": site.unschedulable}
    if site.active:
        return {"name": name, "state": "Running"}
    return {"name": name, "state": "Pending", **({"message": f"its last attempt stopped: {site.error}"} if site.error else {})}


REMOVED = "removed from spec.sites: its Job and key are deleted, and the server no longer admits it"


def _removed(spec: Mapping, previous: Mapping) -> list[dict]:
    """The sites the job had and has no more (consent withdrawn): kept in the status, as
    Removed, for as long as the job lives; a site named again is the job's again."""
    named = {s["name"] for s in spec["sites"]}
    return [{"name": s["name"], "state": "Removed", "message": REMOVED} for s in previous.get("sites", []) if s["name"] not in named]


def condition(existing: list[Mapping], kind: str, is_true: bool, reason: str, message: str, generation: int, now: str) -> dict:
    """A metav1.Condition; its lastTransitionTime changes only when its status does."""
    status = "True" if is_true else "False"
    before = next((c for c in existing if c.get("type") == kind), None)
    moved = before is None or before.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if moved else before["lastTransitionTime"],
    }
