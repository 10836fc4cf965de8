"""render(job): every child object of a FederatedJob, as a pure function. Golden files hold
the full output for the examples; regenerate them after an intended change with
BOUQUET_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import base64
import copy
import os
from pathlib import Path

import pytest
import yaml

from bouquet import cli, jobfile, kubeyaml
from bouquet.identity import SiteKey
from bouquet.render import CLUSTER_DNS, GPU_TOLERATION, Destination, Settings, render
from bouquet.tls import Bundle

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


class AnySitesKey(dict):
    """Stands in for the keys the operator makes: every site has one, named after it."""

    def __contains__(self, site: object) -> bool:
        return True

    def __getitem__(self, site: str) -> SiteKey:
        return SiteKey(f"KEY of {site}".encode(), f"PUB of {site}\n".encode())


SETTINGS = Settings(image="bouquet-workloads:test", tls=Bundle(b"CA PEM", b"CERT PEM", b"KEY PEM"), site_keys=AnySitesKey())


def example(name: str) -> dict:
    job = jobfile.load(ROOT / "examples" / f"{name}.yaml")
    job["metadata"].setdefault("namespace", "hospitals")
    return job


def by_kind(children: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


@pytest.mark.parametrize("name", ["breast-cancer", "sleep-quality", "multi-cluster/aggregator", "multi-cluster/hospital-a"])
def test_examples_render_as_their_golden_files(name):
    rendered = render(example(name), SETTINGS)
    golden = GOLDEN / f"{name.replace('/', '-')}.yaml"
    if os.environ.get("BOUQUET_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump_all(rendered, sort_keys=False))
    assert rendered == list(yaml.safe_load_all(golden.read_text()))


def test_render_is_pure():
    job = example("breast-cancer")
    before = copy.deepcopy(job)
    first = render(job, SETTINGS)
    first[0]["metadata"]["name"] = "changed"
    assert render(job, SETTINGS) != first and job == before


def test_children_of_a_live_job_are_owned_by_it():
    job = example("breast-cancer")
    assert all("ownerReferences" not in c["metadata"] for c in render(job, SETTINGS))
    job["metadata"]["uid"] = "1234"
    for child in render(job, SETTINGS):
        if child["kind"] == "PersistentVolumeClaim":
            continue  # retained: see test_the_output_claim_outlives_the_job_unless_told
        [owner] = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "bouquet.dev/v1alpha1",
            "kind": "FederatedJob",
            "name": "breast-cancer",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_every_pod_meets_the_restricted_pod_security_standard():
    for child in render(example("breast-cancer"), SETTINGS):
        if child["kind"] not in ("Deployment", "Job"):
            continue
        pod = child["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}


def test_a_gpu_site_gets_gpu_limits_and_the_gpu_toleration():
    job = example("breast-cancer")
    job["spec"]["sites"][1]["gpus"] = 2
    job["spec"]["sites"][1]["nodeSelector"] = {"accelerator": "a100"}
    children = by_kind(render(job, SETTINGS))
    gpu_pod = children[("Job", "breast-cancer--hospital-b")]["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert gpu_pod["tolerations"] == [GPU_TOLERATION]
    assert gpu_pod["nodeSelector"] == {"accelerator": "a100"}
    cpu_pod = children[("Job", "breast-cancer--hospital-a")]["spec"]["template"]["spec"]
    assert "resources" not in cpu_pod["containers"][0] and "tolerations" not in cpu_pod


def test_a_site_with_its_own_claim_mounts_it_read_only():
    job = example("breast-cancer")
    job["spec"]["task"]["features"] = ["mean_radius"]
    job["spec"]["sites"][0]["data"] = {"path": "records/2026.parquet", "claimName": "records"}
    pod = by_kind(render(job, SETTINGS))[("Job", "breast-cancer--hospital-a")]["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "records", "readOnly": True}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["command"][-2:] == ["--data", "/data/records/2026.parquet"]
    assert "initContainers" not in pod


def test_tls_modes():
    job = example("breast-cancer")
    assert ("Secret", "breast-cancer-tls") in by_kind(render(job, SETTINGS))
    job["spec"]["security"]["tls"] = {"mode": "Secret", "secretName": "from-cert-manager"}
    children = by_kind(render(job, SETTINGS))
    assert not [k for k in children if k[0] == "Secret" and k[1] == "breast-cancer-tls"]
    server = children[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "from-cert-manager"}} in server["volumes"]
    job["spec"]["security"]["tls"] = {"mode": "Disabled"}
    server = by_kind(render(job, SETTINGS))[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]
    assert "--tls-dir" not in server["containers"][0]["command"]
    assert server["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_each_site_pod_mounts_its_own_key_only_and_the_server_only_public_keys():
    children = by_kind(render(example("breast-cancer"), SETTINGS))
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    for site in sites:
        pod = children[("Job", f"breast-cancer--{site}")]["spec"]["template"]["spec"]
        secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert {
            "secretName": f"breast-cancer--{site}-key",
            "items": [{"key": "site.key", "path": "site.key"}],
            "defaultMode": 0o440,
        } in secrets
        assert not [s for s in secrets if s["secretName"].endswith("-key") and s["secretName"] != f"breast-cancer--{site}-key"]
        assert "--key" in pod["containers"][0]["command"]
    server = children[("Deployment", "breast-cancer-server")]["spec"]["template"]
    assert not [v for v in server["spec"]["volumes"] if v.get("secret", {}).get("secretName", "").endswith("-key")]
    assert {"name": "site-keys", "configMap": {"name": "breast-cancer-site-keys"}} in server["spec"]["volumes"]
    assert "--site-keys" in server["spec"]["containers"][0]["command"]
    assert set(children[("ConfigMap", "breast-cancer-site-keys")]["data"]) == {f"{site}.pub" for site in sites}

    # A replaced key restarts the server, which then admits the new key only.
    class Replaced(AnySitesKey):
        def __getitem__(self, site: str) -> SiteKey:
            return SiteKey(b"new", b"new pub") if site == "hospital-b" else super().__getitem__(site)

    again = by_kind(render(example("breast-cancer"), Settings(SETTINGS.image, SETTINGS.tls, Replaced())))
    hashes = [
        c[("Deployment", "breast-cancer-server")]["spec"]["template"]["metadata"]["annotations"]["bouquet.dev/site-keys-hash"]
        for c in (children, again)
    ]
    assert hashes[0] != hashes[1]


def test_a_job_without_tls_has_no_site_keys():
    job = example("breast-cancer")
    job["spec"]["security"] = {"tls": {"mode": "Disabled"}}
    children = render(job, Settings(SETTINGS.image))
    assert not [c for c in children if c["metadata"]["name"].endswith("-key") or c["metadata"]["name"].endswith("-site-keys")]
    server = by_kind(children)[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]
    assert "--site-keys" not in server["containers"][0]["command"]


def test_across_clusters_the_sites_cluster_makes_the_keys_and_the_aggregator_admits_the_public_halves_it_names():
    hospital = by_kind(render(example("multi-cluster/hospital-a"), SETTINGS))
    key = hospital[("Secret", "breast-cancer--hospital-a-key")]
    assert sorted(key["data"]) == ["site.key", "site.pub"]
    assert list(hospital[("ConfigMap", "breast-cancer-site-keys")]["data"]) == ["hospital-a.pub"], "only public keys to hand over"
    pod = hospital[("Job", "breast-cancer--hospital-a")]["spec"]["template"]["spec"]
    assert {
        "name": "site-key",
        "secret": {"secretName": key["metadata"]["name"], "items": [{"key": "site.key", "path": "site.key"}], "defaultMode": 0o440},
    } in pod["volumes"]
    assert pod["containers"][0]["command"][-4:-2] == ["--key", "/etc/bouquet/site-key/site.key"]

    aggregator = example("multi-cluster/aggregator")
    hashes = []
    for keys in (None, {"hospital-a.pub": "ecdsa-sha2-nistp384 AAAA a", "hospital-b.pub": "ecdsa-sha2-nistp384 AAAA b"}):
        children = by_kind(render(aggregator, Settings(SETTINGS.image, SETTINGS.tls, remote_site_keys=keys)))
        assert not [name for kind, name in children if name.endswith(("-key", "-site-keys"))], "no key is made here"
        server = children[("Deployment", "breast-cancer-server")]["spec"]["template"]
        assert {"name": "site-keys", "configMap": {"name": "federation-site-keys"}} in server["spec"]["volumes"]
        assert "--site-keys" in server["spec"]["containers"][0]["command"]
        hashes.append(server["metadata"]["annotations"]["bouquet.dev/site-keys-hash"])
    assert hashes[0] != hashes[1], "the server restarts when the keys it is given appear or change"


def test_an_existing_output_claim_is_used_not_created():
    job = example("breast-cancer")
    job["spec"]["output"]["claimName"] = "models"
    children = by_kind(render(job, SETTINGS))
    assert not [k for k in children if k[0] == "PersistentVolumeClaim"]
    server = children[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "models"}} in server["volumes"]


def test_bouquet_render_prints_what_render_returns(capsys):
    assert (
        cli.main(["render", str(ROOT / "examples" / "breast-cancer.yaml"), "--image", "bouquet-workloads:test", "--namespace", "hospitals"])
        == 0
    )
    output = capsys.readouterr().out
    printed = list(kubeyaml.load_all(output))
    expected = render(example("breast-cancer"), SETTINGS)
    # The Secrets and the public keys hold placeholders (the operator makes the keys), and the
    # server's annotation of the keys' hash differs with them; all else is the same.
    for documents in (printed, expected):
        for document in documents:
            if document["metadata"]["name"].endswith(("-tls", "-key", "-site-keys")):
                document.pop("data")
            if document["kind"] == "Deployment":
                document["spec"]["template"]["metadata"]["annotations"].pop("bouquet.dev/site-keys-hash")
    assert printed == expected
    assert "PRIVATE KEY" not in output
    assert all(len(c["metadata"]["name"]) <= 63 for c in printed)
    assert output.startswith("# The Secret breast-cancer-tls holds placeholders: the operator makes the job's CA and the server's key")


@pytest.mark.parametrize("name", ["breast-cancer", "sleep-quality", "multi-cluster/aggregator", "multi-cluster/hospital-a", "own-data"])
def test_bouquet_render_prints_no_private_key(name, capsys):
    """What render prints ends up in Git: no key, in PEM or base64 (a Secret's data)."""
    assert cli.main(["render", str(ROOT / "examples" / f"{name}.yaml")]) == 0
    output = capsys.readouterr().out
    decoded = [
        base64.b64decode(value).decode(errors="replace")
        for document in kubeyaml.load_all(output)
        if document["kind"] == "Secret"
        for value in document.get("data", {}).values()
    ]
    for text in [output, *decoded]:
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    assert all(text == "placeholder: the operator makes this in the cluster" for text in decoded)


def kinds(children: list[dict]) -> list[str]:
    return [c["kind"] for c in children]


def test_a_server_only_job_has_no_sites_and_admits_sites_from_anywhere():
    children = render(example("multi-cluster/aggregator"), SETTINGS)
    assert kinds(children) == [
        "Secret",
        "PersistentVolumeClaim",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "Deployment",
        "Service",
    ]
    flower_rule = by_kind(children)[("NetworkPolicy", "breast-cancer-server")]["spec"]["ingress"][0]
    assert "from" not in flower_rule and flower_rule["ports"] == [{"port": 9092, "protocol": "TCP"}]
    assert by_kind(children)[("Service", "breast-cancer-server")]["spec"]["type"] == "LoadBalancer"


def test_a_sites_only_job_dials_the_remote_server_with_its_ca():
    children = render(example("multi-cluster/hospital-a"), SETTINGS)
    # the site's key, its public half, the job, the sites' policy
    assert kinds(children) == ["Secret", "ConfigMap", "ConfigMap", "NetworkPolicy", "Job"]
    pod = children[-1]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--server") + 1] == "federation.example.org:9092"
    assert {"name": "tls", "secret": {"secretName": "breast-cancer-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in pod["volumes"]


def test_sites_get_the_ca_certificate_and_never_the_servers_key():
    children = by_kind(render(example("breast-cancer"), SETTINGS))
    site_volumes = children[("Job", "breast-cancer--hospital-a")]["spec"]["template"]["spec"]["volumes"]
    server_volumes = children[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "breast-cancer-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in site_volumes
    assert {"name": "tls", "secret": {"secretName": "breast-cancer-tls"}} in server_volumes


def test_the_output_claim_outlives_the_job_unless_told():
    job = example("breast-cancer")
    job["metadata"]["uid"] = "1234"
    assert "ownerReferences" not in by_kind(render(job, SETTINGS))[("PersistentVolumeClaim", "breast-cancer-output")]["metadata"]
    job["spec"]["output"]["reclaimPolicy"] = "Delete"
    [owner] = by_kind(render(job, SETTINGS))[("PersistentVolumeClaim", "breast-cancer-output")]["metadata"]["ownerReferences"]
    assert owner["uid"] == "1234"


def test_the_server_may_patch_only_its_own_jobs_status():
    children = by_kind(render(example("breast-cancer"), SETTINGS))
    [rule] = children[("Role", "breast-cancer-server")]["rules"]
    assert rule == {
        "apiGroups": ["bouquet.dev"],
        "resources": ["federatedjobs/status"],
        "resourceNames": ["breast-cancer"],
        "verbs": ["get", "patch"],
    }
    binding = children[("RoleBinding", "breast-cancer-server")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "breast-cancer-server", "namespace": "hospitals"}]
    pod = children[("Deployment", "breast-cancer-server")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "breast-cancer-server" and "--report-status" in pod["containers"][0]["command"]


def server_and_sites(job):
    children = by_kind(render(job, SETTINGS))
    replicas = children[("Deployment", "breast-cancer-server")]["spec"]["replicas"]
    return replicas, [c["spec"]["suspend"] for c in children.values() if c["kind"] == "Job"]


def test_suspension_and_the_end_of_a_job_stop_its_pods():
    job = example("breast-cancer")
    assert server_and_sites(job) == (1, [False] * 3)
    job["spec"]["runPolicy"]["suspend"] = True
    assert server_and_sites(job) == (0, [True] * 3)
    job["spec"]["runPolicy"]["suspend"] = False
    job["status"] = {"phase": "Succeeded"}
    assert server_and_sites(job) == (0, [False] * 3), "the sites end by themselves: their Jobs complete"
    job["status"] = {"phase": "Failed"}
    assert server_and_sites(job) == (0, [True] * 3)


def test_a_changed_spec_restarts_the_pods_and_suspending_does_not():
    job = example("breast-cancer")

    def hashes(job):
        children = render(job, SETTINGS)
        return {
            c["spec"]["template"]["metadata"]["annotations"]["bouquet.dev/spec-hash"]
            for c in children
            if c["kind"] in ("Job", "Deployment")
        }

    [first] = hashes(job)
    job["spec"]["runPolicy"]["suspend"] = True
    assert hashes(job) == {first}
    job["spec"]["rounds"] = 11
    assert hashes(job) != {first}


def test_the_servers_certificate_names_what_sites_dial():
    from bouquet.render import server_hostnames

    names = server_hostnames(example("multi-cluster/aggregator"))
    assert "breast-cancer-server.aggregator.svc" in names and "federation.example.org" in names


NETWORK = Settings(
    image="bouquet-workloads:test",
    tls=SETTINGS.tls,
    site_keys=AnySitesKey(),
    metrics_scrapers=({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},),
    dns=Destination(("192.0.2.10",), ((5353, "UDP"), (5353, "TCP"))),
    api_server=Destination(("192.0.2.1",), ((6443, "TCP"),)),
)


def test_the_servers_pod_is_reached_only_by_its_sites_and_scrapers_and_reaches_only_dns_and_the_api_server():
    policy = by_kind(render(example("breast-cancer"), NETWORK))[("NetworkPolicy", "breast-cancer-server")]["spec"]
    server = {"bouquet.dev/job": "breast-cancer", "app.kubernetes.io/component": "server"}
    sites = {"bouquet.dev/job": "breast-cancer", "app.kubernetes.io/component": "site"}
    assert policy["podSelector"] == {"matchLabels": server}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": sites}}], "ports": [{"port": 9092, "protocol": "TCP"}]},
        {"from": list(NETWORK.metrics_scrapers), "ports": [{"port": 9400, "protocol": "TCP"}]},
    ]
    assert policy["egress"] == [
        CLUSTER_DNS,
        {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"port": 5353, "protocol": "UDP"}, {"port": 5353, "protocol": "TCP"}]},
        {"to": [{"ipBlock": {"cidr": "192.0.2.1/32"}}], "ports": [{"port": 6443, "protocol": "TCP"}]},
    ]


def test_without_scrapers_nothing_may_open_the_metrics_port():
    policy = by_kind(render(example("breast-cancer"), SETTINGS))[("NetworkPolicy", "breast-cancer-server")]["spec"]
    assert [rule["ports"] for rule in policy["ingress"]] == [[{"port": 9092, "protocol": "TCP"}]]


def test_the_sites_pods_admit_nothing_and_reach_only_their_server_and_dns():
    policy = by_kind(render(example("breast-cancer"), NETWORK))[("NetworkPolicy", "breast-cancer-sites")]["spec"]
    server = {"bouquet.dev/job": "breast-cancer", "app.kubernetes.io/component": "server"}
    assert policy["podSelector"] == {"matchLabels": {"bouquet.dev/job": "breast-cancer", "app.kubernetes.io/component": "site"}}
    assert policy["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy
    assert policy["egress"] == [
        {"to": [{"podSelector": {"matchLabels": server}}], "ports": [{"port": 9092, "protocol": "TCP"}]},
        CLUSTER_DNS,
        {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"port": 5353, "protocol": "UDP"}, {"port": 5353, "protocol": "TCP"}]},
    ]


def test_sites_dialling_another_cluster_reach_only_the_remote_servers_port():
    policy = by_kind(render(example("multi-cluster/hospital-a"), NETWORK))[("NetworkPolicy", "breast-cancer-sites")]["spec"]
    assert policy["egress"][0] == {"ports": [{"port": 9092, "protocol": "TCP"}]}
    assert len(policy["egress"]) == 3  # the server's port, then DNS


def test_a_server_only_job_admits_only_the_source_ranges_it_names():
    job = example("multi-cluster/aggregator")
    job["spec"]["server"]["sourceRanges"] = ["198.51.100.0/24", "2001:db8::/32"]
    children = by_kind(render(job, NETWORK))
    flower = children[("NetworkPolicy", "breast-cancer-server")]["spec"]["ingress"][0]
    assert flower["from"] == [{"ipBlock": {"cidr": "198.51.100.0/24"}}, {"ipBlock": {"cidr": "2001:db8::/32"}}]
    assert children[("Service", "breast-cancer-server")]["spec"]["loadBalancerSourceRanges"] == ["198.51.100.0/24", "2001:db8::/32"]
    assert ("NetworkPolicy", "breast-cancer-sites") not in children


def test_no_pod_of_a_job_is_rendered_before_its_network_policies():
    for name in ("breast-cancer", "multi-cluster/aggregator", "multi-cluster/hospital-a"):
        order = kinds(render(example(name), NETWORK))
        first_pod = min(order.index(kind) for kind in ("Deployment", "Job") if kind in order)
        assert "NetworkPolicy" in order[:first_pod] and "NetworkPolicy" not in order[first_pod:], name
