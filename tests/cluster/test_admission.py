"""Admission on a real API server: the chart's ValidatingAdmissionPolicies (as `helm template`
renders them) refuse FederatedJobs that name an image or a node folder the installation does
not allow, and pods, Jobs and Deployments that take a job's server or site labels without
being the job's; the operator makes no pod of a job whose NetworkPolicies cannot be made.

The policies' bindings are narrowed here to the test's own namespace (a label selector on
it), so that the other tests sharing this control plane are not held to them."""

from __future__ import annotations

import copy
import json
import subprocess
import time

import pytest
import yaml

from bouquet import kube
from support.cluster import ROOT, apply_job, kubectl
from support.kubelet import wait_for

CHART = ROOT / "charts" / "bouquet"
JOB = yaml.safe_load((ROOT / "examples" / "own-data.yaml").read_text())


def chart_policies(helm: str, *values: str) -> list[dict]:
    args = [helm, "template", "bouquet", str(CHART), "--namespace", "bouquet-system"]
    for value in values:
        args += ["--set-json", value]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    return [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in kinds]


@pytest.fixture
def admission(cluster, helm, namespace):
    """Installs the chart's policies, bound to `namespace` alone, with the given values;
    removes them afterwards."""
    installed: list[dict] = []

    def install(*values: str) -> None:
        kubectl(cluster, "label", "namespace", namespace, "bouquet.test/admission=on", "--overwrite")
        for policy in chart_policies(helm, *values):
            policy["metadata"]["name"] += f"-{namespace}"
            if policy["kind"] == "ValidatingAdmissionPolicyBinding":
                policy["spec"]["policyName"] += f"-{namespace}"
                policy["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
            kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(policy))
            installed.append(policy)

    yield install
    for policy in installed:
        kubectl(cluster, "delete", policy["kind"].lower(), policy["metadata"]["name"], "--wait=false", check=False)


def job(namespace: str, name: str, **spec) -> dict:
    document = copy.deepcopy(JOB)
    document["metadata"] = {"name": name, "namespace": namespace}
    document["spec"].update(spec)
    return document


def refusal(client: kube.Client, body: dict) -> str:
    """The API server's message refusing to create body, or '' if it was created."""
    meta = body["metadata"]
    try:
        client.create(body)
    except kube.ApiError as error:
        return str(error)
    client.delete(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])
    return ""


def test_jobs_may_name_only_the_allowed_images_and_node_folders(cluster, client, admission, namespace):
    admission('admission.allowedImages=["registry.example.org/fl"]', 'admission.allowedHostPaths=["/srv/bouquet"]')
    foreign = job(namespace, "foreign-image", server={"image": "docker.io/attacker/miner:1"})
    # Policies take effect once the API server has compiled them.
    wait_for(lambda: refusal(client, foreign), timeout=30, interval=0.5, what="the image policy in force")
    message = refusal(client, foreign)
    assert "spec.server.image docker.io/attacker/miner:1: not an image of the registries this cluster allows" in message, message
    assert "bouquet-workloads, registry.example.org/fl" in message, message
    # A registry's name must end where the image's does: no look-alike hosts.
    lookalike = job(
        namespace, "lookalike", app={"image": "registry.example.org.attacker.net/fl/app:1", "serverApp": "a:b", "clientApp": "a:c"}
    )
    lookalike["spec"].pop("task", None)
    assert "spec.app.image registry.example.org.attacker.net/fl/app:1" in refusal(client, lookalike)

    sites = copy.deepcopy(JOB["spec"]["sites"])
    sites[0]["data"]["hostPath"] = "/var/log/pods"
    logs = job(namespace, "node-logs", sites=sites)
    message = refusal(client, logs)
    assert (
        "spec.sites[hospital-a].data.hostPath /var/log/pods: not in a node folder this cluster allows sites to read (/srv/bouquet;"
        in message
    ), message
    sites[0]["data"]["hostPath"] = "/srv/bouquetx"  # a sibling of the allowed folder, not in it
    assert "/srv/bouquetx: not in a node folder" in refusal(client, job(namespace, "sibling", sites=sites))

    sites[0]["data"]["hostPath"] = "/srv/bouquet/hospital-a"
    allowed = job(namespace, "allowed", sites=sites, server={"image": "registry.example.org/fl/server:2"})
    assert refusal(client, allowed) == ""
    assert refusal(client, job(namespace, "defaults")) == "", "the workloads image is allowed"


def test_with_no_node_folder_allowed_no_site_reads_one(cluster, client, admission, namespace):
    admission()
    wait_for(lambda: refusal(client, job(namespace, "own-data")), timeout=30, interval=0.5, what="the policy in force")
    message = refusal(client, job(namespace, "own-data"))
    assert (
        "spec.sites[hospital-a].data.hostPath /srv/bouquet/hospital-a: not in a node folder this cluster allows sites to read (none;"
        in message
    )


def test_no_one_but_the_operator_and_its_controllers_makes_pods_with_a_jobs_labels(cluster, client, admission, namespace, as_user):
    """A job author who may create pods and Jobs in the namespace (edit rights) cannot give
    them a job's site or server labels, so cannot pass as a site to the job's NetworkPolicy."""
    admission()
    kubectl(cluster, "create", "serviceaccount", "author", "-n", namespace)
    kubectl(cluster, "create", "rolebinding", "author", "--clusterrole=edit", f"--serviceaccount={namespace}:author", "-n", namespace)
    author = as_user(f"system:serviceaccount:{namespace}:author")
    site_labels = {"bouquet.dev/job": "breast-cancer", "app.kubernetes.io/component": "site", "bouquet.dev/site": "hospital-a"}
    container = {"name": "main", "image": "bouquet-workloads:0.1.0", "command": ["sleep", "60"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "impostor", "namespace": namespace, "labels": site_labels}}
    pod["spec"] = {"containers": [container]}
    # Both the author's RoleBinding and the policy take effect a moment after they are made:
    # until then the refusal is RBAC's, or there is none.
    wait_for(lambda: "are for the pods of" in refusal(author, pod), timeout=30, interval=0.5, what="the labels policy in force")
    message = refusal(author, pod)
    assert (
        "Pod impostor: the labels bouquet.dev/job=breast-cancer and app.kubernetes.io/component=site are for the pods of FederatedJob"
        in message
    )
    assert f"system:serviceaccount:{namespace}:author may not make them" in message

    template = {
        "metadata": {"labels": {**site_labels, "app.kubernetes.io/component": "server"}},
        "spec": {"containers": [container], "restartPolicy": "Never"},
    }
    batch = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "impostor", "namespace": namespace},
        "spec": {"template": template},
    }
    assert "app.kubernetes.io/component=server are for the pods of FederatedJob breast-cancer" in refusal(author, batch)
    plain = {**pod, "metadata": {"name": "plain", "namespace": namespace, "labels": {"app": "mine"}}}
    assert refusal(author, plain) == "", "pods without a job's labels are the author's business"
    # Nor may an author relabel a pod of theirs as a site afterwards.
    author.create(plain)
    relabel = {"metadata": {"labels": site_labels}}
    with pytest.raises(kube.ApiError, match="may not make them"):
        author.request("PATCH", kube.path("v1", "Pod", namespace, "plain"), body=relabel, content_type=kube.MERGE)


def test_no_pod_of_a_job_is_made_while_its_network_policies_cannot_be(cluster, client, namespace, operator):
    """NetworkPolicies refused (here by an admission policy of the test's): the operator
    applies neither the server's Deployment nor a site's Job, and says why; once they can
    be made, everything is."""
    refuse = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": f"no-policies-{namespace}"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": ["networking.k8s.io"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["networkpolicies"]}
                ]
            },
            "validations": [{"expression": "false", "message": "no NetworkPolicy today"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": f"no-policies-{namespace}"},
        "spec": {
            "policyName": f"no-policies-{namespace}",
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }
    probe = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "probe", "namespace": namespace}}
    probe["spec"] = {"podSelector": {}}
    try:
        kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all([refuse, binding]))
        wait_for(lambda: refusal(client, probe), timeout=30, interval=0.5, what="NetworkPolicies refused")
        apply_job(cluster, namespace, ROOT / "examples" / "breast-cancer.yaml")

        def reasons() -> str:
            return kubectl(cluster, "get", "events", "-n", namespace, "-o", "jsonpath={.items[*].message}").stdout

        wait_for(lambda: "no NetworkPolicy today" in reasons(), timeout=60, interval=1, what="the operator to say why it is stuck")
        assert "cannot apply NetworkPolicy breast-cancer-server" in reasons()
        time.sleep(3)  # a few more reconciles
        assert client.list("apps/v1", "Deployment", namespace, "bouquet.dev/job=breast-cancer") == []
        assert client.list("batch/v1", "Job", namespace, "bouquet.dev/job=breast-cancer") == []
    finally:
        kubectl(cluster, "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", f"no-policies-{namespace}", check=False)
    wait_for(
        lambda: len(client.list("batch/v1", "Job", namespace, "bouquet.dev/job=breast-cancer")) == 3,
        timeout=120,
        interval=1,
        what="the server and the sites once their policies can be made",
    )
    assert {
        p["metadata"]["name"] for p in client.list("networking.k8s.io/v1", "NetworkPolicy", namespace, "bouquet.dev/job=breast-cancer")
    } == {
        "breast-cancer-server",
        "breast-cancer-sites",
    }
    assert len(client.list("apps/v1", "Deployment", namespace, "bouquet.dev/job=breast-cancer")) == 1
