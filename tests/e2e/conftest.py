"""End to end on a real cluster: real Pods from Bouquet's images train on a kubelet with
containerd, the operator installed with the Helm chart, Debian's Prometheus scraping them.

The cluster is the one BOUQUET_E2E_KUBECONFIG names (`make e2e` passes $KUBECONFIG, `make
e2e-kind` a kind cluster's), or else a single-node cluster of this host's own, brought up
with `scripts/cluster/up.sh --node` (root only) and taken down at the end, when the host
must hold no process, mount, network interface or iptables rule of it. Its images must be
there: the local node loads them itself; `make e2e-kind` loads them into kind."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from support import readme
from support.cluster import ROOT, kubectl
from support.e2e import RELEASE, RELEASE_NAMESPACE, host_state, leftovers
from support.prometheus import Prometheus

SCRIPTS = ROOT / "scripts" / "cluster"
GPU_LABEL = "bouquet.dev/gpu"


def report(config, line: str) -> None:
    """A line on the terminal, past pytest's capture of the test's output."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(line, flush=True)


class LocalNode:
    """The single-node cluster of scripts/cluster/up.sh --node in a state folder; what its
    claims hold is kept in a folder of the test session's own when it goes down."""

    def __init__(self, state: Path, claims: Path, config) -> None:
        self.state, self.claims, self.config = state, claims, config
        self.kubeconfig = str(state / "kubeconfig")
        self.exports: list[str] = []  # the lines up.sh prints for the user to paste
        self.env = {**os.environ, "BOUQUET_CLAIMS_DIR": str(claims)}

    def up(self, what: str) -> float:
        started = time.monotonic()
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh"), "--node", str(self.state)], capture_output=True, text=True, env=self.env)
        self.exports = [line for line in up.stdout.splitlines() if line.startswith("export ")]
        seconds = time.monotonic() - started
        if up.returncode != 0:
            pytest.fail(
                f"the single-node cluster did not come up (scripts/cluster/up.sh --node, exit {up.returncode}):\n{up.stderr[-5000:]}",
                pytrace=False,
            )
        built = [
            line
            for line in up.stderr.splitlines()
            if line.startswith(("Building", "Loading bouquet-", "Compiling", "Making", "Collecting"))
        ]
        kind = "cold: " + "; ".join(built) if built else "warm: nothing built or loaded"
        report(self.config, f"\nsingle-node cluster bring-up ({what}, {kind}): {seconds:.0f} s")
        return seconds

    def report(self, line: str) -> None:
        report(self.config, line)

    def down(self) -> None:
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), str(self.state)], capture_output=True, text=True, env=self.env)
        assert down.returncode == 0, f"scripts/cluster/down.sh failed:\n{down.stderr}"
        assert not self.state.exists(), "down.sh removes the cluster's state"


@pytest.fixture(scope="session")
def local_node(request, tmp_path_factory):
    """The host's own single-node cluster, or None when the tests run on a given cluster."""
    if os.environ.get("BOUQUET_E2E_KUBECONFIG"):
        yield None
        return
    if os.geteuid() != 0:
        pytest.fail(
            "the end-to-end tests bring up a node of this host (containerd, kubelet, iptables) and need root; "
            "or point BOUQUET_E2E_KUBECONFIG at a cluster that has Bouquet's images",
            pytrace=False,
        )
    before = host_state()
    work = tmp_path_factory.mktemp("node")
    node = LocalNode(work / "cluster", work / "claims", request.config)
    node.up("first")
    node.before = before
    yield node
    if node.state.exists():
        node.down()
        left = leftovers(before, node.state)
        assert not left, f"the node left these behind on the host: {json.dumps(left, indent=1)}"


@pytest.fixture(scope="session")
def e2e_cluster(local_node) -> str:
    """The kubeconfig of the cluster under test."""
    return local_node.kubeconfig if local_node else os.environ["BOUQUET_E2E_KUBECONFIG"]


@pytest.fixture(scope="session")
def gpu_node(e2e_cluster) -> str:
    """The node labelled bouquet.dev/gpu, with nvidia.com/gpu in its capacity (added here
    when no device plugin put it there: there is no accelerator in these tests)."""
    nodes = json.loads(kubectl(e2e_cluster, "get", "nodes", "-l", f"{GPU_LABEL}=true", "-o", "json").stdout)["items"]
    assert nodes, f"the cluster has no node labelled {GPU_LABEL}=true (kind-config.yaml and scripts/cluster/node.sh label one)"
    node = nodes[0]
    if "nvidia.com/gpu" not in node["status"].get("capacity", {}):
        patch = json.dumps({"status": {"capacity": {"nvidia.com/gpu": "2"}}})
        kubectl(e2e_cluster, "patch", "node", node["metadata"]["name"], "--subresource", "status", "--type", "merge", "-p", patch)
    return node["metadata"]["name"]


@pytest.fixture(scope="session")
def user(local_node, e2e_cluster, tmp_path_factory) -> readme.Session:
    """A user's shell at the root of a fresh copy of the checkout, with what the README tells
    them to set: the lines `make cluster` prints pasted (KUBECONFIG, and PATH with the
    cluster's kubectl and helm), and bin/ on PATH for `bouquet`."""
    session = readme.Session(readme.fresh_clone(tmp_path_factory.mktemp("user") / "bouquet"), readme.user_environment())
    for line in local_node.exports if local_node else [f"export KUBECONFIG={e2e_cluster}"]:
        session.run(line)
    session.run(readme.commands("bouquet-command")[0])
    return session


@pytest.fixture(scope="session")
def release(user, e2e_cluster):
    """The chart installed as the README says: its install block, as written."""
    try:
        user.run_block("install", timeout=1800)
    except AssertionError as error:
        pods = kubectl(e2e_cluster, "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide", check=False).stdout
        logs = kubectl(e2e_cluster, "logs", "-n", RELEASE_NAMESPACE, "deployment/bouquet", "--tail=50", check=False)
        pytest.fail(f"{error}\n{pods}\n{logs.stdout}{logs.stderr}", pytrace=False)
    yield user
    if user.run(f"helm status {RELEASE} --namespace {RELEASE_NAMESPACE}", check=False).returncode == 0:
        user.run(f"helm uninstall {RELEASE} --namespace {RELEASE_NAMESPACE} --wait", check=False)


@pytest.fixture
def namespace(e2e_cluster):
    """A namespace of the test's own, deleted afterwards (its retained claims with it)."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl(e2e_cluster, "create", "namespace", name)
    yield name
    kubectl(e2e_cluster, "delete", "namespace", name, "--wait=false", check=False)


class PodTargets(threading.Thread):
    """Prometheus' Kubernetes discovery, which Debian's build of Prometheus leaves out: every
    2 s, the address of each Running Pod's port named `metrics`, written to a file that
    Prometheus' file discovery watches."""

    def __init__(self, kubeconfig: str, path: Path) -> None:
        super().__init__(daemon=True)
        self.kubeconfig, self.path = kubeconfig, path
        self.stopped = threading.Event()
        self.refresh()

    def refresh(self) -> None:
        listed = kubectl(self.kubeconfig, "get", "pods", "--all-namespaces", "-o", "json", check=False)
        if listed.returncode:
            return  # the cluster is away (taken down and up again): keep the last targets
        targets = [
            {"targets": [f"{pod['status']['podIP']}:{port['containerPort']}"], "labels": {"pod": pod["metadata"]["name"]}}
            for pod in json.loads(listed.stdout)["items"]
            if pod["status"].get("phase") == "Running" and pod["status"].get("podIP")
            for container in pod["spec"]["containers"]
            for port in container.get("ports", [])
            if port.get("name") == "metrics"
        ]
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(targets))
        partial.replace(self.path)

    def run(self) -> None:
        while not self.stopped.wait(2):
            self.refresh()


@pytest.fixture(scope="session")
def prometheus(e2e_cluster, tmp_path_factory):
    """Debian's Prometheus on this host, scraping every Pod port named `metrics` (the job
    servers' and the operator's) at the Pod's address, as a Prometheus in the cluster would."""
    workdir = tmp_path_factory.mktemp("prometheus")
    targets = PodTargets(e2e_cluster, workdir / "pods.json")
    targets.start()
    server = Prometheus(
        workdir,
        scrape_configs=[{"job_name": "bouquet-pods", "honor_labels": True, "file_sd_configs": [{"files": [str(targets.path)]}]}],
    )
    yield server
    targets.stopped.set()
    server.stop()
