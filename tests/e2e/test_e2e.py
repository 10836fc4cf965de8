"""Bouquet as its users meet it, following the README's Kubernetes section block by block, as
written, in a user's shell (support.readme.Session) on a real cluster: the chart installed
with helm, `kubectl apply` of a job, real Pods training until it is Succeeded, the model
copied out of its claim and used to predict, a site's own data in a claim and in a node
folder, the round metrics in Prometheus, two namespaces standing in for two hospitals'
clusters, a site on a GPU node, a server Pod deleted mid-run, `helm uninstall`, and the
host's own cluster taken down and up with `make cluster-down` and `make cluster`.

The tests run in the order written: the last ones uninstall the chart and take the local
node down."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support import faults, readme
from support.cluster import ROOT, event_reasons, kubectl
from support.dashboards import empty_panels
from support.e2e import (
    RELEASE,
    RELEASE_NAMESPACE,
    connections,
    diagnose,
    host_state,
    job_status,
    kill_pod,
    leftovers,
    plain_pod,
    read_claim,
    server_pods,
    wait_for_round,
    workloads_image,
)
from support.kubelet import wait_for

pytestmark = pytest.mark.slow

# The node folder the README's own-data block puts hospital-a's file in.
SITE_FOLDER = Path("/srv/bouquet/hospital-a")
FOREIGN_APP = ROOT / "tests" / "support" / "foreign_app"


@dataclass
class ExampleRun:
    table: str
    status: dict
    model_line: str
    empty_training_panels: list[str]
    empty_operator_panels: list[str]
    round_mid_run: float | None
    copied: Path
    predicted: str
    local_model: dict


@pytest.fixture(scope="module")
def example_run(e2e_cluster, release, prometheus, quick_start) -> ExampleRun:
    """The README's first job, line by line as written, with Prometheus and the dashboards
    asked while it runs; then its model copied out of the claim and used to predict, and the
    model of the README's `make run` on this machine (tests/conftest.py) beside it."""
    user = release
    apply, get, wait, model = readme.commands("first-job")
    user.run(apply)
    try:
        wait_for_round(e2e_cluster, "default", "breast-cancer", 2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    table = user.run(get).stdout
    # Mid-run: the server Pod is up and Prometheus scrapes it (its series end when the Pod
    # does, once the job is done).
    training = empty_panels(prometheus, "training", timeout=120)
    operator = empty_panels(prometheus, "operator", timeout=60)
    # The status said round 2 is done: Prometheus' next scrapes of the server say so too.
    mid_run = prometheus.first_value('max(bouquet_job_current_round{namespace="default", job_name="breast-cancer"}) >= 2', timeout=60)
    waited = user.run(wait, timeout=1900, check=False)
    assert waited.returncode == 0, f"{waited.output}\n{diagnose(e2e_cluster, 'default')}"
    model_line = user.run(model).stdout
    copy = user.run_block("copy-model", timeout=900)
    return ExampleRun(
        table,
        job_status(e2e_cluster, "default", "breast-cancer"),
        model_line,
        training,
        operator,
        mid_run,
        user.cwd / "runs" / "breast-cancer-cluster",
        copy[-1].stderr,
        json.loads((quick_start.cwd / "runs" / "breast-cancer" / "model.json").read_text()),
    )


def test_the_readmes_install_runs_the_operator(e2e_cluster, release):
    deployment = json.loads(kubectl(e2e_cluster, "get", "deployment", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json").stdout)
    assert deployment["status"].get("readyReplicas") == 1
    crd = kubectl(
        e2e_cluster, "get", "crd", "federatedjobs.bouquet.dev", "-o", "jsonpath={.metadata.labels.app\\.kubernetes\\.io/managed-by}"
    )
    assert crd.stdout == "Helm"
    [images] = readme.commands("images")
    assert images.split("#")[0].strip() == readme.commands("install")[0].split("#")[0].strip()  # the install block ran it
    assert release.run(images, timeout=1800).stdout.split() == ["bouquet-workloads:0.1.0", "bouquet-operator:0.1.0"]


def test_the_first_job_trains_every_round_to_the_same_model_as_make_run(example_run):
    header, row = example_run.table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "ROUND", "SITES", "ACCURACY", "AGE"]
    name, phase, round_, sites, accuracy = row.split()[:5]
    assert (name, phase, sites) == ("breast-cancer", "Running", "3") and re.fullmatch(r"\d+/10", round_)
    assert re.fullmatch(r"0\.\d{1,4}", accuracy), "accuracy to 4 decimals"
    status = example_run.status
    assert status["phase"] == "Succeeded" and status["progress"]["round"] == 10 and status["roundSites"] == 3
    shown = json.loads(example_run.model_line)
    assert shown == status["progress"]["model"] and shown["path"] == "/model.safetensors"
    # The same job and seed as the README's `make run` on this machine: the same weights, to the bit.
    assert shown["sha256"] == example_run.local_model["sha256"], (shown, example_run.local_model)


def test_the_model_copied_out_of_the_claim_predicts_its_held_out_accuracy(example_run):
    copied = example_run.copied
    info = json.loads((copied / "model.json").read_text())
    assert (
        hashlib.sha256((copied / "model.safetensors").read_bytes()).hexdigest() == info["sha256"] == example_run.status["model"]["sha256"]
    )
    assert (copied / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert [e["round"] for e in json.loads((copied / "history.json").read_text())] == list(range(1, 11))
    accuracy = info["metrics"]["accuracy"]
    assert accuracy >= 0.93
    assert example_run.predicted.strip() == f"accuracy {accuracy:.4f} on 114 rows (model.json: {accuracy:.4f} on the held-out test set)"


def test_prometheus_scrapes_the_server_and_the_operator(example_run):
    assert example_run.round_mid_run is not None and 2 <= example_run.round_mid_run <= 10
    assert example_run.empty_training_panels == [], "training dashboard panels without data mid-run"
    assert example_run.empty_operator_panels == [], "operator dashboard panels without data"


def test_sites_train_on_their_own_data_from_a_claim_and_a_node_folder(e2e_cluster, release):
    user = release
    created = not SITE_FOLDER.parent.exists()
    try:
        for share in readme.commands("own-data-local")[:2]:  # the files, written as the README's local section does
            user.run(share)
        results = user.run_block("own-data-kubernetes", timeout=1900)
        assert results[-1].returncode == 0
        status = job_status(e2e_cluster, "default", "own-data")
        assert status["phase"] == "Succeeded" and status["progress"]["round"] == 3
        history = json.loads(read_claim(e2e_cluster, "default", "own-data-output", ["history.json"])["history.json"])
        assert [e["sites"] for e in history] == [["hospital-a", "hospital-b"]] * 3
        pods = json.loads(kubectl(e2e_cluster, "get", "pods", "-l", "bouquet.dev/job=own-data", "-o", "json").stdout)["items"]
        mounts = {
            p["metadata"]["labels"].get("bouquet.dev/site"): p["spec"]["volumes"]
            for p in pods
            if "bouquet.dev/site" in p["metadata"]["labels"]
        }
        assert {"name": "data", "hostPath": {"path": str(SITE_FOLDER), "type": "Directory"}} in mounts["hospital-a"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "hospital-b-data", "readOnly": True}} in mounts["hospital-b"]
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    finally:
        shutil.rmtree(SITE_FOLDER.parent if created else SITE_FOLDER, ignore_errors=True)


def test_server_only_and_sites_only_jobs_in_two_namespaces(e2e_cluster, release):
    """The README's rehearsal of a federation across clusters, as written: the aggregator's
    job in one namespace, the hospitals' in another, which has only the CA."""
    try:
        release.run_block("across-clusters", timeout=1900)
        waited = release.run(
            "kubectl wait --for=condition=Succeeded fj/breast-cancer -n hospital-a --timeout=10m", timeout=700, check=False
        )
        assert waited.returncode == 0, f"{waited.output}\n{diagnose(e2e_cluster, 'hospital-a')}"
        assert job_status(e2e_cluster, "aggregator", "breast-cancer")["progress"]["round"] == 10
        # The aggregator's job knows its sites from its server's report: both took part to the end.
        waited = release.run("kubectl wait --for=condition=Succeeded fj/breast-cancer -n aggregator --timeout=2m", timeout=200, check=False)
        assert waited.returncode == 0, waited.output
        sites = job_status(e2e_cluster, "aggregator", "breast-cancer")["sites"]
        assert sites == [{"name": "hospital-a", "state": "Succeeded"}, {"name": "hospital-b", "state": "Succeeded"}], sites
        # Only the server ran in the one namespace, only the sites in the other.
        assert kubectl(e2e_cluster, "get", "jobs", "-n", "aggregator", "-o", "name").stdout.split() == []
        assert kubectl(e2e_cluster, "get", "deployments", "-n", "hospital-a", "-o", "name").stdout.split() == []
        history = json.loads(read_claim(e2e_cluster, "aggregator", "breast-cancer-output", ["history.json"])["history.json"])
        assert [entry["round"] for entry in history] == list(range(1, 11))
        assert all(sorted(entry["sites"]) == ["hospital-a", "hospital-b"] for entry in history)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'aggregator')}\n{diagnose(e2e_cluster, 'hospital-a')}") from None
    finally:
        kubectl(e2e_cluster, "delete", "namespace", "aggregator", "hospital-a", "--wait=false", check=False)


def test_gpu_site_placed_on_gpu_node_and_server_pod_deleted_mid_run_resumes(e2e_cluster, release, gpu_node):
    """The README's GPU block: the GPU site's Pod on the GPU node; its server Pod deleted
    mid-run, and the new one carrying on from the last checkpoint."""
    apply, get_pods = readme.commands("gpus")
    rounds = yaml.safe_load((ROOT / "examples" / "gpu.yaml").read_text())["spec"]["rounds"]
    release.run(apply)
    try:
        wait_for_round(e2e_cluster, "default", "gpu", 2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    # The server Pod deleted at once (rounds take about a second); its site Pods looked at after.
    (old,) = server_pods(e2e_cluster, "default", "gpu")
    round_before = job_status(e2e_cluster, "default", "gpu")["progress"]["round"]
    kubectl(e2e_cluster, "delete", "pod", old["metadata"]["name"], "--wait=false")
    assert round_before < rounds, "the run ended before its server Pod could be deleted"

    listed = release.run(get_pods).stdout
    assert gpu_node in listed and "gpu--hospital-a" in listed, listed
    site_pods = json.loads(
        kubectl(e2e_cluster, "get", "pods", "-l", "bouquet.dev/site=hospital-a,bouquet.dev/job=gpu", "-o", "json").stdout
    )
    pod = site_pods["items"][0]
    assert pod["spec"]["nodeName"] == gpu_node
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    def new_server_log() -> str:
        pods = [p for p in server_pods(e2e_cluster, "default", "gpu") if p["metadata"]["uid"] != old["metadata"]["uid"]]
        if not pods:
            return ""
        logs = kubectl(e2e_cluster, "logs", pods[0]["metadata"]["name"], check=False)
        return logs.stdout if logs.returncode == 0 else ""

    try:
        wait_for(
            lambda: "from its checkpoint" in new_server_log(),
            timeout=300,
            interval=2,
            what="the new server Pod to resume from its checkpoint",
        )
    except AssertionError as error:
        raise AssertionError(
            f"{error} (round {round_before} when deleted)\n{new_server_log()}\n{diagnose(e2e_cluster, 'default')}"
        ) from None
    resumed_after = int(new_server_log().split("continuing after round ")[1].split()[0])
    assert resumed_after >= round_before
    waited = release.run("kubectl wait --for=condition=Succeeded fj/gpu --timeout=15m", timeout=1000, check=False)
    assert waited.returncode == 0, f"{waited.output}\n{diagnose(e2e_cluster, 'default')}"
    model = job_status(e2e_cluster, "default", "gpu")["model"]
    files = read_claim(e2e_cluster, "default", "gpu-output", ["history.json", model["path"].lstrip("/")])
    history = json.loads(files["history.json"])
    assert [entry["round"] for entry in history] == list(range(1, rounds + 1)), "every round exactly once"
    assert hashlib.sha256(files[model["path"].lstrip("/")]).hexdigest() == model["sha256"], "the status names the model in the claim"


def outsider_pod(kubeconfig: str, job: str) -> str:
    """A Pod that holds the job's CA certificate and, labelled as one of the job's sites are,
    reaches its server's port as every site does (the NetworkPolicy admits it): an outsider
    with all an outsider can get. Stock Flower only; the foreign app is copied in."""
    pod = f"outsider-{job}"
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": "default", "labels": {"bouquet.dev/job": job, "app.kubernetes.io/component": "site"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "outsider",
                    "image": workloads_image(),
                    "command": ["sleep", "900"],
                    "volumeMounts": [{"name": "ca", "mountPath": "/ca", "readOnly": True}],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
            "volumes": [{"name": "ca", "secret": {"secretName": f"{job}-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}],
        },
    }
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(manifest))
    kubectl(kubeconfig, "wait", f"pod/{pod}", "--for=condition=Ready", "--timeout=180s", timeout=200)
    for path in sorted(FOREIGN_APP.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            target = f"/tmp/foreign-app/{path.relative_to(FOREIGN_APP)}"
            kubectl(
                kubeconfig, "exec", "-i", pod, "--", "sh", "-c", f"mkdir -p $(dirname {target}) && cat > {target}", input=path.read_text()
            )
    return pod


def test_an_outsider_in_the_cluster_with_the_ca_gets_nowhere_and_the_run_completes(e2e_cluster, release):
    """The attacks of tests/test_federation.py, on a real job on the cluster, from a Pod
    holding the job's CA and reaching its server: listing runs, submitting a foreign app,
    registering a key, joining as hospital-a with no key and with a key of its own. The
    server is held up for as long as the attacks take: the job has a fourth site that no node
    can place, and the server waits for every site; that site is then taken out of the job,
    and the three others train every round."""
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["metadata"] = {"name": "attacked", "namespace": "default"}
    job["spec"]["rounds"] = 4
    job["spec"]["sites"].append({"name": "hospital-d", "gpus": 16})  # the GPU node has 2
    kubectl(e2e_cluster, "apply", "-f", "-", input=yaml.safe_dump(job))
    pod = None
    try:
        wait_for(
            lambda: job_status(e2e_cluster, "default", "attacked").get("phase") == "Running", timeout=300, interval=2, what="the server up"
        )
        pod = outsider_pod(e2e_cluster, "attacked")
        env = {"SERVER": "attacked-server.default.svc:9092", "CA": "/ca/ca.crt", "APP": "/tmp/foreign-app", "SITE": "hospital-a"}
        script = (ROOT / "tests" / "support" / "outsider.py").read_text()
        attempts = kubectl(
            e2e_cluster, "exec", "-i", pod, "--", "env", *(f"{k}={v}" for k, v in env.items()), "python", "-", input=script, timeout=600
        )
        got = json.loads(attempts.stdout.strip().splitlines()[-1])
        for attempt in ("list", "submit", "register"):
            assert got[attempt]["reply"].get("success") is not True and "run-id" not in got[attempt]["reply"], (attempt, got[attempt])
        assert "All SuperNodes must be registered" in got["no-key"]["output"], got["no-key"]
        assert "Failed to activate SuperNode" in got["own-key"]["output"], got["own-key"]
        for attempt in ("no-key", "own-key"):
            assert "SuperNode ID" not in got[attempt]["output"], (attempt, got[attempt]["output"])
        assert job_status(e2e_cluster, "default", "attacked").get("progress", {}).get("round", 0) == 0, (
            "the server was up all along, waiting"
        )
        kubectl(e2e_cluster, "patch", "fj", "attacked", "--type=json", "-p", '[{"op":"remove","path":"/spec/sites/3"}]')

        waited = release.run("kubectl wait --for=condition=Succeeded fj/attacked --timeout=15m", timeout=1000, check=False)
        assert waited.returncode == 0, waited.output
        history = json.loads(read_claim(e2e_cluster, "default", "attacked-output", ["history.json"])["history.json"])
        assert [entry["round"] for entry in history] == list(range(1, 5)), "every round exactly once"
        assert all(entry["sites"] == ["hospital-a", "hospital-b", "hospital-c"] for entry in history)
        assert not any("refusedRuns" in entry for entry in history), "no foreign run even reached a site"
        status = job_status(e2e_cluster, "default", "attacked")
        assert not any("refusedRuns" in site for site in status["sites"]), status["sites"]
        # Nothing reached a site to be refused: no foreign run was ever created.
        logs = "\n".join(
            kubectl(e2e_cluster, "logs", "-l", f"bouquet.dev/job=attacked,bouquet.dev/site={site}", "--tail=-1").stdout
            for site in ("hospital-a", "hospital-b", "hospital-c")
        )
        assert "refused run" not in logs
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    finally:
        if pod:
            kubectl(e2e_cluster, "delete", "pod", pod, "--wait=false", check=False)
        kubectl(e2e_cluster, "delete", "fj", "attacked", "--wait=false", check=False)


def listen_below(limit: int) -> socket.socket:
    """A TCP listener on every address of this host, on a free port between 20000 and limit."""
    for port in random.sample(range(20000, limit), 100):
        try:
            return socket.create_server(("0.0.0.0", port))
        except OSError:
            continue
    raise AssertionError(f"no free port between 20000 and {limit} on this host")


def test_the_jobs_network_policies_are_enforced_and_the_run_completes(e2e_cluster, release, local_node, namespace):
    """The job's NetworkPolicies, enforced by the node's implementation (kube-router's firewall
    on the local node, kindnet on kind): a Pod in another namespace and a Pod of the job's
    namespace without a site's labels cannot open the server's port, nor the one in another
    namespace its metrics port, which a Pod of the chart's namespace can; a site's Pod cannot open
    another Pod's port, the host's, or an address outside the cluster (on the local node: a
    listener of this test's on the host's address, and on an address outside every network
    of the cluster, which the host answers for). Then the same connections with the job's
    policies deleted (the operator stopped meanwhile, so that it does not put them back at
    once): every one opens, so each refusal above was the policy's. The server is held up
    meanwhile by a fourth site whose Pod no node takes until the test labels one for it, and
    then the run trains to Succeeded with its four sites under the policies, which the
    restarted operator has restored."""
    name = "guarded"
    hold = "bouquet.dev/e2e-hold"  # a node label that no node has until the probes are done
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": "default"}
    job["spec"]["rounds"] = 2
    job["spec"]["sites"].append({"name": "hospital-d", "nodeSelector": {hold: name}})
    kubectl(e2e_cluster, "apply", "-f", "-", input=yaml.safe_dump(job))
    pods = [f"{name}-listener", f"{name}-outsider"]
    listener = outside = None
    try:
        wait_for(lambda: job_status(e2e_cluster, "default", name).get("phase") == "Running", timeout=300, interval=2, what="the server up")
        (server,) = server_pods(e2e_cluster, "default", name)
        server_port = f"{server['status']['podIP']}:9092"
        service_port = f"{name}-server.default.svc:9092"
        # In the job's namespace, without a site's labels.
        listener_ip = plain_pod(e2e_cluster, "default", pods[0], {"app": "listener"}, 8080)
        plain_pod(e2e_cluster, namespace, pods[1])
        # A pod of the chart's namespace, whose pods may scrape the metrics (and nothing else).
        plain_pod(e2e_cluster, RELEASE_NAMESPACE, f"{name}-scraper")
        metrics_port = f"{server['status']['podIP']}:9400"
        site_selector = f"bouquet.dev/job={name},bouquet.dev/site=hospital-a"
        kubectl(e2e_cluster, "wait", "pods", "-l", site_selector, "--for=condition=Ready", "--timeout=300s", timeout=320)
        site = kubectl(e2e_cluster, "get", "pods", "-l", site_selector, "-o", "name").stdout.split()[0]
        site_targets = [f"{listener_ip}:8080"]
        if local_node:
            node_ip = kubectl(
                e2e_cluster, "get", "nodes", "-o", 'jsonpath={.items[0].status.addresses[?(@.type=="InternalIP")].address}'
            ).stdout
            # Below the NodePort range (30000-32767), which kube-router leaves open to Pods on
            # the node's addresses whatever the policies say, and below the ephemeral ports.
            listener = listen_below(30000)
            outside = "198.51.100.7"  # TEST-NET-2: no network of the cluster's
            subprocess.run(["ip", "addr", "add", f"{outside}/32", "dev", "lo"], check=True)
            port = listener.getsockname()[1]
            site_targets += [f"{node_ip}:{port}", f"{outside}:{port}"]

        def attempts() -> dict[str, dict[str, bool]]:
            return {
                "other namespace": connections(e2e_cluster, namespace, pods[1], [service_port, server_port, metrics_port]),
                "no site labels": connections(e2e_cluster, "default", pods[0], [service_port, server_port]),
                "scraper": connections(e2e_cluster, RELEASE_NAMESPACE, f"{name}-scraper", [metrics_port, server_port]),
                "site": connections(e2e_cluster, "default", site.split("/")[1], [*site_targets, service_port]),
            }

        def settle(expected: dict, what: str) -> None:
            """Waits for the attempts to give `expected` (the implementation takes a moment
            to add or drop its rules)."""
            seen: list = []
            try:
                wait_for(lambda: seen.append(attempts()) or seen[-1] == expected, timeout=60, interval=3, what=what)
            except AssertionError as error:
                raise AssertionError(f"{error}; the last attempts: {seen[-1] if seen else None}") from None

        guarded = {
            "other namespace": {service_port: False, server_port: False, metrics_port: False},
            "no site labels": {service_port: False, server_port: False},
            "scraper": {metrics_port: True, server_port: False},
            "site": {**dict.fromkeys(site_targets, False), service_port: True},
        }
        # (The scraper's address reaches the implementation's rules a moment after its Pod starts.)
        settle(guarded, "the policies enforced")

        operator = ["-n", RELEASE_NAMESPACE, "deployment/bouquet"]
        kubectl(e2e_cluster, "scale", *operator, "--replicas=0")
        operator_pods = ["get", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/component=operator", "-o", "name"]
        wait_for(lambda: not kubectl(e2e_cluster, *operator_pods).stdout.split(), timeout=120, interval=1, what="the operator stopped")
        kubectl(e2e_cluster, "delete", "networkpolicy", f"{name}-server", f"{name}-sites")
        opened = {
            "other namespace": {service_port: True, server_port: True, metrics_port: True},
            "no site labels": {service_port: True, server_port: True},
            "scraper": {metrics_port: True, server_port: True},
        }
        opened["site"] = dict.fromkeys([*site_targets, service_port], True)
        settle(opened, "every connection to open without the policies")

        kubectl(e2e_cluster, "scale", *operator, "--replicas=1")
        kubectl(e2e_cluster, "rollout", "status", *operator, "--timeout=180s", timeout=200)
        wait_for(
            lambda: kubectl(e2e_cluster, "get", "networkpolicy", f"{name}-server", f"{name}-sites", check=False).returncode == 0,
            timeout=120,
            interval=2,
            what="the operator to restore the job's NetworkPolicies",
        )
        settle(guarded, "the restored policies enforced")

        node = kubectl(e2e_cluster, "get", site, "-o", "jsonpath={.spec.nodeName}").stdout  # one that runs sites
        kubectl(e2e_cluster, "label", "node", node, f"{hold}={name}")
        ended = wait_for(
            lambda: (
                job_status(e2e_cluster, "default", name).get("phase") in ("Succeeded", "Failed")
                and job_status(e2e_cluster, "default", name)
            ),
            timeout=900,
            interval=3,
            what="the job to end",
        )
        assert ended["phase"] == "Succeeded", json.dumps(ended, indent=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    finally:
        if listener:
            listener.close()
        if outside:
            subprocess.run(["ip", "addr", "del", f"{outside}/32", "dev", "lo"], check=False)
        kubectl(e2e_cluster, "scale", "-n", RELEASE_NAMESPACE, "deployment/bouquet", "--replicas=1", check=False)
        kubectl(e2e_cluster, "delete", "pod", pods[0], "--wait=false", check=False)
        kubectl(e2e_cluster, "delete", "pod", "-n", RELEASE_NAMESPACE, f"{name}-scraper", "--wait=false", check=False)
        kubectl(e2e_cluster, "delete", "fj", name, "--wait=false", check=False)
        kubectl(e2e_cluster, "label", "nodes", "--all", f"{hold}-", check=False)


def test_a_site_withdrawn_mid_run_is_stopped_and_left_out_of_later_rounds(e2e_cluster, release):
    """Consent withdrawn: hospital-c taken out of a running job's spec. Its Job (and Pod) and
    its key are deleted, the restarted server no longer admits that key, the rounds after it
    are trained by the other two sites alone, and the run completes with every round once."""
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["metadata"] = {"name": "withdrawal", "namespace": "default"}
    # Enough rounds (about a second each) for the change to reach the server mid-run.
    rounds = job["spec"]["rounds"] = 40
    kubectl(e2e_cluster, "apply", "-f", "-", input=yaml.safe_dump(job))
    try:
        wait_for_round(e2e_cluster, "default", "withdrawal", 2)
        (old_server,) = server_pods(e2e_cluster, "default", "withdrawal")
        kubectl(e2e_cluster, "patch", "fj", "withdrawal", "--type=json", "-p", '[{"op":"remove","path":"/spec/sites/2"}]')
        removed_at = job_status(e2e_cluster, "default", "withdrawal")["progress"]["round"]
        assert removed_at < rounds, "the run ended before a site could be withdrawn"

        def leftovers_of_c() -> list[str]:
            found = kubectl(
                e2e_cluster, "get", "jobs,secrets,pods", "-l", "bouquet.dev/site=hospital-c,bouquet.dev/job=withdrawal", "-o", "name"
            )
            return found.stdout.split()

        wait_for(
            lambda: leftovers_of_c() == [], timeout=60, interval=1, what=f"hospital-c's Job, Pod and key gone (left: {leftovers_of_c()})"
        )

        def new_server_log() -> str:
            pods = [p for p in server_pods(e2e_cluster, "default", "withdrawal") if p["metadata"]["uid"] != old_server["metadata"]["uid"]]
            logs = kubectl(e2e_cluster, "logs", pods[0]["metadata"]["name"], check=False) if pods else None
            return logs.stdout if logs and logs.returncode == 0 else ""

        wait_for(
            lambda: "from its checkpoint" in new_server_log(),
            timeout=300,
            interval=2,
            what="the restarted server to resume from its checkpoint",
        )
        assert "sites admitted (their keys registered): hospital-a, hospital-b; no other key" in new_server_log()
        waited = release.run("kubectl wait --for=condition=Succeeded fj/withdrawal --timeout=15m", timeout=1000, check=False)
        assert waited.returncode == 0, waited.output
        # The other two sites end once the server has told them the run is over.
        wait_for(
            lambda: (
                [(s["name"], s["state"]) for s in job_status(e2e_cluster, "default", "withdrawal")["sites"]]
                == [("hospital-a", "Succeeded"), ("hospital-b", "Succeeded"), ("hospital-c", "Removed")]
            ),
            timeout=180,
            interval=2,
            what="hospital-a and hospital-b Succeeded, hospital-c Removed in the job's status",
        )
        reasons = event_reasons(e2e_cluster, "default", "withdrawal")
        assert "SiteRemoved" in reasons, reasons

        history = json.loads(read_claim(e2e_cluster, "default", "withdrawal-output", ["history.json"])["history.json"])
        assert [entry["round"] for entry in history] == list(range(1, rounds + 1)), "every round exactly once"
        taking_part = [sorted(entry["sites"]) for entry in history]
        # Rounds the old server finished (before the change reached it) had all three sites;
        # every round the restarted server trained had the other two alone.
        left = next(i for i, sites in enumerate(taking_part) if "hospital-c" not in sites)
        assert removed_at <= left < rounds, (removed_at, taking_part)
        assert taking_part[:left] == [["hospital-a", "hospital-b", "hospital-c"]] * left, taking_part
        assert taking_part[left:] == [["hospital-a", "hospital-b"]] * (rounds - left), taking_part
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    finally:
        kubectl(e2e_cluster, "delete", "fj", "withdrawal", "--wait=false", check=False)


def site_pod(kubeconfig: str, job: str, site: str) -> str:
    found = kubectl(kubeconfig, "get", "pods", "-l", f"bouquet.dev/job={job},bouquet.dev/site={site}", "-o", "name").stdout.split()
    assert len(found) == 1, f"{site} of {job} has pods {found}"
    return found[0].removeprefix("pod/")


def test_a_site_killed_mid_round_the_run_goes_on_while_min_sites_hold_and_fails_naming_it_once_not(e2e_cluster, release, local_node):
    """A site's processes SIGKILLed mid-round (as the OOM killer does), with
    runPolicy.backoffLimit 0, so that it does not come back: with strategy.minSites 2 of 3 the
    run goes on without it and completes, every round once; with the default (every site)
    the job fails at once, with SiteFailed naming it, and its pods stop. On the host's own
    node, its kubelet is restarted too, mid-run: the run completes all the same."""
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["spec"]["runPolicy"] = {"backoffLimit": 0}
    rounds = job["spec"]["rounds"] = 15
    going_on = {**job, "metadata": {"name": "site-killed", "namespace": "default"}}
    going_on["spec"] = {**job["spec"], "strategy": {**job["spec"]["strategy"], "minSites": 2}}
    too_few = {**job, "metadata": {"name": "too-few-left", "namespace": "default"}}
    try:
        kubectl(e2e_cluster, "apply", "-f", "-", input=yaml.safe_dump_all([going_on, too_few]))
        wait_for_round(e2e_cluster, "default", "site-killed", 2)
        wait_for_round(e2e_cluster, "default", "too-few-left", 2)
        for name in ("site-killed", "too-few-left"):
            assert kill_pod(e2e_cluster, "default", site_pod(e2e_cluster, name, "hospital-c")) >= 1, f"{name}'s hospital-c killed"
        killed_at = job_status(e2e_cluster, "default", "site-killed")["progress"]["round"]

        failed = release.run("kubectl wait --for=condition=Failed fj/too-few-left --timeout=2m", timeout=200, check=False)
        assert failed.returncode == 0, failed.output
        condition = next(c for c in job_status(e2e_cluster, "default", "too-few-left")["conditions"] if c["type"] == "Failed")
        assert condition["reason"] == "SiteFailed"
        assert condition["message"].startswith(
            "site hospital-c failed more than runPolicy.backoffLimit times, leaving 2 of 3 sites, "
            "fewer than strategy.minSites (3, the default: every site)"
        ), condition["message"]
        wait_for(
            lambda: kubectl(e2e_cluster, "get", "pods", "-l", "bouquet.dev/job=too-few-left", "-o", "name").stdout.split() == [],
            timeout=120,
            interval=2,
            what="the failed job's pods gone",
        )

        def sites(name: str) -> dict[str, str]:
            return {s["name"]: s["state"] for s in job_status(e2e_cluster, "default", name).get("sites", [])}

        wait_for(lambda: sites("site-killed").get("hospital-c") == "Failed", timeout=120, interval=1, what="hospital-c Failed")
        assert job_status(e2e_cluster, "default", "site-killed")["phase"] == "Running"
        if local_node:
            faults.restart_component(local_node.state, "kubelet")
        waited = release.run("kubectl wait --for=condition=Succeeded fj/site-killed --timeout=10m", timeout=700, check=False)
        assert waited.returncode == 0, waited.output
        reasons = event_reasons(e2e_cluster, "default", "site-killed")
        assert "SiteFailed" in reasons, reasons
        history = json.loads(read_claim(e2e_cluster, "default", "site-killed-output", ["history.json"])["history.json"])
        assert [entry["round"] for entry in history] == list(range(1, rounds + 1)), "every round exactly once"
        taking_part = [sorted(entry["sites"]) for entry in history]
        left = next(i for i, sites_of in enumerate(taking_part) if "hospital-c" not in sites_of)
        assert 2 <= left <= killed_at + 1, (killed_at, taking_part)
        assert taking_part[left:] == [["hospital-a", "hospital-b"]] * (rounds - left), taking_part
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, 'default')}") from None
    finally:
        kubectl(e2e_cluster, "delete", "fj", "site-killed", "too-few-left", "--wait=false", check=False)


def test_the_chart_ships_both_dashboards(release):
    [listed] = release.run_block("dashboards")
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert sorted(names) == ["bouquet-dashboard-operator", "bouquet-dashboard-training"], listed.stdout


def test_a_server_image_that_cannot_be_pulled_is_the_jobs_condition(e2e_cluster, release, namespace):
    """A real kubelet that cannot pull the server's image: the job says so, with the
    kubelet's reason and message, instead of staying Pending without a word."""
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["metadata"] = {"name": "no-image", "namespace": namespace}
    job["spec"]["server"] = {"image": "bouquet-workloads:0.0.0-missing"}
    kubectl(e2e_cluster, "apply", "-f", "-", input=yaml.safe_dump(job))

    def failing() -> dict:
        found = [c for c in job_status(e2e_cluster, namespace, "no-image").get("conditions", []) if c["type"] == "PodsFailing"]
        return found[0] if found and found[0]["status"] == "True" else {}

    shown = wait_for(failing, timeout=120, interval=1, what="the PodsFailing condition")
    assert shown["reason"] in ("ErrImagePull", "ImagePullBackOff"), shown
    assert shown["message"].startswith(f"server: {shown['reason']}: ") and "bouquet-workloads:0.0.0-missing" in shown["message"], shown
    assert job_status(e2e_cluster, namespace, "no-image")["phase"] == "Pending"
    kubectl(e2e_cluster, "delete", "fj", "no-image", "-n", namespace)


def test_helm_uninstall_keeps_the_jobs_a_reinstall_takes_them_up_and_keep_false_leaves_only_claims(e2e_cluster, release, namespace):
    """By default the CRD, the jobs and their keys outlive `helm uninstall`, and installing
    again (the README's command) carries on with them, keys unchanged; installed with
    crds.keep=false, uninstalling leaves nothing of Bouquet but the retained claims."""
    job = yaml.safe_load(Path(release.cwd / "examples" / "gpu.yaml").read_text())
    job["metadata"] = {"name": "left-running", "namespace": namespace}
    job["spec"]["rounds"] = 50
    kubectl(e2e_cluster, "apply", "-f", "-", input=json.dumps(job))
    wait_for_round(e2e_cluster, namespace, "left-running", 1)

    def get(*args: str) -> dict:
        return json.loads(kubectl(e2e_cluster, "get", *args, "-o", "json").stdout)

    uid = get("fj", "left-running", "-n", namespace)["metadata"]["uid"]
    copy_before = get("secret", "left-running-tls", "-n", namespace)["metadata"]["uid"]
    record_before = get("secret", f"bouquet-job-{uid}", "-n", RELEASE_NAMESPACE)["data"]

    release.run(f"helm uninstall {RELEASE} -n {RELEASE_NAMESPACE} --wait --timeout 5m", timeout=400)
    wait_for(
        lambda: not kubectl(e2e_cluster, "get", "deployment,pods", "-n", RELEASE_NAMESPACE, "-o", "name").stdout.strip(),
        timeout=120,
        what="the operator gone",
    )
    assert get("crd", "federatedjobs.bouquet.dev")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert get("fj", "left-running", "-n", namespace)["metadata"]["uid"] == uid, "the job outlives the uninstall"
    assert get("secret", f"bouquet-job-{uid}", "-n", RELEASE_NAMESPACE)["data"] == record_before, "and so do its keys"

    [install] = [c for c in readme.commands("install") if c.startswith("helm install")]
    release.run(install, timeout=600)
    wait_for(
        lambda: job_status(e2e_cluster, namespace, "left-running").get("phase") == "Succeeded",
        timeout=600,
        interval=2,
        what="the job taken up by the new operator and carried on to the end",
    )
    taken_up = get("fj", "left-running", "-n", namespace)
    reconciled = [c for c in taken_up["status"]["conditions"] if c["type"] == "Reconciled"]
    assert [c["status"] for c in reconciled] == ["True"], taken_up["status"]["conditions"]
    assert taken_up["status"]["observedGeneration"] == taken_up["metadata"]["generation"]
    assert len(taken_up["status"]["model"]["sha256"]) == 64
    assert get("secret", "left-running-tls", "-n", namespace)["metadata"]["uid"] == copy_before, "the same keys, not new ones"

    # Installed to delete the CRD on uninstall: the records are then owned by the operator's
    # ServiceAccount (the new operator takes them over), and go with it.
    release.run(f"helm upgrade {RELEASE} charts/bouquet -n {RELEASE_NAMESPACE} --reuse-values --set crds.keep=false --wait", timeout=600)
    wait_for(
        lambda: get("secret", f"bouquet-job-{uid}", "-n", RELEASE_NAMESPACE)["metadata"].get("ownerReferences"),
        timeout=120,
        interval=2,
        what="the job's record owned by the operator's ServiceAccount",
    )
    release.run(f"helm uninstall {RELEASE} -n {RELEASE_NAMESPACE} --wait --timeout 5m", timeout=400)
    kinds = "deployments,replicasets,jobs,pods,services,secrets,configmaps,serviceaccounts,roles,rolebindings,networkpolicies"

    def remaining() -> list[str]:
        found = []
        for ns in (namespace, RELEASE_NAMESPACE):
            listed = kubectl(e2e_cluster, "get", kinds, "-n", ns, "-o", "name", check=False).stdout.split()
            # Every namespace has these of its own.
            found += [f"{ns}/{n}" for n in listed if n not in ("serviceaccount/default", "configmap/kube-root-ca.crt")]
        cluster_wide = kubectl(e2e_cluster, "get", "crd,clusterroles,clusterrolebindings", "-o", "name").stdout.split()
        # (The test cluster's own CoreDNS and kube-router have roles named bouquet:...)
        return found + [n for n in cluster_wide if "bouquet" in n and "coredns" not in n and "kube-router" not in n]

    wait_for(lambda: remaining() == [], timeout=180, interval=2, what=f"nothing of Bouquet left (still there: {remaining()})")
    claims = kubectl(e2e_cluster, "get", "pvc", "-n", namespace, "-o", "name").stdout.split()
    assert claims == ["persistentvolumeclaim/left-running-output"], "the job's retained claim stays"


def test_the_readmes_cluster_comes_up_and_goes_down_keeping_what_its_claims_hold(local_node, user, tmp_path):
    """`make cluster` and `make cluster-down` as the README types them, after the tests'
    own node went down: the host holds nothing of either cluster afterwards but the claims'
    data, where the README says."""
    if local_node is None:
        pytest.skip("the cluster under test is not this host's own: it is not taken down")
    local_node.down()
    left = leftovers(local_node.before, local_node.state)
    assert not left, f"down.sh left these behind on the host: {json.dumps(left, indent=1)}"
    kept = sorted(p.relative_to(local_node.claims) for p in local_node.claims.glob("default/gpu-output-*/model.safetensors"))
    assert len(kept) == 1, f"the gpu job's model is kept when its cluster goes down (found {kept})"

    before = host_state()
    up, down = readme.commands("local-cluster")
    started = time.monotonic()
    printed = user.run(up, timeout=1800)
    local_node.report(f"single-node cluster bring-up (make cluster, as the README types it): {time.monotonic() - started:.0f} s")
    exports = [line for line in printed.stdout.splitlines() if line.startswith("export ")]
    assert [line.split("=")[0] for line in exports] == ["export PATH", "export KUBECONFIG"], printed.stdout
    for line in exports:  # pasted, as the README says
        user.run(line)
    assert "v1.34." in user.run("kubectl version --client").stdout
    assert user.run("kubectl get deployment bouquet -n bouquet-system -o jsonpath={.status.readyReplicas}").stdout == "1"
    claims = Path("/var/lib/bouquet/claims/default")
    before_claims = set(claims.glob("kept-by-test-*")) if claims.exists() else set()
    writer = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "kept-by-test"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Mi"}}},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "writer"},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "write",
                            "image": "bouquet-workloads:0.1.0",
                            "command": ["sh", "-c", "echo trained > /claim/model.txt"],
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [{"name": "claim", "mountPath": "/claim"}],
                        }
                    ],
                    "volumes": [{"name": "claim", "persistentVolumeClaim": {"claimName": "kept-by-test"}}],
                },
            },
        ],
    }
    user.run(f"kubectl apply -f - <<'EOF'\n{json.dumps(writer)}\nEOF")
    user.run("kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/writer --timeout=3m", timeout=240)
    try:
        user.run(down, timeout=600)
        new = set(claims.glob("kept-by-test-*")) - before_claims
        assert len(new) == 1 and (new.pop() / "model.txt").read_text() == "trained\n"
        left = leftovers(before, Path("/tmp/bouquet-cluster"))
        assert not left, f"make cluster-down left these behind on the host: {json.dumps(left, indent=1)}"
        assert not Path("/tmp/bouquet-cluster").exists()
    finally:
        for folder in set(claims.glob("kept-by-test-*")) - before_claims:
            shutil.rmtree(folder)
