"""Helpers for the tests against the real control plane (tests/cluster)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from bouquet import kube

ROOT = Path(__file__).resolve().parents[2]


def kubectl(kubeconfig: str, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, input=input, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def apply_job(cluster: str, namespace: str, job: dict | Path) -> dict:
    """kubectl apply of a job (a file or a dict) into namespace; returns it as stored."""
    document = yaml.safe_load(job.read_text()) if isinstance(job, Path) else job
    document = {**document, "metadata": {**document["metadata"], "namespace": namespace}}
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(document))
    return json.loads(kubectl(cluster, "get", "federatedjob", document["metadata"]["name"], "-n", namespace, "-o", "json").stdout)


def get_job(client: kube.Client, namespace: str, name: str) -> dict | None:
    return client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, name)


def condition(job: dict | None, kind: str) -> dict:
    return next((c for c in (job or {}).get("status", {}).get("conditions", []) if c["type"] == kind), {})
