"""Nodes for a control plane that has no kubelet: what a kubelet and a storage provisioner
would do, reduced to the API calls the control plane sees.

- Registers Node objects with the capacity a test asks for (nvidia.com/gpu on one, say),
  marks them Ready and renews their Lease, so the node lifecycle controller lifts the
  not-ready taint and the real scheduler places pods on them.
- Reports a pod placed on one of its nodes as running and ready (what a kubelet reports once
  the containers started), unless the test holds it back; finishes pods when told
  (Succeeded or Failed, as a container's exit would).
- Completes a deletion: a pod being deleted on its nodes is removed once "its containers
  stopped" (a kubelet confirms with a zero grace period).
- Binds each pending claim to a new hostPath PersistentVolume, as a cluster admin's static
  provisioning would.

Nothing here decides placement, scheduling, Job or Deployment behaviour: the real
controllers do, from what this reports.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from bouquet import kube


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kubelet:
    def __init__(self, client: kube.Client, nodes: dict[str, dict[str, str]], poll: float = 0.3) -> None:
        """nodes: name -> extra capacity (for example {"nvidia.com/gpu": "2"})."""
        self.client = client
        self.nodes = nodes
        self.poll = poll
        self.held: set[str] = set()  # "namespace/name" prefixes of pods not to start
        self.lingering: set[str] = set()  # "namespace/name" prefixes of pods that take their time to stop
        self.stopping = threading.Event()
        self.errors: list[str] = []
        # Set while the API server is down on purpose (support.faults): a kubelet retries.
        self.outage = threading.Event()
        self.threads = [threading.Thread(target=self._pods, daemon=True), threading.Thread(target=self._heartbeats, daemon=True)]

    def start(self) -> Kubelet:
        for name in self.nodes:
            self._register(name)
        self._heartbeat()
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    # --- nodes ---

    def _register(self, name: str) -> None:
        taints = [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}] if "nvidia.com/gpu" in self.nodes[name] else []
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {"taints": taints} if taints else {},
        }
        self.client.request(
            "PATCH", f"/api/v1/nodes/{name}", body=node, query={"fieldManager": "test-kubelet", "force": "true"}, content_type=kube.APPLY
        )

    def _heartbeat(self) -> None:
        for name, extra in self.nodes.items():
            capacity = {"cpu": "8", "memory": "32Gi", "pods": "110", **extra}
            now = _now()
            ready = {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "a test's node",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            status = {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [ready],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            }
            self.client.request("PATCH", f"/api/v1/nodes/{name}/status", body={"status": status}, content_type=kube.MERGE)
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _micro_now()},
            }
            self.client.request(
                "PATCH",
                f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                body=lease,
                query={"fieldManager": "test-kubelet", "force": "true"},
                content_type=kube.APPLY,
            )

    def _heartbeats(self) -> None:
        while not self.stopping.wait(10):
            try:
                self._heartbeat()
            except Exception as error:  # noqa: BLE001 - kept for the test to see
                if not self.outage.is_set():
                    self.errors.append(f"heartbeat: {error}")

    # --- pods and claims ---

    def _pods(self) -> None:
        while not self.stopping.wait(self.poll):
            try:
                self._sync_pods()
                self._bind_claims()
            except kube.ApiError as error:
                if error.status not in (404, 409) and not self.outage.is_set():  # raced with a controller: next time
                    self.errors.append(f"pods: {error}")
            except Exception as error:  # noqa: BLE001
                if not self.outage.is_set():
                    self.errors.append(f"pods: {error}")

    def _sync_pods(self) -> None:
        for pod in self.client.request("GET", "/api/v1/pods")["items"]:
            meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
            if spec.get("nodeName") not in self.nodes:
                continue
            key = f"{meta['namespace']}/{meta['name']}"
            if meta.get("deletionTimestamp"):
                if any(key.startswith(h) for h in self.lingering):
                    continue
                self.client.request(
                    "DELETE",
                    f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0},
                )
            elif status.get("phase") == "Pending" and not any(key.startswith(h) for h in self.held):
                self.set_phase(pod, "Running")
            elif status.get("phase") == "Running" and _marked_not_ready(status):
                # The node lifecycle controller marks a node's pods not ready when it misses
                # the node's heartbeats (the API server away for longer than its grace
                # period); a kubelet says again what it knows of them once it is heard.
                self.set_phase(pod, "Running", restarts=max(c.get("restartCount", 0) for c in status["containerStatuses"]))

    def set_phase(self, pod: dict, phase: str, exit_code: int = 0, message: str = "", restarts: int = 0) -> None:
        """Reports pod as Running (and ready), or as Succeeded or Failed with exit_code and its
        containers' termination message; its containers restarted restarts times before."""
        now, running = _now(), phase == "Running"
        state = (
            {"running": {"startedAt": now}}
            if running
            else {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    **({"message": message} if message else {}),
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        )
        condition_types = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
        status = {
            "phase": phase,
            "startTime": pod.get("status", {}).get("startTime", now),
            "hostIP": "127.0.0.1",
            "podIP": "10.244.0.10",
            "conditions": [
                {"type": t, "status": "True" if running or t in ("Initialized", "PodScheduled") else "False", "lastTransitionTime": now}
                for t in condition_types
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": running,
                    "restartCount": restarts,
                    "started": running,
                    "state": state,
                }
                for c in pod["spec"]["containers"]
            ],
        }
        meta = pod["metadata"]
        self.client.request(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", body={"status": status}, content_type=kube.MERGE
        )

    def stuck(self, pod: dict, reason: str, message: str) -> None:
        """Reports pod Pending, its containers waiting for reason (ErrImagePull, ImagePullBackOff,
        CrashLoopBackOff...) with message, as the kubelet does; hold the pod (held) first, or
        the next sync starts it."""
        status = {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        meta = pod["metadata"]
        self.client.request(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", body={"status": status}, content_type=kube.MERGE
        )

    def finish(self, namespace: str, selector: str, phase: str = "Succeeded", exit_code: int = 0, message: str = "") -> int:
        """Ends the running pods that match selector; returns how many."""
        pods = self.client.list("v1", "Pod", namespace, selector)
        ended = [p for p in pods if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        for pod in ended:
            self.set_phase(pod, phase, exit_code, message)
        return len(ended)

    def _bind_claims(self) -> None:
        for claim in self.client.request("GET", "/api/v1/persistentvolumeclaims")["items"]:
            meta, spec = claim["metadata"], claim["spec"]
            if claim.get("status", {}).get("phase") != "Pending" or spec.get("volumeName") or meta.get("deletionTimestamp"):
                continue
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"pv-{meta['uid']}"},
                "spec": {
                    "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                    "accessModes": spec["accessModes"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": spec.get("storageClassName") or "",
                    "hostPath": {"path": f"/tmp/bouquet-test-volumes/{meta['uid']}"},
                    "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                },
            }
            self.client.request("POST", "/api/v1/persistentvolumes", body=volume)


def wait_for(predicate, timeout: float = 30, interval: float = 0.2, what: str = "the condition"):
    """Polls predicate until it returns something truthy, which it returns; fails the test
    after timeout seconds, saying what it waited for and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def _marked_not_ready(status: dict) -> bool:
    """A running pod whose containers are ready and the pod is not: not this kubelet's doing."""
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
    containers = status.get("containerStatuses", [])
    return ready is not None and ready["status"] == "False" and bool(containers) and all(c.get("ready") for c in containers)
