"""Bouquet as its users meet it: the Helm chart installed, `kubectl apply` of a job, real
Pods training until the job is Succeeded, the model read back from its claim, the round
metrics from Prometheus, two namespaces standing in for two hospitals' clusters, a site
on a GPU node, a server Pod deleted mid-run, and `helm uninstall`.

The tests run in the order written: the last ones uninstall the chart and take the local
node down."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass

import pytest
import safetensors.numpy
import torch
import yaml

from bouquet import jobfile
from bouquet_workloads import datasets
from bouquet_workloads.task import build_model, evaluate, load_arrays
from support.cluster import ROOT, kubectl
from support.dashboards import empty_panels
from support.e2e import RELEASE, RELEASE_NAMESPACE, diagnose, host_state, job_status, leftovers, read_claim, wait_for_round
from support.kubelet import wait_for

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
MULTI_CLUSTER = ROOT / "examples" / "multi-cluster"
GPU_EXAMPLE = ROOT / "examples" / "gpu.yaml"
FINISH_TIMEOUT = 900


def wait_succeeded(kubeconfig: str, namespace: str, name: str) -> None:
    """`kubectl wait --for=condition=Succeeded`, as a user would; the namespace's state on failure."""
    waited = kubectl(
        kubeconfig,
        "wait",
        "-n",
        namespace,
        f"fj/{name}",
        "--for=condition=Succeeded",
        f"--timeout={FINISH_TIMEOUT}s",
        check=False,
        timeout=FINISH_TIMEOUT + 30,
    )
    assert waited.returncode == 0, f"job {namespace}/{name} did not succeed: {waited.stderr}\n{diagnose(kubeconfig, namespace)}"


def server_pods(kubeconfig: str, namespace: str, job: str) -> list[dict]:
    selector = f"bouquet.dev/job={job},app.kubernetes.io/component=server"
    return json.loads(kubectl(kubeconfig, "get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]


@dataclass
class ExampleRun:
    namespace: str
    status: dict
    empty_training_panels: list[str]
    empty_operator_panels: list[str]
    round_mid_run: float | None
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def example_run(e2e_cluster, release, prometheus) -> ExampleRun:
    """examples/breast-cancer.yaml applied with kubectl and trained to the end; Prometheus
    and the dashboards asked while it runs, the claim read once it is done."""
    namespace = f"e2e-example-{int(time.time()) % 100000}"
    kubectl(e2e_cluster, "create", "namespace", namespace)
    kubectl(e2e_cluster, "apply", "-n", namespace, "-f", str(EXAMPLE))
    try:
        wait_for_round(e2e_cluster, namespace, "breast-cancer", 2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, namespace)}") from None
    # Mid-run: the server Pod is up and Prometheus scrapes it (its series end when the Pod
    # does, once the job is done).
    training = empty_panels(prometheus, "training", timeout=120)
    operator = empty_panels(prometheus, "operator", timeout=60)
    mid_run = prometheus.value(f'bouquet_job_current_round{{namespace="{namespace}", job_name="breast-cancer"}}')
    wait_succeeded(e2e_cluster, namespace, "breast-cancer")
    status = job_status(e2e_cluster, namespace, "breast-cancer")
    files = read_claim(e2e_cluster, namespace, "breast-cancer-output", ["model.safetensors", "model.json", "history.json"])
    yield ExampleRun(namespace, status, training, operator, mid_run, files)
    kubectl(e2e_cluster, "delete", "namespace", namespace, "--wait=false", check=False)


def test_chart_runs_the_operator(e2e_cluster, release):
    deployment = json.loads(kubectl(e2e_cluster, "get", "deployment", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json").stdout)
    assert deployment["status"].get("readyReplicas") == 1
    crd = kubectl(
        e2e_cluster, "get", "crd", "federatedjobs.bouquet.dev", "-o", "jsonpath={.metadata.labels.app\\.kubernetes\\.io/managed-by}"
    )
    assert crd.stdout == "Helm"


def test_example_job_succeeds_with_every_round_once(example_run):
    status = example_run.status
    assert status["phase"] == "Succeeded"
    assert status["progress"]["round"] == 10
    history = json.loads(example_run.files["history.json"])
    assert [entry["round"] for entry in history] == list(range(1, 11))
    for entry in history:
        assert sorted(entry["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]


def test_weights_read_back_from_the_claim_score_on_the_held_out_split(example_run):
    weights = example_run.files["model.safetensors"]
    info = json.loads(example_run.files["model.json"])
    assert hashlib.sha256(weights).hexdigest() == info["sha256"] == example_run.status["progress"]["model"]["sha256"]
    spec = jobfile.load(EXAMPLE)["spec"]
    model = build_model(spec["task"], len(info["features"]), seed=0)
    load_arrays(model, safetensors.numpy.load(weights))
    held_out = datasets.split(spec["dataset"], [s["name"] for s in spec["sites"]], spec["seed"]).test
    accuracy = evaluate(model, held_out, torch.device("cpu"))["accuracy"]
    assert accuracy >= 0.93, f"the model from the claim scores {accuracy:.4f} on the held-out split"
    assert accuracy == pytest.approx(info["metrics"]["accuracy"])


def test_prometheus_scrapes_the_server_and_the_operator(example_run):
    assert example_run.round_mid_run is not None and 2 <= example_run.round_mid_run <= 10
    assert example_run.empty_training_panels == [], "training dashboard panels without data mid-run"
    assert example_run.empty_operator_panels == [], "operator dashboard panels without data"


def test_server_only_and_sites_only_jobs_in_two_namespaces(e2e_cluster, release, tmp_path):
    """examples/multi-cluster/rehearsal.yaml's commands, as written there: the aggregator's
    job in one namespace, the hospitals' in another, which has only the CA."""
    try:
        kubectl(e2e_cluster, "create", "namespace", "aggregator")
        kubectl(e2e_cluster, "apply", "-f", str(MULTI_CLUSTER / "aggregator.yaml"))
        wait_for(
            lambda: kubectl(e2e_cluster, "get", "secret", "breast-cancer-tls", "-n", "aggregator", check=False).returncode == 0,
            timeout=120,
            interval=1,
            what="the server's TLS Secret",
        )
        ca = kubectl(e2e_cluster, "get", "secret", "breast-cancer-tls", "-n", "aggregator", "-o", "jsonpath={.data.ca\\.crt}").stdout
        (tmp_path / "ca.crt").write_bytes(base64.b64decode(ca))
        kubectl(e2e_cluster, "create", "namespace", "hospital-a")
        kubectl(e2e_cluster, "create", "secret", "generic", "breast-cancer-ca", "-n", "hospital-a", f"--from-file={tmp_path / 'ca.crt'}")
        kubectl(e2e_cluster, "apply", "-f", str(MULTI_CLUSTER / "rehearsal.yaml"))
        wait_succeeded(e2e_cluster, "aggregator", "breast-cancer")
        wait_succeeded(e2e_cluster, "hospital-a", "breast-cancer")
        assert job_status(e2e_cluster, "aggregator", "breast-cancer")["progress"]["round"] == 10
        # Only the server ran in the one namespace, only the sites in the other.
        assert kubectl(e2e_cluster, "get", "jobs", "-n", "aggregator", "-o", "name").stdout.split() == []
        assert kubectl(e2e_cluster, "get", "deployments", "-n", "hospital-a", "-o", "name").stdout.split() == []
        history = json.loads(read_claim(e2e_cluster, "aggregator", "breast-cancer-output", ["history.json"])["history.json"])
        assert [entry["round"] for entry in history] == list(range(1, 11))
        assert all(sorted(entry["sites"]) == ["hospital-a", "hospital-b"] for entry in history)
    finally:
        kubectl(e2e_cluster, "delete", "namespace", "aggregator", "hospital-a", "--wait=false", check=False)


def test_gpu_site_placed_on_gpu_node_and_server_pod_deleted_mid_run_resumes(e2e_cluster, release, namespace, gpu_node):
    """examples/gpu.yaml: the GPU site's Pod on the GPU node; its server Pod deleted
    mid-run, and the new one carrying on from the last checkpoint."""
    kubectl(e2e_cluster, "apply", "-n", namespace, "-f", str(GPU_EXAMPLE))
    try:
        wait_for_round(e2e_cluster, namespace, "gpu", 2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(e2e_cluster, namespace)}") from None

    site_pods = json.loads(kubectl(e2e_cluster, "get", "pods", "-n", namespace, "-l", "bouquet.dev/site=hospital-a", "-o", "json").stdout)[
        "items"
    ]
    assert site_pods, "no Pod of the GPU site"
    pod = site_pods[0]
    assert pod["spec"]["nodeName"] == gpu_node
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    (old,) = server_pods(e2e_cluster, namespace, "gpu")
    round_before = job_status(e2e_cluster, namespace, "gpu")["progress"]["round"]
    assert round_before < 6, "the run ended before its server Pod could be deleted"
    kubectl(e2e_cluster, "delete", "pod", "-n", namespace, old["metadata"]["name"], "--wait=false")

    def new_server_log() -> str:
        pods = [p for p in server_pods(e2e_cluster, namespace, "gpu") if p["metadata"]["uid"] != old["metadata"]["uid"]]
        if not pods:
            return ""
        logs = kubectl(e2e_cluster, "logs", "-n", namespace, pods[0]["metadata"]["name"], check=False)
        return logs.stdout if logs.returncode == 0 else ""

    wait_for(
        lambda: "from its checkpoint" in new_server_log(), timeout=300, interval=2, what="the new server Pod to resume from its checkpoint"
    )
    resumed_after = int(new_server_log().split("continuing after round ")[1].split()[0])
    assert resumed_after >= round_before
    wait_succeeded(e2e_cluster, namespace, "gpu")
    history = json.loads(read_claim(e2e_cluster, namespace, "gpu-output", ["history.json"])["history.json"])
    assert [entry["round"] for entry in history] == list(range(1, 7)), "every round exactly once"


def test_helm_uninstall_leaves_only_retained_claims(e2e_cluster, release, namespace):
    job = yaml.safe_load(GPU_EXAMPLE.read_text())
    job["metadata"] = {"name": "left-running", "namespace": namespace}
    job["spec"]["rounds"] = 50
    kubectl(e2e_cluster, "apply", "-f", "-", input=json.dumps(job))
    wait_for_round(e2e_cluster, namespace, "left-running", 1)

    uninstalled = release("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "5m")
    assert uninstalled.returncode == 0, uninstalled.stderr
    kinds = "deployments,replicasets,jobs,pods,services,secrets,configmaps,serviceaccounts,roles,rolebindings,networkpolicies"

    def remaining() -> list[str]:
        found = []
        for ns in (namespace, RELEASE_NAMESPACE):
            listed = kubectl(e2e_cluster, "get", kinds, "-n", ns, "-o", "name", check=False).stdout.split()
            # Every namespace has these of its own.
            found += [f"{ns}/{n}" for n in listed if n not in ("serviceaccount/default", "configmap/kube-root-ca.crt")]
        cluster_wide = kubectl(e2e_cluster, "get", "crd,clusterroles,clusterrolebindings", "-o", "name").stdout.split()
        return found + [n for n in cluster_wide if "bouquet" in n and "coredns" not in n]

    wait_for(lambda: remaining() == [], timeout=180, interval=2, what=f"nothing of Bouquet left (still there: {remaining()})")
    claims = kubectl(e2e_cluster, "get", "pvc", "-n", namespace, "-o", "name").stdout.split()
    assert claims == ["persistentvolumeclaim/left-running-output"], "the job's retained claim stays"


def test_cluster_down_leaves_nothing_and_comes_back_warm(local_node, request):
    if local_node is None:
        pytest.skip("the cluster under test is not this host's own: it is not taken down")
    local_node.down()
    left = leftovers(local_node.before, local_node.state)
    assert not left, f"down.sh left these behind on the host: {json.dumps(left, indent=1)}"
    before = host_state()
    local_node.up("second, after down.sh")
    ready = kubectl(local_node.kubeconfig, "get", "node", "bouquet-node", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
    assert ready.stdout == "True"
    local_node.down()
    left = leftovers(before, local_node.state)
    assert not left, f"down.sh left these behind on the host: {json.dumps(left, indent=1)}"
