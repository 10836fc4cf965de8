"""The job's status as a pure function of observations."""

from __future__ import annotations

from pathlib import Path

import pytest

from bouquet import jobfile
from bouquet.status import Observation, Site, condition, derive, refused, remote_sites

ROOT = Path(__file__).resolve().parents[1]
T0, T1 = "2026-11-22T10:00:00Z", "2026-11-22T10:05:00Z"


@pytest.fixture
def job():
    job = jobfile.load(ROOT / "examples" / "breast-cancer.yaml")
    job["metadata"]["generation"] = 2
    return job


def conditions(status) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def running(**changes) -> Observation:
    sites = {name: Site(active=1) for name in ("hospital-a", "hospital-b", "hospital-c")}
    return Observation(**{"server_ready": True, "sites": sites, "current_round": 3, "metrics": {"accuracy": 0.95}, **changes})


def test_a_new_job_is_pending(job):
    status = derive(job, Observation(), T0)
    assert status["phase"] == "Pending" and status["round"] == "0/10" and "startTime" not in status
    assert conditions(status) == {
        "Ready": "False",
        "Succeeded": "False",
        "Failed": "False",
        "Suspended": "False",
        "Unschedulable": "False",
        "PodsFailing": "False",
        "Reconciled": "True",
    }


def test_a_running_job_reports_rounds_sites_and_metrics(job):
    status = derive(job, running(), T0)
    assert status["phase"] == "Running" and status["round"] == "3/10" and status["sitesReady"] == 3
    assert status["metrics"] == {"accuracy": 0.95} and status["startTime"] == T0
    assert conditions(status)["Ready"] == "True"
    assert status["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_the_columns_and_the_ready_condition_agree(job):
    status = derive(job, running(round_sites=2, metrics={"accuracy": 0.9736841917037964, "loss": 0.04944}), T0)
    assert status["metrics"] == {"accuracy": 0.9737, "loss": 0.0494}  # as kubectl get fj shows it
    assert status["roundSites"] == 2  # SITES: the sites that took part in the last round
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "3 of 10 rounds done" and status["round"] == "3/10"
    assert "roundSites" not in derive(job, Observation(), T0)  # before round 1 nobody has taken part


def test_success_sets_the_condition_kubectl_wait_looks_for(job):
    model = {"claimName": "breast-cancer-output", "path": "model.safetensors", "sha256": "ab" * 32, "sizeBytes": 100}
    status = derive(job, running(current_round=10, model=model), T1)
    assert status["phase"] == "Succeeded" and status["model"] == model and status["completionTime"] == T1
    assert conditions(status)["Succeeded"] == "True" and conditions(status)["Ready"] == "False"


def test_transition_times_move_only_when_a_condition_changes(job):
    first = derive(job, running(), T0)
    job["status"] = first
    again = derive(job, running(current_round=4), T1)
    assert [c["lastTransitionTime"] for c in again["conditions"]] == [T0] * 7
    job["status"] = again
    done = derive(job, running(current_round=10, model={"path": "model.safetensors"}), T1)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Succeeded"] == T1 and times["Ready"] == T1 and times["Failed"] == T0
    assert done["startTime"] == T0


def test_an_unschedulable_site_is_a_condition_with_the_schedulers_reason(job):
    sites = {"hospital-a": Site(unschedulable="0/2 nodes are available: 2 Insufficient nvidia.com/gpu."), "hospital-b": Site(active=1)}
    status = derive(job, Observation(server_ready=True, sites=sites), T0)
    [unschedulable] = [c for c in status["conditions"] if c["type"] == "Unschedulable"]
    assert unschedulable["status"] == "True" and "Insufficient nvidia.com/gpu" in unschedulable["message"]
    assert status["sites"][0] == {
        "name": "hospital-a",
        "state": "Pending",
        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
    }


def test_suspend_deadline_and_failures(job):
    job["spec"]["runPolicy"]["suspend"] = True
    assert derive(job, running(), T0)["phase"] == "Suspended"
    job["spec"]["runPolicy"]["suspend"] = False
    late = derive(job, running(deadline_exceeded=True), T0)
    assert late["phase"] == "Failed" and {c["type"]: c["reason"] for c in late["conditions"]}["Failed"] == "DeadlineExceeded"
    broken = derive(job, running(sites={"hospital-a": Site(failed=True)}), T0)
    assert broken["phase"] == "Failed" and "hospital-a" in next(c["message"] for c in broken["conditions"] if c["type"] == "Failed")


def test_condition_keeps_its_time_when_unchanged():
    before = [{"type": "Ready", "status": "True", "lastTransitionTime": T0}]
    assert condition(before, "Ready", True, "Running", "", 1, T1)["lastTransitionTime"] == T0
    assert condition(before, "Ready", False, "Pending", "", 1, T1)["lastTransitionTime"] == T1


def test_a_site_taken_out_of_the_spec_stays_in_the_status_as_removed_until_named_again(job):
    before = derive(job, running(), T0)
    job["status"] = before
    removed = job["spec"]["sites"].pop(2)
    after = derive(job, running(sites={"hospital-a": Site(active=1), "hospital-b": Site(active=1)}), T1)
    assert [(s["name"], s["state"]) for s in after["sites"]] == [
        ("hospital-a", "Running"),
        ("hospital-b", "Running"),
        ("hospital-c", "Removed"),
    ]
    assert "its Job and key are deleted" in after["sites"][2]["message"]
    assert after["sitesReady"] == 2 and conditions(after)["Ready"] == "True", "the job goes on with the sites it has"
    job["status"] = after
    assert derive(job, running(sites={"hospital-a": Site(active=1), "hospital-b": Site(active=1)}), T1)["sites"] == after["sites"]
    job["spec"]["sites"].append(removed)
    job["status"] = after
    again = derive(job, running(), T1)
    assert [(s["name"], s["state"]) for s in again["sites"]] == [
        ("hospital-a", "Running"),
        ("hospital-b", "Running"),
        ("hospital-c", "Running"),
    ]


def test_a_site_refused_by_the_server_says_why_while_it_retries_and_once_it_has_failed(job):
    why = "the server does not admit site hospital-c's key (public key sha256 0123456789abcdef...): it is not a key the job registered"
    retrying = derive(job, running(sites={"hospital-a": Site(active=1), "hospital-b": Site(active=1), "hospital-c": Site(error=why)}), T0)
    assert retrying["sites"][2] == {"name": "hospital-c", "state": "Pending", "message": f"its last attempt stopped: {why}"}
    assert conditions(retrying)["Ready"] == "False"
    failed = derive(
        job, running(sites={"hospital-a": Site(active=1), "hospital-b": Site(active=1), "hospital-c": Site(failed=True, error=why)}), T0
    )
    assert failed["phase"] == "Failed" and failed["sites"][2]["message"] == f"failed more than runPolicy.backoffLimit times: {why}"
    assert next(c for c in failed["conditions"] if c["type"] == "Failed")["message"].endswith(f"; site hospital-c: {why}")
    # A site running again has put its last stop behind it.
    assert derive(job, running(sites={n: Site(active=1, error=why) for n in ("hospital-a", "hospital-b", "hospital-c")}), T0)["sites"][
        2
    ] == {
        "name": "hospital-c",
        "state": "Running",
    }


def test_a_final_phase_stays_final_whatever_is_observed_afterwards(job):
    """A server that restarted past backoffLimit fails the job; scaled to 0, its pods and their
    restarts are gone, and the observation reads as a job waiting for its server. The job stays
    Failed, for the reason recorded; a job that succeeded stays Succeeded."""
    why = "the server restarted 4 times, more than runPolicy.backoffLimit (3)"
    failed = derive(job, running(failure=why), T0)
    assert failed["phase"] == "Failed"
    job["status"] = failed
    for later in (Observation(), running(), running(current_round=10, model={"path": "model.safetensors"})):
        again = derive(job, later, T1)
        assert again["phase"] == "Failed", later
        [kept] = [c for c in again["conditions"] if c["type"] == "Failed"]
        assert (kept["status"], kept["reason"], kept["message"], kept["lastTransitionTime"]) == ("True", "TrainingFailed", why, T0)
        assert again["completionTime"] == failed["completionTime"]
    del job["status"]  # another job, which succeeded
    done = derive(job, running(current_round=10, model={"path": "model.safetensors"}), T0)
    job["status"] = done
    assert derive(job, Observation(), T1)["phase"] == "Succeeded"
    assert derive(job, running(failure="training failed", deadline_exceeded=True), T1)["phase"] == "Succeeded"


def test_a_sites_only_job_runs_once_a_site_does():
    """Its server is another cluster's, so only its sites say it runs: before any site pod
    runs it is Pending, with no start time for runPolicy.activeDeadlineSeconds to count from."""
    job = jobfile.load(ROOT / "examples" / "multi-cluster" / "hospital-a.yaml")
    [site] = [s["name"] for s in job["spec"]["sites"]]
    waiting = derive(job, Observation(server_ready=True, sites={site: Site()}), T0)
    assert (waiting["phase"], "startTime" in waiting) == ("Pending", False)
    assert next(c for c in waiting["conditions"] if c["type"] == "Ready")["message"] == "waiting for a site's pod to run"
    running = derive(job, Observation(server_ready=True, sites={site: Site(active=1)}), T0)
    assert (running["phase"], running["startTime"], conditions(running)["Ready"]) == ("Running", T0, "True")


def test_a_spec_whose_children_could_not_be_applied_is_not_claimed_as_observed(job):
    """Generation 2 was applied; generation 3's children are refused: the status keeps
    observedGeneration 2 and says why in its Reconciled condition, until they are applied."""
    job["status"] = derive(job, running(), T0)
    job["metadata"]["generation"] = 3
    why = "Secret breast-cancer-tls exists and is not this job's"
    held = refused(job, derive(job, running(), T1), why, T1)
    assert held["observedGeneration"] == 2
    [reconciled] = [c for c in held["conditions"] if c["type"] == "Reconciled"]
    assert (reconciled["status"], reconciled["reason"], reconciled["message"], reconciled["lastTransitionTime"]) == (
        "False",
        "ApplyFailed",
        why,
        T1,
    )
    job["status"] = held
    applied = derive(job, running(), T1)
    assert applied["observedGeneration"] == 3 and conditions(applied)["Reconciled"] == "True"
    del job["status"]
    assert "observedGeneration" not in refused(job, derive(job, Observation(), T0), why, T0), "no generation was applied yet"


def test_a_server_only_jobs_sites_are_what_its_server_reports_of_them():
    """The sites of a ServerOnly job run in other clusters: the server's report of the last
    round says which take part. Ready only once every site does, and after success those of
    the final round have succeeded; none reads Running before it took part."""
    job = jobfile.load(ROOT / "examples" / "multi-cluster" / "aggregator.yaml")
    spec, names = job["spec"], [s["name"] for s in job["spec"]["sites"]]
    assert len(names) >= 2

    def status_for(progress: dict) -> dict:
        return derive(job, Observation(server_ready=True, sites=remote_sites(spec, progress), current_round=progress.get("round", 0)), T0)

    waiting = status_for({})
    assert [s["state"] for s in waiting["sites"]] == ["Pending"] * len(names) and conditions(waiting)["Ready"] == "False"
    all_in = status_for({"state": "Running", "round": 3, "takingPart": names})
    assert [s["state"] for s in all_in["sites"]] == ["Running"] * len(names) and conditions(all_in)["Ready"] == "True"
    assert all_in["sitesReady"] == len(names)
    one_out = status_for({"state": "Running", "round": 4, "takingPart": names[1:]})
    assert [s["state"] for s in one_out["sites"]] == ["Pending"] + ["Running"] * (len(names) - 1)
    assert conditions(one_out)["Ready"] == "False"
    done = derive(
        job,
        Observation(
            server_ready=True,
            sites=remote_sites(spec, {"state": "Succeeded", "round": 10, "takingPart": names}),
            current_round=10,
            model={"path": "model.safetensors"},
        ),
        T1,
    )
    assert done["phase"] == "Succeeded" and [s["state"] for s in done["sites"]] == ["Succeeded"] * len(names)


def test_a_pod_that_cannot_start_or_keeps_crashing_is_a_condition_with_kubernetes_reason(job):
    """The kubelet's reason and message for each part of the job whose pod is stuck: the
    server's first, then the sites' by name."""
    pull = ("ImagePullBackOff", 'Back-off pulling image "registry.example/bouquet-workloads:9.9"')
    status = derive(
        job, running(failing={"site hospital-b": ("CrashLoopBackOff", "back-off 40s restarting failed container"), "server": pull}), T0
    )
    [failing] = [c for c in status["conditions"] if c["type"] == "PodsFailing"]
    assert (failing["status"], failing["reason"]) == ("True", "ImagePullBackOff")
    assert failing["message"] == (
        'server: ImagePullBackOff: Back-off pulling image "registry.example/bouquet-workloads:9.9"; '
        "site hospital-b: CrashLoopBackOff: back-off 40s restarting failed container"
    )
    assert conditions(derive(job, running(), T0))["PodsFailing"] == "False"


def test_a_site_failed_for_good_ends_the_job_only_once_fewer_than_min_sites_are_left(job):
    job["spec"]["strategy"]["minSites"] = 2
    one = {"hospital-a": Site(active=1), "hospital-b": Site(active=1), "hospital-c": Site(failed=True)}
    going_on = derive(job, running(sites=one), T0)
    assert going_on["phase"] == "Running"
    assert going_on["sites"][2] == {"name": "hospital-c", "state": "Failed", "message": "failed more than runPolicy.backoffLimit times"}
    assert conditions(going_on)["Ready"] == "True", "every site that has not failed runs"
    assert derive(job, running(sites=one, model={"sha256": "ab"}), T0)["phase"] == "Succeeded"

    two = {**one, "hospital-b": Site(failed=True)}
    ended = derive(job, running(sites=two), T0)
    failed = next(c for c in ended["conditions"] if c["type"] == "Failed")
    assert (ended["phase"], failed["reason"]) == ("Failed", "SiteFailed")
    assert failed["message"] == (
        "site hospital-b, hospital-c failed more than runPolicy.backoffLimit times, leaving 1 of 3 sites, fewer than strategy.minSites (2)"
    )
    del job["spec"]["strategy"]["minSites"]
    assert next(c for c in derive(job, running(sites=one), T0)["conditions"] if c["type"] == "Failed")["message"] == (
        "site hospital-c failed more than runPolicy.backoffLimit times, leaving 2 of 3 sites, fewer than strategy.minSites (3, the default: every site)"
    )


def test_a_sites_only_job_succeeds_once_its_sites_are_done_but_those_failed_while_enough_are_left(job):
    job["spec"]["mode"] = "SitesOnly"
    job["spec"]["strategy"]["minSites"] = 2
    sites = {"hospital-a": Site(succeeded=True), "hospital-b": Site(active=1), "hospital-c": Site(failed=True)}
    assert derive(job, Observation(sites=sites), T0)["phase"] == "Running"
    done = derive(job, Observation(sites={**sites, "hospital-b": Site(succeeded=True)}), T0)
    assert done["phase"] == "Succeeded"
    assert next(c for c in done["conditions"] if c["type"] == "Succeeded")["message"] == (
        "2 of 3 sites finished their part of the run, site hospital-c failed (the model is the remote server's)"
    )
