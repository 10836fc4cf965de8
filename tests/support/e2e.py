"""Helpers of the end-to-end tests (tests/e2e): what a node leaves on the host, reading a
claim through a Pod, a job's status, and what to show when a job fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from support.cluster import ROOT, kubectl, kubectl_binary
from support.kubelet import wait_for
from support.processes import processes_mentioning

RELEASE, RELEASE_NAMESPACE = "bouquet", "bouquet-system"
COUNTERS = re.compile(r" \[\d+:\d+\]$")
BUILT_IN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


def host_state() -> dict[str, set[str]]:
    """What a node leaves on the host: network interfaces, mount points, iptables rules,
    ipsets and nft tables."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    rules: set[str] = set()
    for command in ("iptables-save", "ip6tables-save"):
        saved = subprocess.run([command], capture_output=True, text=True)
        # Rules and chains of their own, without packet counters. (An empty table with the
        # built-in chains, which iptables makes on first use, holds no rule.)
        rules |= {
            f"{command}: {COUNTERS.sub('', line)}"
            for line in saved.stdout.splitlines()
            if line.startswith("-") or (line.startswith(":") and line.split()[0][1:] not in BUILT_IN_CHAINS)
        }
    # kube-router's ipsets, and nft tables of anything but iptables itself (whose tables
    # iptables-save lists, rule by rule, above).
    ipsets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True) if shutil.which("ipset") else None
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True) if shutil.which("nft") else None
    return {
        "ipsets": set(ipsets.stdout.split()) if ipsets else set(),
        "nft tables": {t for t in tables.stdout.splitlines() if t.split()[-1] not in IPTABLES_TABLES} if tables else set(),
        "kubepods cgroups": {str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")},
        "interfaces": {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()},
        "mounts": {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()},
        "iptables rules": rules,
    }


def leftovers(before: dict[str, set[str]], state: Path) -> dict[str, list[str]]:
    """What the host holds now that it did not before the node came up."""
    after = host_state()
    found = {kind: sorted(after[kind] - before[kind]) for kind in before}
    # (The tests' own kubectl of the moment, a Prometheus target refresh, is not the node's.)
    found["processes"] = processes_mentioning(str(state), but_own_children=True)
    return {kind: items for kind, items in found.items() if items}


def read_claim(kubeconfig: str, namespace: str, claim: str, paths: list[str]) -> dict[str, bytes]:
    """The files at paths (relative to the claim's root) of a PersistentVolumeClaim, read
    through a Pod that mounts it read-only."""
    pod = f"read-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "read",
                    "image": workloads_image(),
                    "command": ["sleep", "600"],
                    "volumeMounts": [{"name": "claim", "mountPath": "/claim", "readOnly": True}],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
            "volumes": [{"name": "claim", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
        },
    }
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(manifest))
    try:
        kubectl(kubeconfig, "wait", "-n", namespace, f"pod/{pod}", "--for=condition=Ready", "--timeout=180s")
        files = {}
        for path in paths:
            read = subprocess.run(
                [kubectl_binary(), "--kubeconfig", kubeconfig, "exec", "-n", namespace, pod, "--", "cat", f"/claim/{path}"],
                capture_output=True,
                timeout=120,
            )
            assert read.returncode == 0, f"cannot read {path} from claim {claim}: {read.stderr.decode()}"
            files[path] = read.stdout
        return files
    finally:
        kubectl(kubeconfig, "delete", "pod", "-n", namespace, pod, "--wait=false", check=False)


def workloads_image() -> str:
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return f"bouquet-workloads:{version}"


def job_status(kubeconfig: str, namespace: str, name: str) -> dict:
    found = kubectl(kubeconfig, "get", "federatedjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout).get("status", {}) if found.returncode == 0 else {}


def server_pods(kubeconfig: str, namespace: str, job: str) -> list[dict]:
    selector = f"bouquet.dev/job={job},app.kubernetes.io/component=server"
    return json.loads(kubectl(kubeconfig, "get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]


def wait_for_round(kubeconfig: str, namespace: str, name: str, round_: int, timeout: float = 600) -> None:
    wait_for(
        lambda: job_status(kubeconfig, namespace, name).get("progress", {}).get("round", 0) >= round_,
        timeout=timeout,
        interval=2,
        what=f"job {namespace}/{name} to finish round {round_}",
    )


def diagnose(kubeconfig: str, namespace: str) -> str:
    """What a failed test should show: the namespace's objects, events and pod logs."""
    parts = [kubectl(kubeconfig, "get", "federatedjobs,pods,jobs,pvc", "-n", namespace, "-o", "wide", check=False).stdout]
    parts.append(kubectl(kubeconfig, "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout[-3000:])
    pods = kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "name", check=False).stdout.split()
    for pod in pods:
        logs = kubectl(kubeconfig, "logs", "-n", namespace, pod, "--all-containers", "--tail=30", check=False)
        parts.append(f"--- {pod}\n{logs.stdout[-2500:]}{logs.stderr[-500:]}")
        # A container that crashed and waits to restart has no log of its own yet: its last run's.
        previous = kubectl(kubeconfig, "logs", "-n", namespace, pod, "--all-containers", "--previous", "--tail=30", check=False)
        if previous.returncode == 0 and previous.stdout.strip():
            parts.append(f"--- {pod}, the container's previous run\n{previous.stdout[-2500:]}")
    operator = kubectl(kubeconfig, "logs", "-n", RELEASE_NAMESPACE, f"deployment/{RELEASE}", "--tail=40", check=False)
    parts.append(f"--- the operator\n{operator.stdout[-4000:]}{operator.stderr[-500:]}")
    # Last, where a cut log keeps it: each job's status, whose sites carry their pods' last
    # words (the termination message) after the pods themselves are gone.
    jobs = kubectl(kubeconfig, "get", "federatedjobs", "-n", namespace, "-o", "json", check=False)
    for job in json.loads(jobs.stdout or '{"items": []}')["items"] if jobs.returncode == 0 else []:
        summary = {k: job.get("status", {}).get(k) for k in ("phase", "progress", "sites", "conditions")}
        parts.append(f"--- federatedjob {namespace}/{job['metadata']['name']}: {json.dumps(summary)}")
    return "\n".join(parts)


def plain_pod(kubeconfig: str, namespace: str, name: str, labels: dict | None = None, listen: int | None = None) -> str:
    """A Pod of the workloads image that runs nothing of Bouquet's: it sleeps, or with
    `listen` accepts TCP connections on that port. Returns its address once it is Ready."""
    command = ["python3", "-m", "http.server", str(listen)] if listen else ["sleep", "900"]
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": workloads_image(),
                    "command": command,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(manifest))
    kubectl(kubeconfig, "wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready", "--timeout=180s", timeout=200)
    return kubectl(kubeconfig, "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.podIP}").stdout


# Run in a Pod: tries a TCP connection to each host:port of argv[1] (a JSON list) at once and
# prints, for each, whether it opened.
CONNECT = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def opens(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=4).close()
        return True
    except OSError:
        return False
targets = json.loads(sys.argv[1])
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(dict(zip(targets, pool.map(opens, targets)))))
"""


def connections(kubeconfig: str, namespace: str, pod: str, targets: list[str]) -> dict[str, bool]:
    """Which of the host:port targets a TCP connection from the Pod's first container opens."""
    done = kubectl(kubeconfig, "exec", "-n", namespace, pod, "--", "python3", "-c", CONNECT, json.dumps(targets), timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_pod(kubeconfig: str, namespace: str, pod: str) -> int:
    """SIGKILLs the processes of a pod's containers on the host, as the kernel's OOM killer
    would (the pod's sandbox is left alone: the kubelet sees its container die); returns how
    many. The processes are found by their cgroup, which names the pod's uid (cgroupfs and
    systemd drivers spell it differently)."""
    uid = kubectl(kubeconfig, "get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout.strip()
    marks = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cgroup for mark in marks) and "bouquet" in command:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
