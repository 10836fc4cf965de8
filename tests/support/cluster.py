"""Helpers for the tests against the real control plane (tests/cluster)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import yaml
from kopf.testing import KopfRunner

from bouquet import kube
from support.kubelet import wait_for
from support.prometheus import free_port

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def kubectl_binary() -> str:
    """The kubectl of the test cluster's release (scripts/cluster/build.sh), not the host's."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "build.sh")], capture_output=True, text=True)
    if built.returncode:
        raise AssertionError(f"kubectl could not be built (scripts/cluster/build.sh):\n{built.stderr[-3000:]}")
    return str(Path(built.stdout.strip().splitlines()[-1]) / "kubectl")


def kubectl(kubeconfig: str, *args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [kubectl_binary(), "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, input=input, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def apply_job(cluster: str, namespace: str, job: dict | Path) -> dict:
    """kubectl apply of a job (a file or a dict) into namespace; returns it as stored."""
    document = yaml.safe_load(job.read_text()) if isinstance(job, Path) else job
    document = {**document, "metadata": {**document["metadata"], "namespace": namespace}}
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(document))
    return json.loads(kubectl(cluster, "get", "federatedjob", document["metadata"]["name"], "-n", namespace, "-o", "json").stdout)


def event_reasons(cluster: str, namespace: str, name: str) -> list[str]:
    """The reasons of the Events about the object name in namespace, as kubectl lists them."""
    listed = kubectl(
        cluster, "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "jsonpath={.items[*].reason}"
    )
    return listed.stdout.split()


def get_job(client: kube.Client, namespace: str, name: str) -> dict | None:
    return client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, name)


def condition(job: dict | None, kind: str) -> dict:
    return next((c for c in (job or {}).get("status", {}).get("conditions", []) if c["type"] == kind), {})


def healthy(port: int) -> bool:
    """Whether the operator serving on port answers 200 on /healthz: every worker and its
    resync still running."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Operator:
    """The operator under KopfRunner; restartable, as a pod restart would."""

    def __init__(
        self, resync_seconds: float = 2.0, kubeconfig: str | None = None, namespaces: list[str] | None = None, account: str | None = None
    ) -> None:
        self.namespaces = namespaces  # to watch; None: every namespace
        self.port = free_port()
        self.env = {
            "BOUQUET_RESYNC_SECONDS": str(resync_seconds),
            # An operator that loses its Lease ends its process, here the tests' own: the Lease
            # is tested with operators in processes of their own (tests/cluster/test_leader.py).
            "BOUQUET_LEADER_ELECTION": "false",
            "BOUQUET_OPERATOR_PORT": str(self.port),
            "BOUQUET_OPERATOR_HOST": "127.0.0.1",
        }
        if namespaces:  # where its resync lists the jobs
            self.env["BOUQUET_NAMESPACES"] = ",".join(namespaces)
        if kubeconfig:  # another identity than the tests' own
            self.env["KUBECONFIG"] = kubeconfig
        if account:  # its ServiceAccount in bouquet-system, which owns the jobs' records
            self.env["BOUQUET_OWN_SERVICE_ACCOUNT"] = account
        self.runner: KopfRunner | None = None
        self.previous: dict[str, str | None] = {}

    def start(self) -> Operator:
        self.previous = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        scope = [f"--namespace={n}" for n in self.namespaces] if self.namespaces else ["--all-namespaces"]
        self.runner = KopfRunner(["run", "--standalone", *scope, "-m", "bouquet.controller"], timeout=60)
        self.runner.__enter__()
        wait_for(self.healthy, timeout=30, what="the operator's /healthz")
        return self

    def healthy(self) -> bool:
        return healthy(self.port)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.__exit__(None, None, None)
            runner, self.runner = self.runner, None
            for key, value in self.previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            assert runner.exception is None, runner.output
