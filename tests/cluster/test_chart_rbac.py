"""The chart's RBAC is enough, and no more than the operator needs: the operator here
authenticates as the chart's ServiceAccount (a token from the API server's TokenRequest),
bound to the ClusterRole or the Roles `helm template` renders (installed cluster-wide, or
with watchNamespaces), and takes a job from apply to Succeeded to deletion; what it must not
do, the real API server refuses it."""

from __future__ import annotations

import base64
import subprocess

import pytest
import yaml

from bouquet_workloads import progress
from support.cluster import ROOT, Operator, apply_job, condition, event_reasons, get_job, kubectl
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


@pytest.fixture
def install_rbac(cluster):
    """Applies the chart's ServiceAccount and RBAC objects as `helm template` renders them
    (with values), and deletes them afterwards: the control plane is the whole session's."""
    applied: list[dict] = []

    def install(helm: str, *values: str) -> list[dict]:
        wanted = _chart_rbac(cluster, helm, *values)
        applied.extend(wanted)
        return wanted

    yield install
    for obj in applied:
        namespace = ["-n", obj["metadata"]["namespace"]] if "namespace" in obj["metadata"] else []
        kubectl(cluster, "delete", obj["kind"].lower(), obj["metadata"]["name"], *namespace, "--wait=false", check=False)


def _chart_rbac(cluster: str, helm: str, *values: str) -> list[dict]:
    args = [helm, "template", "bouquet", str(CHART), "--namespace", "bouquet-system"]
    args += ["--set", "dashboards.enabled=false", "--set", "admission.enabled=false"]
    for value in values:
        args += ["--set-json", value]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rbac = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    wanted = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in rbac]
    kubectl(cluster, "create", "namespace", "bouquet-system", check=False)
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all(wanted))
    return wanted


def take_a_job_through(
    cluster, client, namespace, server_identity, operator_kubeconfig: str, namespaces: list[str] | None = None, records_owned: bool = False
) -> None:
    """As the chart's ServiceAccount: a job from apply to Running, a site withdrawn, the job
    Succeeded and deleted by its time to live; no request of the operator's refused.
    records_owned: installed with crds.keep=false, so the jobs' records are owned by the
    operator's ServiceAccount (started with --own-service-account, as the chart starts it)."""
    operator = Operator(kubeconfig=operator_kubeconfig, namespaces=namespaces, account="bouquet" if records_owned else None).start()
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
        record = client.get("v1", "Secret", "bouquet-system", f"bouquet-job-{running['metadata']['uid']}")
        if records_owned:
            # The job's keys are in its record, owned by the operator's ServiceAccount: uninstalling
            # the chart (and with it the CRD and the jobs) removes them with it.
            account = client.get("v1", "ServiceAccount", "bouquet-system", "bouquet")
            assert [(o["kind"], o["name"], o["uid"]) for o in record["metadata"]["ownerReferences"]] == [
                ("ServiceAccount", "bouquet", account["metadata"]["uid"])
            ]
        else:
            # Kept with the CRD and the jobs on uninstall: the record lives as long as its job.
            assert "ownerReferences" not in record["metadata"], record["metadata"]
        # The operator may not read even the copies it made.
        refused = kubectl(operator_kubeconfig, "get", "secret", "-n", namespace, f"{name}-tls", check=False)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused.stderr
        # A site withdrawn mid-run: its Job and key Secret deleted with the chart's rules.
        kubectl(cluster, "patch", "fj", name, "-n", namespace, "--type=json", "-p", '[{"op":"remove","path":"/spec/sites/2"}]')
        gone = (("batch/v1", "Job", f"{name}--hospital-c"), ("v1", "Secret", f"{name}--hospital-c-key"))
        wait_for(
            lambda: all(client.get(*kind, namespace, child) is None for *kind, child in gone),
            timeout=30,
            what="hospital-c's Job and key deleted",
        )
        model = {"path": "/model.safetensors", "sizeBytes": 1, "sha256": "00" * 32}
        progress.apply(server_identity(namespace, name), namespace, name, {"state": "Succeeded", "round": 10, "model": model})
        wait_for(lambda: get_job(client, namespace, name) is None, timeout=60, what="Succeeded, then deleted by ttlSecondsAfterFinished")
        reasons = event_reasons(cluster, namespace, name)
        assert {"Running", "SiteRemoved", "TrainingComplete", "Deleted"} <= set(reasons), reasons
        assert "ReconcileFailed" not in reasons, "no request was refused"
        # The job's record (its keys, in the operator's namespace) goes with it.
        wait_for(
            lambda: not client.list("v1", "Secret", "bouquet-system", f"bouquet.dev/job-namespace={namespace},bouquet.dev/job-name={name}"),
            timeout=30,
            what="the deleted job's record gone",
        )
    finally:
        operator.stop()


def refused(kubeconfig: str, *args: str) -> str:
    """What the API server answers kubectl ARGS, which must be refused as Forbidden."""
    done = kubectl(kubeconfig, *args, check=False)
    assert done.returncode != 0 and "forbidden" in done.stderr.lower(), (args, done.stdout, done.stderr)
    return done.stderr


def test_installed_cluster_wide_the_operator_works_and_reads_no_secret_it_did_not_make(
    cluster, client, kubelet, helm, namespace, server_identity, tmp_path, install_rbac
):
    wanted = install_rbac(helm, "crds.keep=false")
    # The operator's account, its ClusterRole and binding, a Role and binding in each of
    # default and kube-system (where the API server's and the DNS's endpoints are listed),
    # and one in its own namespace (the jobs' records, and with crds.keep=false the account
    # itself, which owns them).
    assert sorted((d["kind"], d["metadata"].get("namespace", "")) for d in wanted) == [
        ("ClusterRole", ""),
        ("ClusterRoleBinding", ""),
        ("Role", "bouquet-system"),
        ("Role", "default"),
        ("Role", "kube-system"),
        ("RoleBinding", "bouquet-system"),
        ("RoleBinding", "default"),
        ("RoleBinding", "kube-system"),
        ("ServiceAccount", "bouquet-system"),
    ]
    kubeconfig = service_account_kubeconfig(cluster, client, "bouquet-system", "bouquet", tmp_path / "operator.kubeconfig")
    whoami = kubectl(kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
    assert whoami == "system:serviceaccount:bouquet-system:bouquet"
    kubectl(cluster, "create", "secret", "generic", "hospital-db", "-n", namespace, "--from-literal=password=s3cret")
    refused(kubeconfig, "get", "secret", "hospital-db", "-n", namespace)
    refused(kubeconfig, "get", "secrets", "-n", namespace)
    refused(kubeconfig, "get", "secrets", "--all-namespaces")
    # A patch answers with the object: refused too, even one that changes nothing.
    refused(kubeconfig, "patch", "secret", "hospital-db", "-n", namespace, "--type=merge", "-p", "{}")
    take_a_job_through(cluster, client, namespace, server_identity, kubeconfig, records_owned=True)


def test_installed_for_some_namespaces_the_operator_works_there_and_nowhere_else(
    cluster, client, kubelet, helm, namespace, server_identity, tmp_path, install_rbac
):
    install_rbac(helm, f'watchNamespaces=["{namespace}"]')
    # Installed to keep the CRD on uninstall (the default): the account may not even read itself.
    account = "system:serviceaccount:bouquet-system:bouquet"
    refused_account = kubectl(
        cluster, "auth", "can-i", "get", "serviceaccount/bouquet", "-n", "bouquet-system", "--as", account, check=False
    )
    assert refused_account.stdout.strip() == "no", refused_account.stdout
    kubeconfig = service_account_kubeconfig(cluster, client, "bouquet-system", "bouquet", tmp_path / "operator.kubeconfig")
    other = f"{namespace}-other"
    kubectl(cluster, "create", "namespace", other)
    try:
        kubectl(cluster, "create", "secret", "generic", "hospital-db", "-n", other, "--from-literal=password=s3cret")
        refused(kubeconfig, "get", "secret", "hospital-db", "-n", other)
        refused(kubeconfig, "get", "secret", "hospital-db", "-n", namespace)  # a watched one: no reading either
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "operator-was-here", "namespace": other},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "bouquet", "namespace": "bouquet-system"}],
        }
        done = kubectl(kubeconfig, "create", "-f", "-", input=yaml.safe_dump(binding), check=False)
        assert done.returncode != 0 and "forbidden" in done.stderr.lower(), done.stderr
        refused(kubeconfig, "get", "federatedjobs", "-n", other)
        refused(kubeconfig, "create", "deployment", "x", "-n", other, "--image=bouquet-workloads:0.1.0")
        take_a_job_through(cluster, client, namespace, server_identity, kubeconfig, namespaces=[namespace])
    finally:
        kubectl(cluster, "delete", "namespace", other, "--wait=false", check=False)


def test_a_jobs_server_may_do_nothing_but_report_its_own_jobs_status(cluster, client, namespace, operator, as_user):
    """The RBAC the operator makes for a job's server: get and patch of that job's status, and
    nothing else (not another job's status, not the job itself, no Secret)."""
    apply_job(cluster, namespace, ROOT / "examples" / "breast-cancer.yaml")
    wait_for(lambda: client.get("rbac.authorization.k8s.io/v1", "RoleBinding", namespace, "breast-cancer-server"), what="the server's RBAC")
    account = f"system:serviceaccount:{namespace}:breast-cancer-server"
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}}
    answer = as_user(account).request("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", body=review)
    # Besides what every authenticated user may (ask what it may do).
    rules = [r for r in answer["status"]["resourceRules"] if not any(x.startswith("selfsubject") for x in r.get("resources", []))]
    assert rules == [
        {"verbs": ["get", "patch"], "apiGroups": ["bouquet.dev"], "resources": ["federatedjobs/status"], "resourceNames": ["breast-cancer"]}
    ], rules
    for verb, resource in (("get", "federatedjobs/breast-cancer"), ("patch", "federatedjobs/other"), ("get", "secrets"), ("list", "pods")):
        answer = kubectl(cluster, "auth", "can-i", verb, resource, "-n", namespace, f"--as={account}", check=False).stdout.strip()
        assert answer == "no", (verb, resource, answer)
