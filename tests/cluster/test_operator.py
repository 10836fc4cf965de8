"""The operator against a real control plane: the API server, its garbage collector, the
Deployment, ReplicaSet and Job controllers and the scheduler are Kubernetes' own; only the
kubelet's reports come from support.kubelet, and the training's progress is reported the
way the server pod reports it (bouquet_workloads.progress.apply, as the server's service account)."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from bouquet import identity, keep, kubeyaml, reconcile, schema, tls
from bouquet import render as render_module
from bouquet.render import CHILD_KINDS, Settings, render
from bouquet_workloads import progress
from support.cluster import ROOT, apply_job, condition, event_reasons, get_job, kubectl
from support.dashboards import empty_panels
from support.kubelet import wait_for
from support.prometheus import Prometheus

EXAMPLES = {
    "breast-cancer": ROOT / "examples" / "breast-cancer.yaml",
    "sleep-quality": ROOT / "examples" / "sleep-quality.yaml",
    "server-only": ROOT / "examples" / "multi-cluster" / "aggregator.yaml",
    "sites-only": ROOT / "examples" / "multi-cluster" / "hospital-a.yaml",
}


def children(client, namespace: str, name: str) -> dict[tuple[str, str], dict]:
    """Every object labelled as the job's, by (kind, name)."""
    found = {}
    for api_version, kind in CHILD_KINDS:
        for obj in client.list(api_version, kind, namespace, f"bouquet.dev/job={name}"):
            found[(kind, obj["metadata"]["name"])] = obj
    return found


def contains(live, wanted, path="") -> list[str]:
    """Where live differs from wanted, ignoring what the API server added (defaults)."""
    if isinstance(wanted, dict):
        if not isinstance(live, dict):
            return [f"{path}: {live!r} is not a mapping"]
        return [d for k, v in wanted.items() for d in (contains(live[k], v, f"{path}.{k}") if k in live else [f"{path}.{k}: missing"])]
    if isinstance(wanted, list):
        if not isinstance(live, list) or len(live) != len(wanted):
            return [f"{path}: {live!r} != {wanted!r}"]
        return [d for i, (a, b) in enumerate(zip(live, wanted, strict=True)) for d in contains(a, b, f"{path}[{i}]")]
    return [] if str(live) == str(wanted) else [f"{path}: {live!r} != {wanted!r}"]


def expected_children(client, job: dict) -> list[dict] | None:
    """What render gives for the live job, with the TLS material the operator stored."""
    bundle = None
    secret = client.get("v1", "Secret", job["metadata"]["namespace"], f"{job['metadata']['name']}-tls")
    if secret is None and job["spec"]["mode"] != "SitesOnly":
        return None  # not yet created
    if secret:
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        bundle = tls.Bundle(data["ca.crt"], data["tls.crt"], data["tls.key"])
    site_keys = None
    if render_module.makes_site_keys(job):
        first = render_module.site_key_secret_name(job, job["spec"]["sites"][0]["name"])
        if client.get("v1", "Secret", job["metadata"]["namespace"], first) is None:
            return None  # not yet created
        site_keys = {}
        for site in job["spec"]["sites"]:
            secret = client.get("v1", "Secret", job["metadata"]["namespace"], render_module.site_key_secret_name(job, site["name"]))
            if secret is None:
                return None
            data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
            site_keys[site["name"]] = identity.SiteKey(data[identity.PRIVATE], data[identity.PUBLIC])
    # Where the API server listens (its `kubernetes` Service's endpoints), as the operator
    # reads it for the jobs' NetworkPolicies; this control plane runs no DNS.
    api_server = reconcile._network(client, "default", "kubernetes")
    assert api_server is not None
    return render(job, Settings("bouquet-workloads:0.1.0", bundle, site_keys, api_server=api_server))


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_an_example_gets_every_child_as_rendered_with_owner_references(example, cluster, client, namespace, operator):
    job = apply_job(cluster, namespace, EXAMPLES[example])
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]
    wanted = expected_children(client, job) if job["spec"]["mode"] == "SitesOnly" else None

    def all_there():
        nonlocal wanted
        wanted = expected_children(client, get_job(client, namespace, name))
        if wanted is None:
            return None
        live = children(client, namespace, name)
        return live if {(c["kind"], c["metadata"]["name"]) for c in wanted} <= set(live) else None

    live = wait_for(all_there, what=f"every child of {example}")
    assert set(live) == {(c["kind"], c["metadata"]["name"]) for c in wanted}, "no child more than render's"
    for child in wanted:
        obj = live[(child["kind"], child["metadata"]["name"])]
        # The status may have moved on since `wanted` was rendered; the spec has not.
        rendered = {k: v for k, v in child.items() if k not in ("apiVersion", "kind")}  # a list's items lack them
        assert contains(obj, rendered) == [], (child["kind"], contains(obj, rendered))
        owners = obj["metadata"].get("ownerReferences", [])
        if child["kind"] == "PersistentVolumeClaim":
            assert owners == [], "the output claim is retained (reclaimPolicy Retain): no owner"
        else:
            assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [("FederatedJob", name, uid, True)]
    kinds = {kind for kind, _ in live}
    if example == "server-only":
        assert "Job" not in kinds and live[("Service", f"{name}-server")]["spec"]["type"] == job["spec"]["server"]["serviceType"]
    if example == "sites-only":
        assert kinds == {"Secret", "ConfigMap", "NetworkPolicy", "Job"}, (
            "the sites' keys, their public halves, the job, their policy, the site Jobs"
        )
        volume = live[("Job", f"{name}--{job['spec']['sites'][0]['name']}")]["spec"]["template"]["spec"]["volumes"]
        assert {
            "name": "tls",
            "secret": {
                "secretName": job["spec"]["remoteServer"]["caSecretName"],
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                "defaultMode": 420,
            },
        } in volume

    table = kubectl(cluster, "get", "fj", "-n", namespace).stdout
    assert re.split(r"\s+", table.splitlines()[0].strip()) == ["NAME", "PHASE", "ROUND", "SITES", "ACCURACY", "AGE"], table
    assert re.match(rf"{name}\s+(Pending|Running)\s+0/{job['spec']['rounds']}\s+\d", table.splitlines()[1]), table


def start_and_run(cluster, client, namespace, path_or_job) -> dict:
    """Applies a job and waits until the operator has it Running and Ready: the nodes
    started its server and every site."""
    job = apply_job(cluster, namespace, path_or_job)
    name = job["metadata"]["name"]
    return wait_for(
        lambda: (
            (j := get_job(client, namespace, name))
            and j.get("status", {}).get("phase") == "Running"
            and condition(j, "Ready").get("status") == "True"
            and j
        ),
        timeout=60,
        what=f"{name} to be Running",
    )


def test_status_follows_the_servers_reports_to_succeeded(cluster, client, namespace, operator, kubelet, server_identity, tmp_path):
    # The writes at rest are counted below: first the jobs of the tests before, whose
    # namespaces are going, go.
    wait_for(
        lambda: not client.request("GET", "/apis/bouquet.dev/v1alpha1/federatedjobs")["items"],
        timeout=120,
        what="no job of an earlier test left",
    )

    def writes() -> float:
        found = re.findall(r'bouquet_api_requests_total\{dry_run="false",method="(?:PATCH|POST|DELETE)"\} (\S+)', operator.metrics())
        assert len(found) == 3, "the operator counts its writes"
        return sum(float(v) for v in found)

    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{operator.port}"])
    job = start_and_run(cluster, client, namespace, EXAMPLES["breast-cancer"])
    name, rounds = job["metadata"]["name"], job["spec"]["rounds"]
    assert condition(job, "Ready")["status"] == "True" and job["status"]["sitesReady"] == 3
    assert [s["state"] for s in job["status"]["sites"]] == ["Running"] * 3
    server = server_identity(namespace, name)

    for round_ in range(1, rounds + 1):
        metrics = {"loss": 0.5 / round_, "accuracy": 0.9 + round_ / 200 + 0.0006841917037964}
        progress.apply(server, namespace, name, {"state": "Running", "round": round_, "sites": 3, "metrics": metrics})
        seen = wait_for(
            lambda r=round_: (j := get_job(client, namespace, name))["status"].get("currentRound") == r and j, what=f"round {round_}"
        )
        assert seen["status"]["round"] == f"{round_}/{rounds}" and seen["status"]["progress"]["metrics"] == metrics
        assert seen["status"]["metrics"] == {k: round(v, 4) for k, v in metrics.items()}
        # The Ready condition and the ROUND column say the same thing.
        assert condition(seen, "Ready")["message"] == f"{round_} of {rounds} rounds done"
        if round_ == 3:
            row = kubectl(cluster, "get", "fj", name, "-n", namespace, "--no-headers").stdout.split()
            assert row[1:5] == ["Running", f"3/{rounds}", "3", "0.9157"], row
            # A running job at rest costs no writes either: each resync (every 2 s here)
            # finds its children as rendered, and applies nothing.
            time.sleep(3)
            before = writes()
            time.sleep(7)
            assert writes() == before, "a resync of a running job with nothing changed wrote"

    model = {"path": "/model.safetensors", "sizeBytes": 12345, "sha256": "ab" * 32}
    progress.apply(server, namespace, name, {"state": "Succeeded", "round": rounds, "sites": 3, "metrics": metrics, "model": model})
    done = kubectl(cluster, "wait", "--for=condition=Succeeded", f"fj/{name}", "-n", namespace, "--timeout=30s", check=False)
    assert done.returncode == 0, done.stderr
    job = get_job(client, namespace, name)
    assert job["status"]["phase"] == "Succeeded" and job["status"]["model"] == {"claimName": f"{name}-output", **model}
    assert job["status"]["completionTime"] >= job["status"]["startTime"]
    assert condition(job, "Ready")["status"] == "False" and condition(job, "Failed")["status"] == "False"
    # After success the server scales to zero; the sites end (their SuperNodes exit 0) and
    # their Jobs complete; the claim stays.
    wait_for(
        lambda: client.get("apps/v1", "Deployment", namespace, f"{name}-server")["spec"]["replicas"] == 0, what="the server at 0 replicas"
    )
    wait_for(
        lambda: not client.list("v1", "Pod", namespace, f"bouquet.dev/job={name},app.kubernetes.io/component=server"), what="no server pod"
    )
    assert kubelet.finish(namespace, f"bouquet.dev/job={name},app.kubernetes.io/component=site") == 3
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        wait_for(
            lambda s=site: condition(client.get("batch/v1", "Job", namespace, f"{name}--{s}"), "Complete").get("status") == "True",
            what=f"Job {name}--{site} Complete",
        )
    job = wait_for(
        lambda: (j := get_job(client, namespace, name)) and all(s["state"] == "Succeeded" for s in j["status"]["sites"]) and j,
        what="sites Succeeded",
    )
    assert job["status"]["phase"] == "Succeeded"
    assert client.get("v1", "PersistentVolumeClaim", namespace, f"{name}-output") is not None

    reasons = event_reasons(cluster, namespace, name)
    assert {"Pending", "Running", "TrainingComplete"} <= set(reasons), reasons
    messages = kubectl(
        cluster, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "jsonpath={.items[*].message}"
    ).stdout
    assert "phase Pending" in messages and "none" not in messages, messages
    # Once done, SITES still says how many sites took part in the last round.
    row = kubectl(cluster, "get", "fj", name, "-n", namespace, "--no-headers").stdout.split()
    assert row[1:5] == ["Succeeded", f"{rounds}/{rounds}", "3", "0.9507"], row
    metrics_text = operator.metrics()
    assert re.search(r'bouquet_reconcile_total\{controller="federatedjob",result="success"\} [1-9]', metrics_text), metrics_text
    assert 'bouquet_federatedjobs{phase="Succeeded"} 1.0' in metrics_text
    assert "bouquet_reconcile_time_seconds_bucket" in metrics_text
    assert re.search(r"^bouquet_workqueue_adds_total [1-9]", metrics_text, re.MULTILINE), metrics_text
    assert re.search(r"^bouquet_workqueue_queue_duration_seconds_count [1-9]", metrics_text, re.MULTILINE), metrics_text

    # At rest a finished job costs the API server no writes: resyncs (every 2 s here) apply
    # nothing.
    time.sleep(3)
    before = writes()
    time.sleep(7)
    assert writes() == before
    try:
        assert empty_panels(prometheus, "operator") == [], "every panel of the operator's dashboard has data"
        assert prometheus.value('bouquet_federatedjobs{phase="Succeeded"}') >= 1
    finally:
        prometheus.stop()


def test_the_servers_role_reaches_only_its_own_jobs_status(cluster, client, namespace, operator, server_identity):
    first = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    other = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    other["metadata"]["name"] = "another"
    apply_job(cluster, namespace, other)
    wait_for(
        lambda: client.get("rbac.authorization.k8s.io/v1", "RoleBinding", namespace, "breast-cancer-server"),
        what="the server's RoleBinding",
    )
    server = server_identity(namespace, first["metadata"]["name"])
    progress.apply(server, namespace, "breast-cancer", {"state": "Running", "round": 1})
    with pytest.raises(ApiException) as refused:
        progress.apply(server, namespace, "another", {"state": "Running", "round": 1})
    assert refused.value.status == 403
    with pytest.raises(ApiException) as refused:
        from kubernetes import client as k8s

        k8s.CustomObjectsApi(server).patch_namespaced_custom_object(
            "bouquet.dev", "v1alpha1", namespace, "federatedjobs", "breast-cancer", {"spec": {"rounds": 1}}
        )
    assert refused.value.status == 403, "the server may not change its job's spec"


def test_deleting_the_job_lets_the_garbage_collector_remove_all_but_the_claim(cluster, client, namespace, operator):
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    wait_for(lambda: len(children(client, namespace, name)) == 17, what="17 children")
    kubectl(cluster, "delete", "fj", name, "-n", namespace, "--wait=true", "--timeout=30s")
    left = wait_for(
        lambda: (c := children(client, namespace, name)) and set(c) == {("PersistentVolumeClaim", f"{name}-output")} and c,
        timeout=60,
        what="only the claim left",
    )
    assert left
    time.sleep(3)  # the operator must not bring anything back for a job that is gone
    assert set(children(client, namespace, name)) == {("PersistentVolumeClaim", f"{name}-output")}


def snapshot(client, namespace: str, name: str) -> dict:
    state = {(k, n): o["metadata"]["resourceVersion"] for (k, n), o in children(client, namespace, name).items()}
    state[("FederatedJob", name)] = get_job(client, namespace, name)["metadata"]["resourceVersion"]
    return state


def test_restarting_the_operator_mid_job_changes_nothing(cluster, client, namespace, operator, server_identity):
    job = start_and_run(cluster, client, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    progress.apply(server_identity(namespace, name), namespace, name, {"state": "Running", "round": 4, "metrics": {"accuracy": 0.9}})
    wait_for(lambda: get_job(client, namespace, name)["status"].get("currentRound") == 4, what="round 4 in the status")
    time.sleep(5)  # more than two resync periods: the state is settled
    before = snapshot(client, namespace, name)
    operator.stop()
    operator.start()
    time.sleep(6)  # the restarted operator has reconciled the job, more than once
    assert snapshot(client, namespace, name) == before
    assert re.search(r'bouquet_reconcile_total\{controller="federatedjob",result="success"\} [1-9]', operator.metrics())


def test_a_deleted_child_and_a_changed_spec_converge(cluster, client, namespace, operator, kubelet):
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    wait_for(lambda: len(children(client, namespace, name)) == 17, what="17 children")
    for kind, api_version in (("Deployment", "apps/v1"), ("ConfigMap", "v1"), ("Job", "batch/v1")):
        child = f"{name}-server" if kind == "Deployment" else f"{name}-job" if kind == "ConfigMap" else f"{name}--hospital-a"
        uid = client.get(api_version, kind, namespace, child)["metadata"]["uid"]
        client.delete(api_version, kind, namespace, child)
        wait_for(
            lambda a=api_version, k=kind, c=child, u=uid: (o := client.get(a, k, namespace, c)) and o["metadata"]["uid"] != u,
            what=f"{kind} {child} back",
        )
    site_uid = client.get("batch/v1", "Job", namespace, f"{name}--hospital-b")["metadata"]["uid"]
    # hospital-b's pod takes its time to stop (a SuperNode finishing its reply): until it has
    # stopped, no second Job, and so no second SuperNode, of hospital-b.
    site_pods = f"bouquet.dev/job={name},bouquet.dev/site=hospital-b"
    kubelet.lingering.add(f"{namespace}/{name}--hospital-b-")
    kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"rounds":12}}')
    try:
        wait_for(
            lambda: any(p["metadata"].get("deletionTimestamp") for p in client.list("v1", "Pod", namespace, site_pods)),
            what="hospital-b's pod told to stop",
        )
        for _ in range(4):
            time.sleep(0.5)
            assert [j["metadata"]["uid"] for j in client.list("batch/v1", "Job", namespace, site_pods)] in ([site_uid], []), (
                "a second Job of hospital-b while its old pod is still stopping"
            )
    finally:
        kubelet.lingering.clear()

    def updated():
        config = yaml.safe_load(client.get("v1", "ConfigMap", namespace, f"{name}-job")["data"]["job.yaml"])
        return config["spec"]["rounds"] == 12 and get_job(client, namespace, name)["status"].get("totalRounds") == 12

    wait_for(updated, what="the new spec in the ConfigMap and the status")
    # A Job's pod template cannot change: the site's Job is replaced by one with the new spec.
    wait_for(
        lambda: (j := client.get("batch/v1", "Job", namespace, f"{name}--hospital-b")) and j["metadata"]["uid"] != site_uid,
        timeout=30,
        what="the site's Job replaced",
    )
    live = children(client, namespace, name)
    assert len(live) == 17 and sum(1 for k, _ in live if k == "Job") == 3


def test_a_deleted_site_key_is_replaced_and_the_server_restarts_admitting_the_new_one(cluster, client, namespace, operator):
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    wait_for(lambda: len(children(client, namespace, name)) == 17, what="17 children")

    def public(site: str) -> str:
        return base64.b64decode(client.get("v1", "Secret", namespace, f"{name}--{site}-key")["data"]["site.pub"]).decode()

    def keys_hash() -> str:
        return client.get("apps/v1", "Deployment", namespace, f"{name}-server")["spec"]["template"]["metadata"]["annotations"][
            "bouquet.dev/site-keys-hash"
        ]

    before = {site: public(site) for site in ("hospital-a", "hospital-b", "hospital-c")}
    hash_before = keys_hash()
    assert len(set(before.values())) == 3
    client.delete("v1", "Secret", namespace, f"{name}--hospital-a-key")
    wait_for(
        lambda: (
            (s := client.get("v1", "Secret", namespace, f"{name}--hospital-a-key")) and public("hospital-a") != before["hospital-a"] and s
        ),
        what="a new key for hospital-a",
    )
    assert public("hospital-b") == before["hospital-b"] and public("hospital-c") == before["hospital-c"]
    wait_for(
        lambda: client.get("v1", "ConfigMap", namespace, f"{name}-site-keys")["data"]["hospital-a.pub"] == public("hospital-a"),
        what="the server's public keys updated",
    )
    wait_for(lambda: keys_hash() != hash_before, what="the server's pod template to change with the keys")


def test_an_object_of_a_childs_name_that_is_not_the_jobs_is_refused_not_taken_over(cluster, client, namespace, operator):
    """A ConfigMap the user made under the name of the job's ConfigMap holds the job up, with
    the reason in its status: it is neither overwritten nor adopted (owned, it would go with
    the job). Once it is gone, the job gets its own."""
    kubectl(cluster, "create", "configmap", "breast-cancer-job", "-n", namespace, "--from-literal=mine=yes")
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    held = wait_for(
        lambda: (j := get_job(client, namespace, name)) and condition(j, "Reconciled").get("status") == "False" and j, what="refused"
    )
    assert condition(held, "Reconciled")["message"] == (
        "ConfigMap breast-cancer-job exists and is not this job's (made by someone else): delete or rename it, or rename the job"
    )
    mine = client.get("v1", "ConfigMap", namespace, "breast-cancer-job")
    assert mine["data"] == {"mine": "yes"} and "ownerReferences" not in mine["metadata"], "left as it was"
    assert client.list("apps/v1", "Deployment", namespace, f"bouquet.dev/job={name}") == []
    client.delete("v1", "ConfigMap", namespace, "breast-cancer-job")
    wait_for(lambda: len(children(client, namespace, name)) == 17, what="17 children")
    assert condition(get_job(client, namespace, name), "Reconciled")["status"] == "True"

    # The job's own deleted and one of someone else's made in its place, between two looks
    # of the operator's: refused as well, not taken over.
    client.delete("v1", "ConfigMap", namespace, "breast-cancer-job")
    mine = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "breast-cancer-job", "namespace": namespace}}
    client.create({**mine, "data": {"mine": "again"}})  # at once: the operator looks every 2 s
    wait_for(
        lambda: condition(get_job(client, namespace, name), "Reconciled").get("status") == "False",
        what="refused at the next resync",
    )
    mine = client.get("v1", "ConfigMap", namespace, "breast-cancer-job")
    assert mine["data"] == {"mine": "again"} and "ownerReferences" not in mine["metadata"], "left as it was"


def test_two_jobs_whose_names_run_into_their_sites_names_share_no_child(cluster, client, namespace, operator, kubelet):
    """Job `a-b` with site `c` and job `a` with site `b-c` once both named a site Job (and key)
    `a-b-c`; `--` between job and site keeps them apart: both run, each with its own. A site
    Job and key of the earlier naming that a job still has are replaced by the new ones."""
    first = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    first["metadata"]["name"] = "a-b"
    first["spec"]["sites"] = [{"name": "c"}, {"name": "d"}]
    first = start_and_run(cluster, client, namespace, first)
    second = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    second["metadata"]["name"] = "a"
    second["spec"]["sites"] = [{"name": "b-c"}, {"name": "e"}]
    second = start_and_run(cluster, client, namespace, second)
    for job, site_job in ((first, "a-b--c"), (second, "a--b-c")):
        uid = job["metadata"]["uid"]
        for kind, name in (("batch/v1", "Job"), site_job), (("v1", "Secret"), f"{site_job}-key"):
            found = client.get(*kind, namespace, name)
            assert [o["uid"] for o in found["metadata"]["ownerReferences"]] == [uid], (name, found["metadata"])
        assert condition(get_job(client, namespace, job["metadata"]["name"]), "Reconciled")["status"] == "True"

    # A site Job named as before `--`, the job's own, as an earlier release of the operator
    # made it: deleted, and the site's Job is the new one.
    earlier = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "a-b-d",
            "namespace": namespace,
            "labels": {"bouquet.dev/job": "a-b", "app.kubernetes.io/component": "site", "bouquet.dev/site": "d"},
            "ownerReferences": [
                {
                    "apiVersion": "bouquet.dev/v1alpha1",
                    "kind": "FederatedJob",
                    "name": "a-b",
                    "uid": first["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "site", "image": "bouquet-workloads:0.1.0"}]}},
        },
    }
    kubectl(cluster, "create", "-f", "-", input=json.dumps(earlier))
    wait_for(lambda: client.get("batch/v1", "Job", namespace, "a-b-d") is None, what="the earlier naming's Job deleted")
    assert client.get("batch/v1", "Job", namespace, "a-b--d"), "the site's Job is the new one"
    assert "Pruned" in event_reasons(cluster, namespace, "a-b")


def test_the_jobs_keys_are_kept_in_the_operators_namespace_and_a_secret_it_did_not_make_is_refused(cluster, client, namespace, operator):
    """The job's private material is in its record, bouquet-job-<uid> in the operator's
    namespace; the Secrets the pods mount are copies of it. A Secret of a copy's name that
    the operator did not make holds the job up (it cannot tell what is in it, and does not
    adopt it); a copy the operator was making when it stopped is made again."""
    kubectl(cluster, "create", "secret", "generic", "breast-cancer-tls", "-n", namespace, "--from-literal=ca.crt=not-ours")
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]

    def messages() -> str:
        return kubectl(cluster, "get", "events", "-n", namespace, "-o", "jsonpath={.items[*].message}").stdout

    wait_for(lambda: "Secret breast-cancer-tls exists and is not this job's" in messages(), what="the job held up by the foreign Secret")
    assert client.list("apps/v1", "Deployment", namespace, f"bouquet.dev/job={name}") == []
    held = wait_for(lambda: (j := get_job(client, namespace, name)).get("status", {}).get("conditions") and j, what="a status")
    assert "observedGeneration" not in held["status"], "no generation of the job was applied"
    reconciled = condition(held, "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "ApplyFailed")
    assert "Secret breast-cancer-tls exists and is not this job's" in reconciled["message"]
    client.delete("v1", "Secret", namespace, "breast-cancer-tls")
    wait_for(lambda: len(children(client, namespace, name)) == 17, what="17 children")
    applied = wait_for(lambda: (j := get_job(client, namespace, name))["status"].get("observedGeneration") and j, what="observedGeneration")
    assert applied["status"]["observedGeneration"] == applied["metadata"]["generation"]
    assert condition(applied, "Reconciled")["status"] == "True"

    record = client.get("v1", "Secret", "bouquet-system", f"bouquet-job-{uid}")
    labels = record["metadata"]["labels"]
    assert (labels["bouquet.dev/job-namespace"], labels["bouquet.dev/job-name"], labels["bouquet.dev/job-uid"]) == (namespace, name, uid)
    data = {k: base64.b64decode(v) for k, v in record["data"].items()}
    copies = json.loads(data["copies.json"])
    live = {c: client.get("v1", "Secret", namespace, c) for c in copies}
    assert sorted(copies) == sorted([f"{name}-tls", *(f"{name}--{site}-key" for site in ("hospital-a", "hospital-b", "hospital-c"))])
    assert all(copies[c] == live[c]["metadata"]["uid"] for c in copies), "the record names each copy it made"
    tls_copy = {k: base64.b64decode(v) for k, v in live[f"{name}-tls"]["data"].items()}
    assert tls_copy == {k.removeprefix("tls."): v for k, v in data.items() if k.startswith("tls.")}
    key_copy = base64.b64decode(live[f"{name}--hospital-a-key"]["data"]["site.key"])
    assert key_copy == data["site.hospital-a.site.key"]

    # The operator stopped after noting that it was making hospital-a's copy, before making it.
    copies[f"{name}--hospital-a-key"] = ""
    patch = {"data": {"copies.json": base64.b64encode(json.dumps(copies).encode()).decode()}}
    client.request(
        "PATCH", f"/api/v1/namespaces/bouquet-system/secrets/bouquet-job-{uid}", body=patch, content_type="application/merge-patch+json"
    )
    old = live[f"{name}--hospital-a-key"]["metadata"]["uid"]
    remade = wait_for(
        lambda: (c := client.get("v1", "Secret", namespace, f"{name}--hospital-a-key")) and c["metadata"]["uid"] != old and c,
        what="hospital-a's copy made again",
    )
    assert base64.b64decode(remade["data"]["site.key"]) == data["site.hospital-a.site.key"], "from the same key"

    kubectl(cluster, "delete", "fj", name, "-n", namespace)
    wait_for(lambda: client.get("v1", "Secret", "bouquet-system", f"bouquet-job-{uid}") is None, what="the record gone with the job")


def test_a_record_owned_by_an_earlier_installs_account_is_no_longer_owned(cluster, client, namespace, operator):
    """An install that deleted the CRD on uninstall owned the records by its ServiceAccount;
    installed to keep the CRD (and so the jobs), the operator drops that owner, or uninstalling
    would delete the keys of jobs that stay."""
    kubectl(cluster, "create", "serviceaccount", "earlier-install", "-n", "bouquet-system", check=False)
    account = client.get("v1", "ServiceAccount", "bouquet-system", "earlier-install")
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = f"bouquet-job-{job['metadata']['uid']}"
    wait_for(
        lambda: get_job(client, namespace, job["metadata"]["name"]).get("status", {}).get("observedGeneration"), what="the job applied"
    )
    record = client.get("v1", "Secret", "bouquet-system", name)
    owner = {"apiVersion": "v1", "kind": "ServiceAccount", "name": "earlier-install", "uid": account["metadata"]["uid"]}
    # As the earlier operator saved it: the same field manager, with the owner.
    meta = record["metadata"]
    earlier = {"name": name, "namespace": "bouquet-system", "labels": meta["labels"], "ownerReferences": [owner]}
    saved = client.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": earlier, "type": "Opaque", "data": record["data"]}, keep.FIELD_MANAGER
    )
    assert saved["metadata"]["ownerReferences"] == [owner]
    wait_for(
        lambda: "ownerReferences" not in client.get("v1", "Secret", "bouquet-system", name)["metadata"],
        what="the record's owner dropped at the next reconcile",
    )
    assert client.get("v1", "Secret", "bouquet-system", name)["data"] == record["data"], "the keys are the same"


def test_removing_a_site_deletes_its_job_and_key_in_one_reconcile(cluster, client, namespace):
    """Consent withdrawn: one reconcile after hospital-c leaves spec.sites, its Job and key are
    gone, the server's public keys and pod template no longer have it, and the status and an
    Event say so. Reconciled by hand (no operator running), to count the reconciles."""
    job = apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    config, memory = reconcile.Config(), reconcile.Memory()
    reconcile.reconcile(client, config, namespace, name, memory, force=False)
    server = client.get("apps/v1", "Deployment", namespace, f"{name}-server")
    hash_before = server["spec"]["template"]["metadata"]["annotations"]["bouquet.dev/site-keys-hash"]
    assert client.get("batch/v1", "Job", namespace, f"{name}--hospital-c") and client.get(
        "v1", "Secret", namespace, f"{name}--hospital-c-key"
    )
    assert [s["name"] for s in get_job(client, namespace, name)["status"]["sites"]] == ["hospital-a", "hospital-b", "hospital-c"]
    key_a_before = client.get("v1", "Secret", namespace, f"{name}--hospital-a-key")
    old_jobs = {o["metadata"]["uid"] for (kind, _), o in children(client, namespace, name).items() if kind == "Job"}

    kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=json", "-p", '[{"op":"remove","path":"/spec/sites/2"}]')
    reconcile.reconcile(client, config, namespace, name, memory, force=False)

    assert client.get("batch/v1", "Job", namespace, f"{name}--hospital-c") is None
    assert client.get("v1", "Secret", namespace, f"{name}--hospital-c-key") is None
    key_a = client.get("v1", "Secret", namespace, f"{name}--hospital-a-key")
    assert key_a and key_a["metadata"]["uid"] == key_a_before["metadata"]["uid"] and key_a["data"] == key_a_before["data"]
    assert sorted(client.get("v1", "ConfigMap", namespace, f"{name}-site-keys")["data"]) == ["hospital-a.pub", "hospital-b.pub"]
    server = client.get("apps/v1", "Deployment", namespace, f"{name}-server")
    assert server["spec"]["template"]["metadata"]["annotations"]["bouquet.dev/site-keys-hash"] != hash_before
    sites = get_job(client, namespace, name)["status"]["sites"]
    assert [(s["name"], s["state"]) for s in sites] == [("hospital-a", "Pending"), ("hospital-b", "Pending"), ("hospital-c", "Removed")]
    assert "no longer admits it" in sites[2]["message"]
    events = json.loads(
        kubectl(cluster, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    )
    removed = [e["message"] for e in events["items"] if e["reason"] == "SiteRemoved"]
    assert removed == [
        f"site hospital-c was removed from spec.sites: deleted Job {name}--hospital-c and Secret {name}--hospital-c-key; "
        "the server no longer admits its key"
    ], removed

    # The withdrawal stays on record, and nothing more is deleted or announced. (The other
    # sites' Jobs were replaced, as for any change of spec: they restart, and the run goes on
    # from the server's checkpoint.)
    reconcile.reconcile(client, config, namespace, name, memory, force=True)
    assert get_job(client, namespace, name)["status"]["sites"][2]["state"] == "Removed"
    events = json.loads(
        kubectl(cluster, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    )
    assert [e["reason"] for e in events["items"]].count("SiteRemoved") == 1

    def replaced() -> bool:  # each once its old Job is gone, pods and all (the requeue does this)
        reconcile.reconcile(client, config, namespace, name, memory, force=False)
        jobs = {n: o for (kind, n), o in children(client, namespace, name).items() if kind == "Job"}
        return (
            sorted(jobs) == [f"{name}--hospital-a", f"{name}--hospital-b"] and not {o["metadata"]["uid"] for o in jobs.values()} & old_jobs
        )

    wait_for(replaced, interval=0.5, what="the other sites' Jobs replaced")


def test_an_aggregator_admits_the_public_keys_it_is_given_and_refuses_a_bad_one(cluster, client, namespace, operator):
    """Mode ServerOnly: the server mounts the ConfigMap security.siteKeys names; its pod
    template changes when the ConfigMap appears or changes (so the server restarts with the
    keys), and a ConfigMap holding something that is no public key is refused, naming it."""
    job = apply_job(cluster, namespace, EXAMPLES["server-only"])
    name = job["metadata"]["name"]

    def keys_hash() -> str | None:
        server = client.get("apps/v1", "Deployment", namespace, f"{name}-server")
        return server and server["spec"]["template"]["metadata"]["annotations"]["bouquet.dev/site-keys-hash"]

    absent = wait_for(keys_hash, what="the server Deployment")
    # The status is written once the children are applied: a moment after the Deployment.
    waiting = wait_for(lambda: condition(get_job(client, namespace, name), "Ready").get("message"), what="the Ready condition")
    assert (
        waiting
        == "waiting for the server: ConfigMap federation-site-keys (security.siteKeys.configMapName), the sites' public keys, does not exist yet"
    )
    server = client.get("apps/v1", "Deployment", namespace, f"{name}-server")["spec"]["template"]["spec"]
    assert {"name": "site-keys", "configMap": {"name": "federation-site-keys", "defaultMode": 420}} in server["volumes"]
    assert not [s for s in client.list("v1", "Secret", namespace, f"bouquet.dev/job={name}") if s["metadata"]["name"].endswith("-key")]
    keys = {f"{site}.pub": identity.make().public.decode() for site in ("hospital-a", "hospital-b")}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "federation-site-keys", "namespace": namespace},
        "data": keys,
    }
    client.create(config_map)
    given = wait_for(lambda: (h := keys_hash()) != absent and h, timeout=30, what="the server's template to take the keys")
    client.apply({**config_map, "data": {**keys, "hospital-b.pub": "ssh-rsa not-a-key"}}, "test")
    wait_for(
        lambda: any(
            e["reason"] == "ReconcileFailed"
            and "ConfigMap federation-site-keys, key hospital-b.pub: not an OpenSSH public key" in e["message"]
            for e in client.list("v1", "Event", namespace, "")
        ),
        timeout=30,
        what="the bad key refused, named",
    )
    assert keys_hash() == given, "nothing changed for a bad key"


def gpu_job() -> dict:
    job = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    job["metadata"]["name"] = "gpus"
    job["spec"]["sites"] = [{"name": "one-gpu", "gpus": 1}, {"name": "no-gpu"}, {"name": "four-gpus", "gpus": 4}]
    return job


def test_a_gpu_site_lands_on_the_gpu_node_and_too_many_gpus_is_unschedulable(cluster, client, namespace, operator):
    apply_job(cluster, namespace, gpu_job())

    def pod_of(site):
        pods = client.list("v1", "Pod", namespace, f"bouquet.dev/job=gpus,bouquet.dev/site={site}")
        return pods[0] if pods else None

    placed = wait_for(lambda: (p := pod_of("one-gpu")) and p["spec"].get("nodeName") and p, what="the one-GPU site's pod placed")
    assert placed["spec"]["nodeName"] == "gpu-node"
    assert placed["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = wait_for(
        lambda: (j := get_job(client, namespace, "gpus")) and condition(j, "Unschedulable").get("status") == "True" and j,
        what="Unschedulable",
    )
    message = condition(job, "Unschedulable")["message"]
    assert "site four-gpus:" in message and "Insufficient nvidia.com/gpu" in message, message
    assert "one-gpu" not in message and "no-gpu" not in message
    assert next(s for s in job["status"]["sites"] if s["name"] == "four-gpus")["state"] == "Pending"
    assert "Unschedulable" in event_reasons(cluster, namespace, "gpus")


def test_suspend_stops_every_pod_and_resume_starts_them_again(cluster, client, namespace, operator, server_identity):
    job = start_and_run(cluster, client, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    progress.apply(server_identity(namespace, name), namespace, name, {"state": "Running", "round": 2})
    kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    job = wait_for(lambda: (j := get_job(client, namespace, name))["status"]["phase"] == "Suspended" and j, what="Suspended")
    assert condition(job, "Suspended")["status"] == "True" and "startTime" not in job["status"]
    wait_for(lambda: not client.list("v1", "Pod", namespace, f"bouquet.dev/job={name}"), what="every pod of the job gone")
    assert client.get("apps/v1", "Deployment", namespace, f"{name}-server")["spec"]["replicas"] == 0
    assert all(j["spec"]["suspend"] for j in client.list("batch/v1", "Job", namespace, f"bouquet.dev/job={name}"))
    assert client.get("v1", "PersistentVolumeClaim", namespace, f"{name}-output"), "the checkpoints stay"

    kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    job = wait_for(lambda: (j := get_job(client, namespace, name))["status"]["phase"] == "Running" and j, timeout=60, what="Running again")
    assert job["status"]["currentRound"] == 2, "the progress so far is kept"
    assert condition(job, "Suspended")["status"] == "False"
    assert len(client.list("v1", "Pod", namespace, f"bouquet.dev/job={name}")) == 4


def test_the_deadline_fails_the_job_and_stops_its_pods(cluster, client, namespace, operator):
    job = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    job["metadata"]["name"] = "deadline"
    job["spec"]["runPolicy"] = {"activeDeadlineSeconds": 4}
    start_and_run(cluster, client, namespace, job)
    job = wait_for(lambda: (j := get_job(client, namespace, "deadline"))["status"]["phase"] == "Failed" and j, timeout=30, what="Failed")
    failed = condition(job, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (4s)" in failed["message"]
    wait_for(lambda: not client.list("v1", "Pod", namespace, "bouquet.dev/job=deadline"), what="every pod of the job gone")
    time.sleep(3)
    assert get_job(client, namespace, "deadline")["status"]["phase"] == "Failed", "a failed job stays failed"
    assert "DeadlineExceeded" in event_reasons(cluster, namespace, "deadline")


def test_a_site_failing_past_the_backoff_limit_fails_the_job_once_fewer_than_min_sites_are_left(
    cluster, client, namespace, operator, kubelet
):
    """With strategy.minSites 2 of 3, the run goes on without one site failed for good (a
    Warning event says so); a second leaves too few, and the job fails naming both."""
    job = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    job["metadata"]["name"] = "backoff"
    job["spec"]["runPolicy"] = {"backoffLimit": 0}
    job["spec"]["strategy"]["minSites"] = 2
    start_and_run(cluster, client, namespace, job)
    # The site's last line, as `bouquet site` prints it when the server refuses its key (the
    # termination message of a container with FallbackToLogsOnError: the end of its log).
    why = "the server does not admit site hospital-b's key (public key sha256 0123456789abcdef...): it is not a key the job registered"
    log_tail = f"WARNING :   Connection attempt failed, retrying in 0.85 seconds\nerror: {why}\n"
    assert kubelet.finish(namespace, "bouquet.dev/job=backoff,bouquet.dev/site=hospital-b", "Failed", 1, log_tail) == 1

    def site_b(job: dict) -> dict:
        return next(s for s in job["status"]["sites"] if s["name"] == "hospital-b")

    job = wait_for(lambda: (j := get_job(client, namespace, "backoff")) and site_b(j)["state"] == "Failed" and j, what="hospital-b Failed")
    assert site_b(job) == {"name": "hospital-b", "state": "Failed", "message": f"failed more than runPolicy.backoffLimit times: {why}"}
    assert job["status"]["phase"] == "Running" and condition(job, "Ready")["status"] == "True", job["status"]
    wait_for(lambda: "SiteFailed" in event_reasons(cluster, namespace, "backoff"), what="the SiteFailed event")
    time.sleep(3)  # the operator has looked again (it watches the Jobs) and the run goes on
    assert get_job(client, namespace, "backoff")["status"]["phase"] == "Running"
    assert client.get("apps/v1", "Deployment", namespace, "backoff-server")["spec"]["replicas"] == 1

    assert kubelet.finish(namespace, "bouquet.dev/job=backoff,bouquet.dev/site=hospital-c", "Failed", 1) == 1
    job = wait_for(lambda: (j := get_job(client, namespace, "backoff"))["status"]["phase"] == "Failed" and j, timeout=30, what="Failed")
    failed = condition(job, "Failed")
    assert failed["reason"] == "SiteFailed"
    assert failed["message"] == (
        "site hospital-b, hospital-c failed more than runPolicy.backoffLimit times, leaving 1 of 3 sites, "
        f"fewer than strategy.minSites (2); site hospital-b: {why}"
    ), failed["message"]


def test_a_server_restarting_past_the_backoff_limit_fails_the_job_for_good(cluster, client, namespace, operator, kubelet):
    """Failed scales the server to 0, and its pods go with the restart count that failed the
    job: the job stays Failed, for that reason, and its server stays at 0 replicas."""
    job = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    job["metadata"]["name"] = "crashloop"
    job["spec"]["runPolicy"] = {"backoffLimit": 1}
    start_and_run(cluster, client, namespace, job)
    [server] = client.list("v1", "Pod", namespace, "bouquet.dev/job=crashloop,app.kubernetes.io/component=server")
    kubelet.set_phase(server, "Running", restarts=2)
    job = wait_for(lambda: (j := get_job(client, namespace, "crashloop"))["status"]["phase"] == "Failed" and j, timeout=30, what="Failed")
    why = "the server restarted 2 times, more than runPolicy.backoffLimit (1)"
    assert (condition(job, "Failed")["reason"], condition(job, "Failed")["message"]) == ("TrainingFailed", why)
    wait_for(
        lambda: not client.list("v1", "Pod", namespace, "bouquet.dev/job=crashloop,app.kubernetes.io/component=server"),
        what="the server's pod gone",
    )
    for _ in range(10):  # the operator has seen the pod go (it watches pods) and has nothing to undo
        time.sleep(1)
        job = get_job(client, namespace, "crashloop")
        assert job["status"]["phase"] == "Failed" and condition(job, "Failed")["message"] == why, job["status"]
        assert client.get("apps/v1", "Deployment", namespace, "crashloop-server")["spec"]["replicas"] == 0


def test_a_site_pod_that_cannot_pull_its_image_is_a_condition_and_an_event(cluster, client, namespace, operator, kubelet):
    kubelet.held.add(f"{namespace}/breast-cancer--hospital-b-")
    try:
        apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
        selector = "bouquet.dev/job=breast-cancer,bouquet.dev/site=hospital-b"
        [pod] = wait_for(lambda: client.list("v1", "Pod", namespace, selector), what="hospital-b's pod")
        why = 'Back-off pulling image "bouquet-workloads:0.1.0": ErrImagePull: not found'
        kubelet.stuck(pod, "ImagePullBackOff", why)
        job = wait_for(
            lambda: (j := get_job(client, namespace, "breast-cancer")) and condition(j, "PodsFailing").get("status") == "True" and j,
            timeout=30,
            what="PodsFailing",
        )
        assert condition(job, "PodsFailing")["reason"] == "ImagePullBackOff"
        assert condition(job, "PodsFailing")["message"] == f"site hospital-b: ImagePullBackOff: {why}"
        reasons = event_reasons(cluster, namespace, "breast-cancer")
        assert "ImagePullBackOff" in reasons, reasons
    finally:
        kubelet.held.clear()
    # Pulled at last, the pod runs: the condition clears.
    wait_for(
        lambda: condition(get_job(client, namespace, "breast-cancer"), "PodsFailing").get("status") == "False",
        timeout=30,
        what="PodsFailing cleared",
    )


def test_pods_refused_at_admission_are_a_condition_with_the_api_servers_answer(cluster, client, namespace, operator, kubelet):
    """A quota that admits no pod: the server's Deployment and the site Jobs make none, and
    the job says why (FailedCreate, the API server's message), where before it just stayed
    Pending; once the quota goes, the pods are made and the condition clears."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods", "namespace": namespace},
        "spec": {"hard": {"pods": "0"}},
    }
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(quota))
    wait_for(
        lambda: kubectl(cluster, "get", "resourcequota", "no-pods", "-n", namespace, "-o", "jsonpath={.status.hard.pods}").stdout == "0",
        what="the quota in force",
    )
    apply_job(cluster, namespace, EXAMPLES["breast-cancer"])
    refused = {"server", "site hospital-a", "site hospital-b", "site hospital-c"}

    def said() -> dict[str, str]:
        found = condition(get_job(client, namespace, "breast-cancer"), "PodsFailing")
        if found.get("status") != "True":
            return {}
        return dict(part.split(": ", 1) for part in found["message"].split("; "))

    told = wait_for(lambda: (parts := said()) and set(parts) == refused and parts, timeout=60, what=f"PodsFailing naming {sorted(refused)}")
    job = get_job(client, namespace, "breast-cancer")
    assert condition(job, "PodsFailing")["reason"] == "FailedCreate"
    assert job["status"]["phase"] == "Pending"
    for who, message in told.items():
        assert message.startswith("FailedCreate: ") and "exceeded quota: no-pods" in message, (who, message)
    assert client.list("v1", "Pod", namespace, "bouquet.dev/job=breast-cancer") == []

    kubectl(cluster, "delete", "resourcequota", "no-pods", "-n", namespace)
    wait_for(
        lambda: condition(get_job(client, namespace, "breast-cancer"), "PodsFailing").get("status") == "False",
        timeout=120,
        what="PodsFailing cleared once the pods are made",
    )
    assert len(client.list("v1", "Pod", namespace, "bouquet.dev/job=breast-cancer")) == 4


def test_a_finished_job_is_deleted_after_its_time_to_live(cluster, client, namespace, operator, server_identity):
    job = yaml.safe_load(EXAMPLES["breast-cancer"].read_text())
    job["metadata"]["name"] = "ttl"
    job["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 3}
    start_and_run(cluster, client, namespace, job)
    model = {"path": "/model.safetensors", "sizeBytes": 1, "sha256": "00" * 32}
    progress.apply(server_identity(namespace, "ttl"), namespace, "ttl", {"state": "Succeeded", "round": 10, "model": model})
    wait_for(lambda: get_job(client, namespace, "ttl")["status"]["phase"] == "Succeeded", what="Succeeded")
    wait_for(lambda: get_job(client, namespace, "ttl") is None, timeout=30, what="the job deleted")
    assert client.get("v1", "PersistentVolumeClaim", namespace, "ttl-output"), "the retained claim outlives the job"


INVALID = sorted((Path(__file__).parents[1] / "invalid").glob("*.yaml"))
JOB_FILES = sorted(p for p in (ROOT / "examples").glob("**/*.yaml") if "kind: FederatedJob" in p.read_text())
# The same rule in the API server's other wording: a create's strict decoding says this of an
# unknown field, server-side apply (and `bouquet validate`) says "field not declared in schema".
SAME_RULE = {"field not declared in schema": "strict decoding error: unknown field"}
# The server prints a violation of the whole object at <nil>, `bouquet validate` at <root>.
ROOT_PATH = ("<root>: ", "<nil>: ")
# Files kubectl refuses on its own, in its words: it needs a name, and a kind the server has.
REFUSED_BY_KUBECTL = {"job-name-missing": "resource name may not be empty", "wrong-kind": 'no matches for kind "FederatedJobs"'}


@pytest.mark.parametrize("path", INVALID + JOB_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kubectl_and_bouquet_validate_accept_and_refuse_the_same_files(path, cluster, client, namespace):
    """Each file as kubectl reads it (its YAML 1.1, `y` a boolean) and the real API server
    judges it, with a server-side dry run, beside `bouquet validate` of the same file: both
    accept it, or both refuse it, with each of `bouquet validate`'s messages in the server's."""
    document = kubeyaml.load_all(path.read_text())[0]
    target = (document.get("metadata") or {}).get("namespace") if isinstance(document.get("metadata"), dict) else None
    if target:
        kubectl(cluster, "create", "namespace", target, check=False)  # the example's own, once
    served = kubectl(cluster, "apply", "--dry-run=server", "-n", target or namespace, "-f", str(path), check=False)
    ours = [str(v) for v in schema.validate(document)]
    if path in JOB_FILES:
        assert ours == [] and served.returncode == 0, served.stderr
        return
    assert ours and served.returncode != 0, f"bouquet validate: {ours}; kubectl: {served.stdout}{served.stderr}"
    said = served.stderr
    if path.stem in REFUSED_BY_KUBECTL:  # kubectl itself refuses these before any server sees them
        assert REFUSED_BY_KUBECTL[path.stem] in said, said
        return
    for line in ours:
        field, _, message = line.partition(": ")
        if message == "field not declared in schema":
            assert f'{SAME_RULE[message]} "{field}"' in said, f"{line!r}, in the server's words, not in:\n{said}"
        else:
            assert line.replace(*ROOT_PATH) in said, f"{line!r} not in:\n{said}"
    assert client.list("bouquet.dev/v1alpha1", "FederatedJob", target or namespace, "") == []


def test_the_servers_reporter_turns_its_committed_files_into_the_status(cluster, client, namespace, operator, server_identity, tmp_path):
    """bouquet server --report-status: progress.Reporter reads the files the ServerApp
    commits and applies them, as the server's service account."""
    import numpy as np

    from bouquet_workloads import outputs

    job = start_and_run(cluster, client, namespace, EXAMPLES["breast-cancer"])
    name = job["metadata"]["name"]
    reporter = progress.Reporter(tmp_path, namespace, name, server_identity(namespace, name))
    reporter.report_now()  # nothing committed yet: nothing reported
    assert "progress" not in get_job(client, namespace, name)["status"]

    history = [{"round": r, "durationSeconds": 1.5, "sites": ["hospital-a"], "loss": 0.3 / r, "accuracy": 0.9} for r in (1, 2)]
    history[1]["refusedRuns"] = {"hospital-a": 2}  # hospital-a said it had refused two runs of other apps
    outputs.write_json(tmp_path / outputs.HISTORY, history)
    outputs.write_json(tmp_path / outputs.PROGRESS, {"state": "Running", "round": 3, "rounds": 10})
    reporter.start()
    seen = wait_for(lambda: (j := get_job(client, namespace, name))["status"].get("currentRound") == 2 and j, what="round 2 reported")
    assert seen["status"]["progress"]["metrics"] == {"loss": 0.15, "accuracy": 0.9}
    assert seen["status"]["progress"]["refusedRuns"] == {"hospital-a": 2}
    assert seen["status"]["sites"][0] == {"name": "hospital-a", "state": "Running", "refusedRuns": 2}
    assert "refusedRuns" not in seen["status"]["sites"][1]
    events = json.loads(
        kubectl(cluster, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    )
    refused = [e["message"] for e in events["items"] if e["reason"] == "ForeignRunRefused"]
    assert len(refused) == 1 and refused[0].startswith("site hospital-a has refused 2 run(s) of an app that is not the job's"), refused

    meta = outputs.save_model(tmp_path, {"w": np.ones(3, dtype=np.float32)}, {"job": name})
    outputs.write_json(tmp_path / outputs.PROGRESS, {"state": "Succeeded", "round": 2, "rounds": 10})
    reporter.stop()
    done = wait_for(lambda: (j := get_job(client, namespace, name))["status"]["phase"] == "Succeeded" and j, what="Succeeded")
    assert done["status"]["model"] == {
        "claimName": f"{name}-output",
        "path": "/model.safetensors",
        "sizeBytes": meta["sizeBytes"],
        "sha256": meta["sha256"],
    }
    managers = {m["manager"]: m for m in done["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert set(managers["bouquet-server"]["fieldsV1"]["f:status"]) == {"f:progress"}, "the server owns status.progress alone"
    assert "f:progress" not in managers["bouquet-operator"]["fieldsV1"]["f:status"]


def test_kubectl_explain_reads_the_crds_descriptions(cluster):
    sites = kubectl(cluster, "explain", "federatedjob.spec.sites").stdout
    assert "The sites that train, each on its own data." in sites
    assert "GPUs the site trains on (nvidia.com/gpu)." in sites
    status = kubectl(cluster, "explain", "federatedjob.status.progress").stdout
    assert "The training's progress as the job's server reports it." in status
