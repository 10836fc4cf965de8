"""The Helm chart (charts/bouquet), rendered by a real helm for each values combination that
matters. Its RBAC is exercised by a real operator in tests/cluster/test_chart_rbac.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "bouquet"


def template(helm: str, *values: str, check: bool = True) -> list[dict] | subprocess.CompletedProcess:
    args = [helm, "template", "bouquet", str(CHART), "--namespace", "bouquet-system"]
    for value in values:
        args += ["--set-json" if value.split("=", 1)[1][:1] in "[{" else "--set", value]
    result = subprocess.run(args, capture_output=True, text=True)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(documents: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for d in documents:
        found.setdefault(d["kind"], []).append(d)
    return found


def test_helm_lint_is_clean(helm):
    result = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_the_default_install_watches_every_namespace(helm):
    kinds = by_kind(template(helm))
    assert sorted(kinds) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    # The only Roles: the jobs' records in the operator's own namespace, and reading where
    # the cluster DNS and the API server listen, for the jobs' NetworkPolicies.
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r["rules"] for r in kinds["Role"]}
    endpoints = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}]
    assert roles == {
        ("bouquet-system", "bouquet-records"): [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "patch", "delete"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": ["bouquet-operator"],
                "verbs": ["get", "update"],
            },
        ],
        ("default", "bouquet-cluster-network"): endpoints,
        ("kube-system", "bouquet-cluster-network"): endpoints,
    }
    # Everywhere else, Secrets are made and deleted, never read.
    [cluster_role] = kinds["ClusterRole"]
    assert [r["verbs"] for r in cluster_role["rules"] if "secrets" in r["resources"]] == [["create", "delete"]]
    [crd] = kinds["CustomResourceDefinition"]
    kept = crd["metadata"].pop("annotations")
    assert kept == {"helm.sh/resource-policy": "keep"}, "uninstalling leaves the CRD, and so every FederatedJob"
    assert crd == yaml.safe_load((ROOT / "crds" / "federatedjob.yaml").read_text()), "the chart's CRD is crds/federatedjob.yaml"
    [binding] = kinds["ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bouquet", "namespace": "bouquet-system"}]
    [deployment] = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["bouquet", "operator"]
    assert "--image=bouquet-workloads:0.1.0" in container["command"]
    assert not any(a.startswith("--namespace") for a in container["command"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_pods_meet_the_restricted_pod_security_standard(helm):
    [deployment] = by_kind(template(helm))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }


def test_listed_namespaces_get_a_role_each_and_no_cluster_role(helm):
    kinds = by_kind(template(helm, 'watchNamespaces=["hospital-a","hospital-b"]'))
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    roles = [r for r in kinds["Role"] if r["metadata"]["name"] == "bouquet"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["hospital-a", "hospital-b"]
    bindings = [b for b in kinds["RoleBinding"] if b["metadata"]["name"] == "bouquet"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["hospital-a", "hospital-b"]
    command = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert [a for a in command if a.startswith("--namespace")] == ["--namespace=hospital-a", "--namespace=hospital-b"]


def test_more_replicas_roll_one_at_a_time_and_keep_one_through_a_drain(helm):
    assert "PodDisruptionBudget" not in by_kind(template(helm)), "one replica: a budget would block every drain"
    kinds = by_kind(template(helm, "operator.replicas=2"))
    [deployment] = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    [budget] = kinds["PodDisruptionBudget"]
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_crd_can_be_left_to_someone_else(helm):
    kinds = by_kind(template(helm, "crds.enabled=false"))
    assert "CustomResourceDefinition" not in kinds
    command = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [a for a in command if a.startswith("--own-service-account")], "the jobs outlive the release: so do their records"


def test_the_crd_is_deleted_on_uninstall_only_when_asked_and_then_the_records_go_too(helm):
    kept = by_kind(template(helm))
    command = kept["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [a for a in command if a.startswith("--own-service-account")], "kept jobs keep their records"
    assert not [r for role in kept["Role"] for r in role["rules"] if "serviceaccounts" in r["resources"] and "get" in r["verbs"]]

    deleted = by_kind(template(helm, "crds.keep=false"))
    [crd] = deleted["CustomResourceDefinition"]
    assert "annotations" not in crd["metadata"]
    command = deleted["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--own-service-account=bouquet" in command, "the records are owned by the account the uninstall deletes"
    [records] = [r for r in deleted["Role"] if r["metadata"]["name"] == "bouquet-records"]
    assert {"apiGroups": [""], "resources": ["serviceaccounts"], "resourceNames": ["bouquet"], "verbs": ["get"]} in records["rules"]


def test_a_service_monitor_when_asked(helm):
    assert "ServiceMonitor" not in by_kind(template(helm))
    [monitor] = by_kind(template(helm, "metrics.serviceMonitor.enabled=true", 'metrics.serviceMonitor.labels={"release":"prom"}'))[
        "ServiceMonitor"
    ]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]


def test_only_the_releases_namespace_and_the_named_scrapers_reach_job_metrics(helm):
    def scrapers(*values: str) -> list:
        [deployment] = by_kind(template(helm, *values))["Deployment"]
        command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        [flag] = [a for a in command if a.startswith("--metrics-scrapers=")]
        return json.loads(flag.split("=", 1)[1])

    own = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "bouquet-system"}}}
    assert scrapers() == [own]
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app": "prometheus"}},
    }
    assert scrapers(f"metrics.scrapers={json.dumps([monitoring])}") == [own, monitoring]


def test_dashboards_are_config_maps_for_grafanas_sidecar(helm):
    maps = by_kind(template(helm))["ConfigMap"]
    assert sorted(m["metadata"]["name"] for m in maps) == ["bouquet-dashboard-operator", "bouquet-dashboard-training"]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(key, text)] = m["data"].items()
        assert json.loads(text)["uid"] == f"bouquet-{key.removesuffix('.json')}"
    assert "ConfigMap" not in by_kind(template(helm, "dashboards.enabled=false"))


@pytest.mark.parametrize(
    "value, field",
    [
        ("operator.workers=0", "workers"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("nonsense=1", "nonsense"),
        ('watchNamespaces=["Bad_Name"]', "watchNamespaces"),
    ],
)
def test_the_values_schema_rejects_bad_values_naming_them(helm, value, field):
    result = template(helm, value, check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def dashboard_metrics() -> set[str]:
    names = set()
    for path in (CHART / "files" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                names |= set(re.findall(r"\bbouquet_[a-z_]+", target["expr"]))
    return names


def test_every_metric_a_dashboard_queries_is_one_bouquet_exports(tmp_path):
    """The metric names (queries returning data from a real run is issue 4's end-to-end test)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bouquet.metrics import Metrics
    from bouquet_workloads import metrics, outputs

    outputs.write_json(
        tmp_path / outputs.HISTORY,
        [{"round": 1, "durationSeconds": 1.0, "sites": ["a"], "loss": 0.1, "accuracy": 0.9, "auroc": 0.9, "train": {"loss": 0.2}}],
    )
    outputs.write_json(tmp_path / outputs.PROGRESS, {"state": "Running", "round": 1, "rounds": 2})
    registry = CollectorRegistry()
    registry.register(metrics.JobCollector(tmp_path, "ns", "job"))
    exported = generate_latest(registry).decode() + generate_latest(Metrics(lambda: {}).registry).decode()
    series = {
        re.sub(r"_(bucket|count|sum)$", "", line.split("{")[0].split()[0]) for line in exported.splitlines() if line.startswith("bouquet_")
    }
    series |= {line.split("{")[0].split()[0] for line in exported.splitlines() if line.startswith("bouquet_")}
    assert dashboard_metrics() - series == set()


def test_the_admission_policies_carry_the_allowed_images_and_node_folders(helm):
    kinds = by_kind(template(helm, 'admission.allowedImages=["registry.example.org/fl/"]', 'admission.allowedHostPaths=["/srv/bouquet/"]'))
    policies = {p["metadata"]["name"]: p for p in kinds["ValidatingAdmissionPolicy"]}
    assert sorted(policies) == ["bouquet-federatedjobs", "bouquet-job-pods"]
    variables = {v["name"]: v["expression"] for v in policies["bouquet-federatedjobs"]["spec"]["variables"]}
    # The workloads image's repository always, trailing slashes dropped.
    assert json.loads(variables["images"]) == ["bouquet-workloads", "registry.example.org/fl"]
    assert json.loads(variables["hostPaths"]) == ["/srv/bouquet"]
    bindings = {b["spec"]["policyName"]: b["spec"]["validationActions"] for b in kinds["ValidatingAdmissionPolicyBinding"]}
    assert bindings == {"bouquet-federatedjobs": ["Deny"], "bouquet-job-pods": ["Deny"]}
    makers = next(v["expression"] for v in policies["bouquet-job-pods"]["spec"]["variables"] if v["name"] == "makers")
    assert "'system:serviceaccount:bouquet-system:bouquet'" in makers
    assert json.loads(by_kind(template(helm))["ValidatingAdmissionPolicy"][0]["spec"]["variables"][1]["expression"]) == []
    assert "ValidatingAdmissionPolicy" not in by_kind(template(helm, "admission.enabled=false"))


def test_a_host_path_allowed_must_be_a_plain_absolute_folder(helm):
    refused = template(helm, 'admission.allowedHostPaths=["/srv/../var/log"]', check=False)
    assert refused.returncode != 0 and "allowedHostPaths" in refused.stderr
