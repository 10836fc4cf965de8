"""Every Kubernetes object of a FederatedJob, as a pure function of the job.

The operator applies exactly what `render` returns (server-side apply, one field manager),
and `bouquet render JOB.yaml` prints it, so the two cannot disagree. Nothing here talks to
a cluster; what render needs from outside (images, the job's TLS material) comes in as
arguments.

For one job named J (mode ServerOnly leaves out the site Jobs and their keys; mode SitesOnly
keeps only the sites' keys, the ConfigMaps and the site Jobs, which dial remoteServer with
the CA in its Secret):
    Secret J-tls            the job's CA and server certificate (tls.mode Auto)
    Secret J--<site>-key    each site's own key (sites in this cluster, with TLS): mounted by
                            that site's pod only
    ConfigMap J-site-keys   the sites' public keys, for the server to admit them by (mode
                            ServerOnly mounts the one security.siteKeys names instead; a
                            SitesOnly job keeps it for the aggregator)
    PersistentVolumeClaim   J-output, unless output.claimName names an existing claim; owned
                            by the job only with output.reclaimPolicy Delete
    ServiceAccount, Role and RoleBinding J-server
                            the server's identity: get and patch the job's own status
    ConfigMap J-job         the job itself, for the server and the sites to read
    Deployment J-server     one replica, Recreate: the SuperLink and the ServerApp
    Service J-server        the port sites dial, and the metrics port
    NetworkPolicy J-server  the server's pod: only the job's sites reach its port (mode
                            ServerOnly: the server.sourceRanges), only the chart's scrapers
                            its metrics; it reaches only DNS and the API server
    NetworkPolicy J-sites   the sites' pods: nothing reaches them; they reach only their
                            server (here, or remoteServer's port) and DNS

Both NetworkPolicies come before the pods they guard, so that no pod of the job runs
unguarded (the operator checks that they exist before it applies the Deployment and Jobs).

The job's status takes part only where Kubernetes' own controllers need telling: once the
job has succeeded or failed, or while runPolicy.suspend is true, the server Deployment has
no replica; while suspended or failed, the site Jobs are suspended too (their pods stop).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from . import kubeyaml
from .identity import PRIVATE, PUBLIC, SiteKey
from .tls import Bundle

API_VERSION = "bouquet.dev/v1alpha1"
DEFAULT_IMAGE = "bouquet-workloads:0.1.0"
KIND = "FederatedJob"
SERVER_PORT = 9092
METRICS_PORT = 9400
JOB_FILE = "/etc/bouquet/job/job.yaml"
TLS_DIR = "/etc/bouquet/tls"
SITE_KEY_DIR = "/etc/bouquet/site-key"
SITE_KEYS_DIR = "/etc/bouquet/site-keys"
OUTPUT_DIR = "/output"
DATA_DIR = "/data"
# The restricted Pod Security standard, for every container Bouquet runs.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


# The (apiVersion, kind) of every object render may return.
JOB_LABEL = "bouquet.dev/job"  # on every child of a job, and its pods: the job's name

CHILD_KINDS = (
    ("v1", "Secret"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


# The cluster DNS as most clusters run it: CoreDNS pods labelled k8s-app=kube-dns in
# kube-system, on port 53.
CLUSTER_DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}


@dataclass(frozen=True)
class Destination:
    """Addresses and ports that a job's pods may connect to, as a NetworkPolicy sees them:
    after a Service's address is translated to its endpoints'."""

    addresses: tuple[str, ...]
    ports: tuple[tuple[int, str], ...]  # (port, protocol)

    def egress_rule(self) -> dict:
        return {
            "to": [{"ipBlock": {"cidr": f"{a}/{128 if ':' in a else 32}"}} for a in self.addresses],
            "ports": [{"port": port, "protocol": protocol} for port, protocol in self.ports],
        }


@dataclass(frozen=True)
class Settings:
    """What render needs besides the job."""

    image: str  # the workloads image, unless the job names its own
    tls: Bundle | None = None  # the job's TLS material when tls.mode is Auto
    site_keys: Mapping[str, SiteKey] | None = None  # site -> its key, when `makes_site_keys`
    # Who may scrape the server's metrics port (NetworkPolicy peers); none: nothing in the
    # cluster but the server's own node.
    metrics_scrapers: tuple[Mapping, ...] = ()
    # The endpoints of the cluster's DNS Service and of the API server (the `kubernetes`
    # Service), which the pods may reach besides CLUSTER_DNS; None: unknown (`bouquet render`
    # without a cluster), so the server's policy has no rule for the API server.
    dns: Destination | None = None
    api_server: Destination | None = None
    # Mode ServerOnly: the data of the ConfigMap of the sites' public keys (None while it does
    # not exist), so that a changed key restarts the server.
    remote_site_keys: Mapping[str, str] | None = None


def names(job: Mapping) -> dict[str, str]:
    """The names of a job's children (kept in one place: status and cleanup use them too)."""
    name = job["metadata"]["name"]
    return {
        "tls": f"{name}-tls",
        "output": job["spec"]["output"].get("claimName", f"{name}-output"),
        "config": f"{name}-job",
        "server": f"{name}-server",
        "sites": f"{name}-sites",
        "site-keys": f"{name}-site-keys",
    }


def site_key_secret_name(job: Mapping, site: str) -> str:
    return f"{site_job_name(job, site)}-key"


def makes_site_keys(job: Mapping) -> bool:
    """Whether the operator makes the sites' keys (a Secret each, mounted by that site's pod
    alone, and the ConfigMap J-site-keys of their public halves): for the sites that run in
    this cluster, with TLS on (SuperNode authentication needs it)."""
    spec = job["spec"]
    return spec["mode"] != "ServerOnly" and spec["security"]["tls"]["mode"] != "Disabled"


def authenticates_sites(job: Mapping) -> bool:
    """Whether the server admits only the sites' registered keys: with TLS on, always but for
    sites dialling a server elsewhere (mode SitesOnly: that server decides). With mode
    ServerOnly the keys come from the sites' clusters, in the ConfigMap that
    security.siteKeys.configMapName names."""
    spec = job["spec"]
    return spec["mode"] != "SitesOnly" and spec["security"]["tls"]["mode"] != "Disabled"


def site_keys_config_name(job: Mapping) -> str:
    """The ConfigMap of the sites' public keys that the server mounts."""
    if job["spec"]["mode"] == "ServerOnly":
        return job["spec"]["security"]["siteKeys"]["configMapName"]
    return names(job)["site-keys"]


def server_hostnames(job: Mapping) -> list[str]:
    """The names sites may dial the server by, for its certificate."""
    service, namespace = names(job)["server"], job["metadata"].get("namespace", "default")
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
        "localhost",
        "127.0.0.1",
        *job["spec"]["server"].get("hostnames", []),
    ]


# Between a job's name and a site's in the names of the site's children. Neither name may hold
# it (the schema's rules), so that no two (job, site) pairs of a namespace name one object:
# job `a` with site `b-c` and job `a-b` with site `c` make `a--b-c` and `a-b--c`. The job's
# other children end in fixed words with no `--`, so none of them takes a site's name either.
SITE_SEPARATOR = "--"


def site_job_name(job: Mapping, site: str) -> str:
    return f"{job['metadata']['name']}{SITE_SEPARATOR}{site}"


def site_of(job: Mapping, child_name: str) -> str:
    """The site a site child's name (its Job's, or its key Secret's) was made for; also of
    the names of releases before SITE_SEPARATOR (<job>-<site>), which a job made then holds."""
    name = job["metadata"]["name"]
    for prefix in (f"{name}{SITE_SEPARATOR}", f"{name}-"):
        if child_name.startswith(prefix):
            return child_name.removeprefix(prefix).removesuffix("-key")
    return child_name


def render(job: Mapping, settings: Settings) -> list[dict]:
    """Every child object of the job, in the order they are best created."""
    spec = job["spec"]
    server_here, sites_here = spec["mode"] != "SitesOnly", spec["mode"] != "ServerOnly"
    children: list[dict] = []
    if server_here and spec["security"]["tls"]["mode"] == "Auto":
        children.append(tls_secret(job, settings))
    if server_here and "claimName" not in spec["output"]:
        children.append(output_claim(job))
    if makes_site_keys(job):
        children += [site_key_secret(job, site["name"], _site_key(settings, site["name"])) for site in spec["sites"]]
        children.append(site_keys_config(job, settings))
    children.append(job_config(job))
    if server_here:
        children += server_identity(job)
    if server_here:
        children.append(server_network_policy(job, settings))
    if sites_here:
        children.append(sites_network_policy(job, settings))
    if server_here:
        children += [server_deployment(job, settings), server_service(job)]
    if sites_here:
        children += [site_job(job, site, settings) for site in spec["sites"]]
    # Callers get plain objects of their own: no part shared with the job, with this module
    # or between two places (a JSON round trip undoes all sharing, as deepcopy would not).
    return json.loads(json.dumps(children))


def server_replicas(job: Mapping) -> int:
    """1 while the server has work to do; 0 once the job has ended or while it is suspended."""
    ended = job.get("status", {}).get("phase") in ("Succeeded", "Failed")
    return 0 if ended or job["spec"]["runPolicy"]["suspend"] else 1


def sites_suspended(job: Mapping) -> bool:
    """Whether the site Jobs are suspended: while the job is, and once it has failed (a
    deadline, a failed site), so that no site pod runs on."""
    return job["spec"]["runPolicy"]["suspend"] or job.get("status", {}).get("phase") == "Failed"


def spec_hash(job: Mapping) -> str:
    """A digest of what the pods run, set on their templates so that a changed spec
    restarts them (they read the job from a ConfigMap, which Kubernetes does not watch).
    runPolicy is left out: suspending a job must not count as changing it."""
    spec = {k: v for k, v in job["spec"].items() if k != "runPolicy"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _metadata(job: Mapping, name: str, component: str, extra_labels: Mapping | None = None, owned: bool = True) -> dict:
    metadata = {
        "name": name,
        "namespace": job["metadata"].get("namespace", "default"),
        "labels": {**labels(job, component), **(extra_labels or {})},
    }
    if owned and "uid" in job["metadata"]:  # a live object: the children are its own, and go with it
        metadata["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return metadata


def labels(job: Mapping, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "bouquet",
        "app.kubernetes.io/instance": job["metadata"]["name"],
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "bouquet-operator",
        JOB_LABEL: job["metadata"]["name"],
    }


def tls_secret(job: Mapping, settings: Settings) -> dict:
    if settings.tls is None:
        raise ValueError("tls.mode Auto needs the job's TLS material (Settings.tls)")
    data = {k: base64.b64encode(v).decode() for k, v in settings.tls.files().items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(job, names(job)["tls"], "tls"),
        "type": "kubernetes.io/tls",
        "data": data,
    }


def _site_key(settings: Settings, site: str) -> SiteKey:
    if settings.site_keys is None or site not in settings.site_keys:
        raise ValueError(f"the job's sites are authenticated: Settings.site_keys needs site {site}'s key")
    return settings.site_keys[site]


def site_key_secret(job: Mapping, site: str, key: SiteKey) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(job, site_key_secret_name(job, site), "site-key", {"bouquet.dev/site": site}),
        "type": "Opaque",
        "data": {PRIVATE: base64.b64encode(key.private).decode(), PUBLIC: base64.b64encode(key.public).decode()},
    }


def site_keys_config(job: Mapping, settings: Settings) -> dict:
    """The sites' public keys, as `bouquet server --site-keys` reads them (<site>.pub)."""
    keys = {f"{site['name']}.pub": _site_key(settings, site["name"]).public.decode() for site in job["spec"]["sites"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(job, names(job)["site-keys"], "site-keys"), "data": keys}


def output_claim(job: Mapping) -> dict:
    output = job["spec"]["output"]
    spec: dict = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": output["size"]}}}
    if "storageClassName" in output:
        spec["storageClassName"] = output["storageClassName"]
    # Retained, the claim outlives the job (no owner reference for the garbage collector to
    # follow), and the model with it.
    owned = output["reclaimPolicy"] == "Delete"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(job, names(job)["output"], "output", owned=owned),
        "spec": spec,
    }


def server_identity(job: Mapping) -> list[dict]:
    """The server pod's service account, allowed to read and patch its own job's status and
    nothing else: how round progress reaches the status (see progress.py)."""
    name = names(job)["server"]
    role = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, name, "server"), "automountServiceAccountToken": False},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, name, "server"),
            "rules": [
                {
                    "apiGroups": [API_VERSION.split("/")[0]],
                    "resources": ["federatedjobs/status"],
                    "resourceNames": [job["metadata"]["name"]],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, name, "server"),
            "roleRef": role,
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job["metadata"].get("namespace", "default")}],
        },
    ]


def job_config(job: Mapping) -> dict:
    """The job as the pods read it: only what a FederatedJob file holds (no status, no
    server-side metadata), so that the server and sites see the spec they were made from."""
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job["metadata"]["name"], "namespace": job["metadata"].get("namespace", "default")},
        "spec": job["spec"],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names(job)["config"], "config"),
        "data": {"job.yaml": kubeyaml.dump(document)},
    }


def _tls_secret_name(job: Mapping) -> str | None:
    """The Secret the pods mount for TLS: the job's own, or for sites dialling a server in
    another cluster, the one holding that server's CA."""
    spec = job["spec"]
    tls = spec["security"]["tls"]
    if tls["mode"] == "Disabled":
        return None
    if spec["mode"] == "SitesOnly":
        return spec["remoteServer"]["caSecretName"]
    return names(job)["tls"] if tls["mode"] == "Auto" else tls["secretName"]


def _image(job: Mapping, settings: Settings, part: str) -> str:
    spec = job["spec"]
    return spec.get(part, {}).get("image") or spec.get("app", {}).get("image") or settings.image


def _placement(source: Mapping) -> dict:
    """nodeSelector, tolerations and affinity, passed through as written."""
    return {k: source[k] for k in ("nodeSelector", "tolerations", "affinity") if k in source}


def _volumes(job: Mapping, server: bool) -> tuple[list[dict], list[dict]]:
    """The job file and TLS volumes every Bouquet pod mounts, and their mounts. Sites get
    only the CA certificate: the server's key stays with the server."""
    volumes = [{"name": "job", "configMap": {"name": names(job)["config"]}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "job", "mountPath": "/etc/bouquet/job", "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    secret = _tls_secret_name(job)
    if secret:
        source: dict = {"secretName": secret}
        if not server:
            source["items"] = [{"key": "ca.crt", "path": "ca.crt"}]
        volumes.append({"name": "tls", "secret": source})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return volumes, mounts


def server_deployment(job: Mapping, settings: Settings) -> dict:
    spec = job["spec"]
    volumes, mounts = _volumes(job, server=True)
    volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": names(job)["output"]}})
    mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    command = [
        "bouquet",
        "server",
        JOB_FILE,
        "--out",
        OUTPUT_DIR,
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVER_PORT),
        "--metrics-port",
        str(METRICS_PORT),
        "--report-status",
    ]
    if _tls_secret_name(job):
        command += ["--tls-dir", TLS_DIR]
    annotations = {"bouquet.dev/spec-hash": spec_hash(job)}
    if authenticates_sites(job):
        volumes.append({"name": "site-keys", "configMap": {"name": site_keys_config_name(job)}})
        mounts.append({"name": "site-keys", "mountPath": SITE_KEYS_DIR, "readOnly": True})
        command += ["--site-keys", SITE_KEYS_DIR]
        # A site's key replaced (its Secret deleted, or the aggregator's ConfigMap changed):
        # the server restarts, registers the new key, unregisters the old one, and resumes
        # from its checkpoint. (With mode ServerOnly the pod waits for the ConfigMap to exist.)
        keys = settings.remote_site_keys if spec["mode"] == "ServerOnly" else site_keys_config(job, settings)["data"]
        public = json.dumps(keys, sort_keys=True) if keys is not None else "absent"
        annotations["bouquet.dev/site-keys-hash"] = hashlib.sha256(public.encode()).hexdigest()[:16]
    probe = {"httpGet": {"path": "/health", "port": "flower", "scheme": "HTTPS" if _tls_secret_name(job) else "HTTP"}, "periodSeconds": 10}
    container = {
        "name": "server",
        "image": _image(job, settings, "server"),
        "command": command,
        "ports": [{"name": "flower", "containerPort": SERVER_PORT}, {"name": "metrics", "containerPort": METRICS_PORT}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
        "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": 60},
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
        **({"resources": spec["server"]["resources"]} if "resources" in spec["server"] else {}),
    }
    pod_labels = labels(job, "server")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(job, names(job)["server"], "server"),
        "spec": {
            "replicas": server_replicas(job),
            "strategy": {"type": "Recreate"},  # one server at a time: it owns the output volume
            "selector": {"matchLabels": {JOB_LABEL: job["metadata"]["name"], "app.kubernetes.io/component": "server"}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": {
                    "serviceAccountName": names(job)["server"],
                    "containers": [container],
                    "volumes": volumes,
                    "securityContext": POD_SECURITY,
                    "automountServiceAccountToken": True,  # to report progress to the job's status
                    **_placement(spec["server"]),
                },
            },
        },
    }


def server_service(job: Mapping) -> dict:
    server = job["spec"]["server"]
    ranges = server.get("sourceRanges") if server["serviceType"] == "LoadBalancer" else None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names(job)["server"], "server"),
        "spec": {
            "type": server["serviceType"],
            **({"loadBalancerSourceRanges": list(ranges)} if ranges else {}),
            "selector": {JOB_LABEL: job["metadata"]["name"], "app.kubernetes.io/component": "server"},
            "ports": [
                {"name": "flower", "port": SERVER_PORT, "targetPort": "flower"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def site_job(job: Mapping, site: Mapping, settings: Settings) -> dict:
    spec = job["spec"]
    volumes, mounts = _volumes(job, server=False)
    if spec["mode"] == "SitesOnly":
        server = spec["remoteServer"]["address"]
    else:
        server = f"{names(job)['server']}.{job['metadata'].get('namespace', 'default')}.svc:{SERVER_PORT}"
    command = ["bouquet", "site", JOB_FILE, "--site", site["name"], "--server", server]
    if _tls_secret_name(job):
        command += ["--ca", f"{TLS_DIR}/ca.crt"]
    if makes_site_keys(job):
        key_source = {
            "secretName": site_key_secret_name(job, site["name"]),
            "items": [{"key": PRIVATE, "path": PRIVATE}],
            "defaultMode": 0o440,
        }
        volumes.append({"name": "site-key", "secret": key_source})
        mounts.append({"name": "site-key", "mountPath": SITE_KEY_DIR, "readOnly": True})
        command += ["--key", f"{SITE_KEY_DIR}/{PRIVATE}"]
    data = site.get("data")
    if data and ("claimName" in data or "hostPath" in data):
        source = (
            {"persistentVolumeClaim": {"claimName": data["claimName"], "readOnly": True}}
            if "claimName" in data
            else {"hostPath": {"path": data["hostPath"], "type": "Directory"}}
        )
        volumes.append({"name": "data", **source})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
        command += ["--data", f"{DATA_DIR}/{data['path'].lstrip('/')}"]
    elif data:
        command += ["--data", data["path"]]
    else:  # the site's share of the built-in dataset, written by an init container
        volumes.append({"name": "data", "emptyDir": {}})
        mounts.append({"name": "data", "mountPath": DATA_DIR})
        command += ["--data", f"{DATA_DIR}/{site['name']}.csv"]
    resources = dict(site.get("resources", {}))
    tolerations = list(site.get("tolerations", []))
    if site["gpus"]:
        resources["limits"] = {**resources.get("limits", {}), "nvidia.com/gpu": site["gpus"]}
        if GPU_TOLERATION not in tolerations:
            tolerations.append(GPU_TOLERATION)
    container = {
        "name": "site",
        "image": _image(job, settings, "site"),
        "command": command,
        **({"env": [{"name": e["name"], "value": e.get("value", "")} for e in site["env"]]} if site.get("env") else {}),
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
        # `bouquet site` says in its last line why it stopped (the server refused its key):
        # the operator reads it from the termination message into the job's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **({"resources": resources} if resources else {}),
    }
    pod_spec = {
        "restartPolicy": "OnFailure",
        "containers": [container],
        "volumes": volumes,
        "securityContext": POD_SECURITY,
        "automountServiceAccountToken": False,
        **_placement(site),
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if not data:
        pod_spec["initContainers"] = [
            {
                "name": "share",
                "image": container["image"],
                "command": ["bouquet", "share", JOB_FILE, "--site", site["name"], "--out", DATA_DIR],
                "volumeMounts": mounts,
                "securityContext": CONTAINER_SECURITY,
            }
        ]
    site_labels = {"bouquet.dev/site": site["name"]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, site_job_name(job, site["name"]), "site", site_labels),
        "spec": {
            "backoffLimit": spec["runPolicy"]["backoffLimit"],
            "suspend": sites_suspended(job),
            "template": {
                "metadata": {"labels": {**labels(job, "site"), **site_labels}, "annotations": {"bouquet.dev/spec-hash": spec_hash(job)}},
                "spec": pod_spec,
            },
        },
    }


def _pod_selector(job: Mapping, component: str) -> dict:
    return {"matchLabels": {JOB_LABEL: job["metadata"]["name"], "app.kubernetes.io/component": component}}


def _dns_rules(settings: Settings) -> list[dict]:
    return [CLUSTER_DNS, *([settings.dns.egress_rule()] if settings.dns else [])]


def server_network_policy(job: Mapping, settings: Settings) -> dict:
    """The server's pod: its Flower port admits the job's own site pods (mode ServerOnly: the
    sites dial in from other clusters, from server.sourceRanges if given, else from anywhere,
    each proving its key); its metrics port the scrapers the operator was installed with;
    nothing else comes in. It reaches DNS and the API server (to report progress) alone."""
    spec = job["spec"]
    if spec["mode"] == "ServerOnly":
        ranges = spec["server"].get("sourceRanges")
        flower_from = {"from": [{"ipBlock": {"cidr": cidr}} for cidr in ranges]} if ranges else {}
    else:
        flower_from = {"from": [{"podSelector": _pod_selector(job, "site")}]}
    ingress = [{**flower_from, "ports": [{"port": SERVER_PORT, "protocol": "TCP"}]}]
    if settings.metrics_scrapers:
        ingress.append({"from": [dict(p) for p in settings.metrics_scrapers], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]})
    egress = _dns_rules(settings) + ([settings.api_server.egress_rule()] if settings.api_server else [])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, names(job)["server"], "server"),
        "spec": {"podSelector": _pod_selector(job, "server"), "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress},
    }


def remote_server_port(job: Mapping) -> int:
    return int(job["spec"]["remoteServer"]["address"].rsplit(":", 1)[1])


def sites_network_policy(job: Mapping, settings: Settings) -> dict:
    """The sites' pods, which hold the patient data: nothing connects to them, and they
    connect to their server alone (this job's server pod, or for mode SitesOnly the
    remote server's port, at whatever address its name resolves to), and to DNS. They have
    no use for the API server (their pods mount no service account token)."""
    if job["spec"]["mode"] == "SitesOnly":
        server = {"ports": [{"port": remote_server_port(job), "protocol": "TCP"}]}
    else:
        server = {"to": [{"podSelector": _pod_selector(job, "server")}], "ports": [{"port": SERVER_PORT, "protocol": "TCP"}]}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, names(job)["sites"], "site"),
        "spec": {
            "podSelector": _pod_selector(job, "site"),
            "policyTypes": ["Ingress", "Egress"],
            "egress": [server, *_dns_rules(settings)],
        },
    }
