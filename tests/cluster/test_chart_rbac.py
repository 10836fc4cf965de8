"""The chart's RBAC is enough, and is what the operator runs with: the operator here
authenticates as the chart's ServiceAccount (a token from the API server's TokenRequest),
bound to the ClusterRole `helm template` renders, and takes a job from apply to deletion."""

from __future__ import annotations

import base64
import subprocess

import yaml

from bouquet import progress
from support.cluster import ROOT, Operator, apply_job, condition, get_job, kubectl
from support.kubelet import wait_for

CHART = ROOT / "charts" / "bouquet"


def service_account_kubeconfig(cluster: str, client, namespace: str, account: str, path) -> str:
    """A kubeconfig that is the ServiceAccount: the cluster's address and CA, and a token."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    token = client.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body=request)["status"]["token"]
    admin = yaml.safe_load(open(cluster))
    cluster_entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": cluster_entry["name"], "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_operator_does_its_work_with_the_charts_rbac_alone(cluster, client, kubelet, helm, namespace, server_identity, tmp_path):
    rendered = subprocess.run(
        [
            helm,
            "template",
            "bouquet",
            str(CHART),
            "--namespace",
            "bouquet-system",
            "--set",
            "crds.enabled=false",
            "--set",
            "dashboards.enabled=false",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wanted = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    assert len(wanted) == 3
    kubectl(cluster, "create", "namespace", "bouquet-system", check=False)
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all(wanted))
    kubeconfig = service_account_kubeconfig(cluster, client, "bouquet-system", "bouquet", tmp_path / "operator.kubeconfig")
    whoami = kubectl(kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
    assert whoami == "system:serviceaccount:bouquet-system:bouquet"

    operator = Operator(kubeconfig=kubeconfig).start()
    try:
        job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
        job["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 2}
        apply_job(cluster, namespace, job)
        name = job["metadata"]["name"]
        running = wait_for(
            lambda: (j := get_job(client, namespace, name)) and condition(j, "Ready").get("status") == "True" and j,
            timeout=60,
            what="the job Running and Ready",
        )
        assert running["status"]["phase"] == "Running"
        secret = client.get("v1", "Secret", namespace, f"{name}-tls")
        assert base64.b64decode(secret["data"]["ca.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
        # A site withdrawn mid-run: its Job and key Secret deleted with the chart's rules.
        kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=json", "-p", '[{"op":"remove","path":"/spec/sites/2"}]')
        gone = (("batch/v1", "Job", f"{name}-hospital-c"), ("v1", "Secret", f"{name}-hospital-c-key"))
        wait_for(
            lambda: all(client.get(*kind, namespace, child) is None for *kind, child in gone),
            timeout=30,
            what="hospital-c's Job and key deleted",
        )
        model = {"path": "/model.safetensors", "sizeBytes": 1, "sha256": "00" * 32}
        progress.apply(server_identity(namespace, name), namespace, name, {"state": "Succeeded", "round": 10, "model": model})
        wait_for(lambda: get_job(client, namespace, name) is None, timeout=60, what="Succeeded, then deleted by ttlSecondsAfterFinished")
        reasons = kubectl(
            cluster,
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name}",
            "-o",
            "jsonpath={.items[*].reason}",
        )
        assert {"Running", "SiteRemoved", "TrainingComplete", "Deleted"} <= set(reasons.stdout.split()), reasons.stdout
        assert "ReconcileFailed" not in reasons.stdout, "no request was refused"
    finally:
        operator.stop()
