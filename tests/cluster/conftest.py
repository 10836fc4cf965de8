"""A real control plane for the operator's tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler from scripts/cluster (built from the upstream Go
modules), two nodes reported by support.kubelet, the FederatedJob CRD, and the operator run
by kopf's KopfRunner in this process."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from bouquet import kube
from support.cluster import ROOT, Operator, kubectl
from support.kubelet import Kubelet, wait_for
from support.processes import processes_mentioning

SCRIPTS = ROOT / "scripts" / "cluster"
NODES = {"cpu-node": {}, "gpu-node": {"nvidia.com/gpu": "2"}}


def _api_client(kubeconfig: str, impersonate: str | None = None):
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    api_client = k8s.ApiClient(configuration)
    if impersonate:
        api_client.set_default_header("Impersonate-User", impersonate)
    return api_client


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The kubeconfig of a control plane of its own for this test session."""
    state = tmp_path_factory.mktemp("cluster")
    up = subprocess.run(["bash", str(SCRIPTS / "up.sh"), str(state)], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(
            f"the test control plane did not come up (scripts/cluster/up.sh, exit {up.returncode}):\n{up.stderr[-4000:]}", pytrace=False
        )
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("export KUBECONFIG=")
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kubeconfig
    try:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(ROOT / "crds" / "federatedjob.yaml"))
        # The operator's own namespace, where it keeps the jobs' records (keep.py).
        kubectl(kubeconfig, "create", "namespace", "bouquet-system")
        # kubectl wait fails at once ("accessor error: <nil>") on a CRD whose status has no
        # conditions yet, as one just created may not: it is given a few tries.
        for _attempt in range(5):
            established = kubectl(
                kubeconfig, "wait", "--for=condition=Established", "crd/federatedjobs.bouquet.dev", "--timeout=60s", check=False
            )
            if established.returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the FederatedJob CRD was not established: {established.stderr}", pytrace=False)
        yield kubeconfig
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), str(state)], capture_output=True, text=True)
        assert down.returncode == 0, f"scripts/cluster/down.sh failed:\n{down.stderr}"
        assert not state.exists(), "down.sh removes the cluster's state"
        assert processes_mentioning(str(state)) == [], "down.sh stops every process the cluster started"


@pytest.fixture(scope="session")
def client(cluster) -> kube.Client:
    return kube.Client(_api_client(cluster))


@pytest.fixture(scope="session")
def kubelet(client):
    nodes = Kubelet(client, NODES).start()
    # The node lifecycle controller lifts the not-ready taint once it sees the nodes Ready.
    wait_for(
        lambda: all(not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints", [])) for n in _nodes(client)),
        timeout=60,
        what="the nodes to lose their not-ready taint",
    )
    yield nodes
    nodes.stop()
    assert nodes.errors == [], nodes.errors


def _nodes(client: kube.Client) -> list[dict]:
    return [n for n in client.request("GET", "/api/v1/nodes")["items"] if n["metadata"]["name"] in NODES]


@pytest.fixture
def namespace(client, cluster):
    """A namespace of the test's own, removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    client.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    kubectl(cluster, "delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(cluster, kubelet):
    running = Operator().start()
    yield running
    running.stop()


@pytest.fixture
def server_identity(cluster):
    """An API client that is the job's server: its pod's service account."""

    def make(namespace: str, job_name: str):
        return _api_client(cluster, impersonate=f"system:serviceaccount:{namespace}:{job_name}-server")

    return make


@pytest.fixture
def as_user(cluster):
    """A client of the API server that is the given user (impersonated by the admin); for a
    service account, with its groups, as a token of its own would give."""

    def make(user: str) -> kube.Client:
        return kube.Client(_api_client(cluster, impersonate=user))

    return make
