"""What a job's children say: its site Jobs and pods, its server's Deployment and the
progress its server reports, read into a status.Observation (status.derive turns it into the
job's status). Reads only; the times a reconcile waits for (deadline, time to live) too."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from . import kube, render, status
from .render import JOB_LABEL, names


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(moment: datetime) -> str:
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


def site_jobs(client: kube.Client, job: Mapping) -> dict[str, dict]:
    """The job's site Jobs by name (none in mode ServerOnly, which has no sites here)."""
    if job["spec"]["mode"] == "ServerOnly":
        return {}
    selector = f"{JOB_LABEL}={job['metadata']['name']},app.kubernetes.io/component=site"
    return {j["metadata"]["name"]: j for j in client.list("batch/v1", "Job", job["metadata"]["namespace"], selector)}


def finished(site_job: Mapping) -> bool:
    """A site Job that has completed or failed: a record, left as it is."""
    return _condition(site_job, "Complete") is not None or _condition(site_job, "Failed") is not None


def observe(client: kube.Client, job: Mapping, site_jobs: Mapping[str, dict], now: datetime) -> status.Observation:
    """What the job's children (its site Jobs as listed by site_jobs) and its server's
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
    remaining = deadline_remaining(job, now)
    return remaining is not None and remaining <= 0 and previous.get("phase") != "Succeeded"


def deadline_remaining(job: Mapping, now: datetime) -> float | None:
    deadline = job["spec"]["runPolicy"].get("activeDeadlineSeconds")
    start = job.get("status", {}).get("startTime")
    if deadline is None or not start:
        return None
    return (_parse(start) + timedelta(seconds=deadline) - now).total_seconds()


def ttl_remaining(ttl: int | None, job_status: Mapping, now: datetime) -> float | None:
    """Seconds until runPolicy.ttlSecondsAfterFinished deletes a finished job; None for a job
    not finished, or without a time to live."""
    if ttl is None or job_status.get("phase") not in status.FINAL or not job_status.get("completionTime"):
        return None
    return (_parse(job_status["completionTime"]) + timedelta(seconds=ttl) - now).total_seconds()
