"""Every Kubernetes object of a FederatedJob, as a pure function of the job.

The operator applies exactly what `render` returns (server-side apply, one field manager),
and `bouquet render JOB.yaml` prints it, so the two cannot disagree. Nothing here talks to
a cluster; what render needs from outside (images, the job's TLS material) comes in as
arguments.

For one job named J (mode ServerOnly leaves out the site Jobs; mode SitesOnly keeps only
the ConfigMap and the site Jobs, which dial remoteServer with the CA in its Secret):
    Secret J-tls            the job's CA and server certificate (tls.mode Auto)
    PersistentVolumeClaim   J-output, unless output.claimName names an existing claim
    ConfigMap J-job         the job itself, for the server and the sites to read
    Deployment J-server     one replica, Recreate: the SuperLink and the ServerApp
    Service J-server        the port sites dial, and the metrics port
    Job J-<site>            one per site: its SuperNode and ClientApp
    NetworkPolicy J-server  only the job's sites (and the metrics scraper) reach the server
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from .tls import Bundle

API_VERSION = "bouquet.dev/v1alpha1"
DEFAULT_IMAGE = "bouquet-workloads:0.1.0"
KIND = "FederatedJob"
SERVER_PORT = 9092
METRICS_PORT = 9400
JOB_FILE = "/etc/bouquet/job/job.yaml"
TLS_DIR = "/etc/bouquet/tls"
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


@dataclass(frozen=True)
class Settings:
    """What render needs besides the job."""

    image: str  # the workloads image, unless the job names its own
    tls: Bundle | None = None  # the job's TLS material when tls.mode is Auto
    metrics_from: Mapping | None = None  # namespaceSelector of the metrics scraper; None admits any namespace


def names(job: Mapping) -> dict[str, str]:
    """The names of a job's children (kept in one place: status and cleanup use them too)."""
    name = job["metadata"]["name"]
    return {
        "tls": f"{name}-tls",
        "output": job["spec"]["output"].get("claimName", f"{name}-output"),
        "config": f"{name}-job",
        "server": f"{name}-server",
    }


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


def site_job_name(job: Mapping, site: str) -> str:
    return f"{job['metadata']['name']}-{site}"


def render(job: Mapping, settings: Settings) -> list[dict]:
    """Every child object of the job, in the order they are best created."""
    spec = job["spec"]
    server_here, sites_here = spec["mode"] != "SitesOnly", spec["mode"] != "ServerOnly"
    children: list[dict] = []
    if server_here and spec["security"]["tls"]["mode"] == "Auto":
        children.append(tls_secret(job, settings))
    if server_here and "claimName" not in spec["output"]:
        children.append(output_claim(job))
    children.append(job_config(job))
    if server_here:
        children += [server_deployment(job, settings), server_service(job)]
    if sites_here:
        children += [site_job(job, site, settings) for site in spec["sites"]]
    if server_here:
        children.append(network_policy(job, settings))
    # Callers get plain objects of their own: no part shared with the job, with this module
    # or between two places (a JSON round trip undoes all sharing, as deepcopy would not).
    return json.loads(json.dumps(children))


def _metadata(job: Mapping, name: str, component: str, extra_labels: Mapping | None = None) -> dict:
    metadata = {
        "name": name,
        "namespace": job["metadata"].get("namespace", "default"),
        "labels": {**labels(job, component), **(extra_labels or {})},
    }
    if "uid" in job["metadata"]:  # a live object: the children are its own, and go with it
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
        "bouquet.dev/job": job["metadata"]["name"],
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


def output_claim(job: Mapping) -> dict:
    output = job["spec"]["output"]
    spec: dict = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": output["size"]}}}
    if "storageClassName" in output:
        spec["storageClassName"] = output["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _metadata(job, names(job)["output"], "output"), "spec": spec}


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
        "data": {"job.yaml": yaml.safe_dump(document, sort_keys=False)},
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


def _volumes(job: Mapping) -> tuple[list[dict], list[dict]]:
    """The job file and TLS volumes every Bouquet pod mounts, and their mounts."""
    volumes = [{"name": "job", "configMap": {"name": names(job)["config"]}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "job", "mountPath": "/etc/bouquet/job", "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    secret = _tls_secret_name(job)
    if secret:
        volumes.append({"name": "tls", "secret": {"secretName": secret}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return volumes, mounts


def server_deployment(job: Mapping, settings: Settings) -> dict:
    spec = job["spec"]
    volumes, mounts = _volumes(job)
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
    ]
    if _tls_secret_name(job):
        command += ["--tls-dir", TLS_DIR]
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
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one server at a time: it owns the output volume
            "selector": {"matchLabels": {"bouquet.dev/job": job["metadata"]["name"], "app.kubernetes.io/component": "server"}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "containers": [container],
                    "volumes": volumes,
                    "securityContext": POD_SECURITY,
                    "automountServiceAccountToken": False,
                    **_placement(spec["server"]),
                },
            },
        },
    }


def server_service(job: Mapping) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names(job)["server"], "server"),
        "spec": {
            "type": job["spec"]["server"]["serviceType"],
            "selector": {"bouquet.dev/job": job["metadata"]["name"], "app.kubernetes.io/component": "server"},
            "ports": [
                {"name": "flower", "port": SERVER_PORT, "targetPort": "flower"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def site_job(job: Mapping, site: Mapping, settings: Settings) -> dict:
    spec = job["spec"]
    volumes, mounts = _volumes(job)
    if spec["mode"] == "SitesOnly":
        server = spec["remoteServer"]["address"]
    else:
        server = f"{names(job)['server']}.{job['metadata'].get('namespace', 'default')}.svc:{SERVER_PORT}"
    command = ["bouquet", "site", JOB_FILE, "--site", site["name"], "--server", server]
    if _tls_secret_name(job):
        command += ["--ca", f"{TLS_DIR}/ca.crt"]
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
            "template": {"metadata": {"labels": {**labels(job, "site"), **site_labels}}, "spec": pod_spec},
        },
    }


def network_policy(job: Mapping, settings: Settings) -> dict:
    name = job["metadata"]["name"]
    scraper = {"namespaceSelector": dict(settings.metrics_from or {})}
    # Sites in other clusters reach the server from outside: TLS, not the network, keeps
    # out whoever lacks the job's CA.
    sites = [{"podSelector": {"matchLabels": {"bouquet.dev/job": name, "app.kubernetes.io/component": "site"}}}]
    flower_from = {} if job["spec"]["mode"] == "ServerOnly" else {"from": sites}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, names(job)["server"], "server"),
        "spec": {
            "podSelector": {"matchLabels": {"bouquet.dev/job": name, "app.kubernetes.io/component": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {**flower_from, "ports": [{"port": SERVER_PORT, "protocol": "TCP"}]},
                {"from": [scraper], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]},
            ],
        },
    }
