"""Faults at random moments of a job's life on a real control plane (scripts/cluster), and
what must hold through them. Used by tests/cluster/test_faults.py (a few trials) and
benchmarks/faults.py (`make bench-faults`: ten of each, figures printed).

- Witness: real watches of every child kind, the pods and the FederatedJobs of a namespace
  for the whole trial, so that nothing made and deleted between two looks goes unseen.
- Trial: one job from apply to Succeeded, its server played by the trial (the reports a
  ServerApp writes, sent with the server's own identity) and its pods by support.kubelet,
  with faults injected at random moments of it: the operator SIGKILLed (and started again,
  as its Deployment would), the leader of two operators SIGKILLed, the API server restarted.
- What must hold (Trial.violations): no child of the job made twice (each (kind, name) has
  one uid for the whole run, as the spec never changes), but for a key copy made again with
  the very material it held (the operator may not read the copies it makes in a job's
  namespace, so one it was making when it was killed is deleted and made again from the
  job's record: operator/bouquet/keep.py; Witness.remade lists them); never two live pods of one site or
  of the server; the phases in order (Pending, Running, Succeeded), none missed back, no
  Failed; the job Succeeded with the model the server reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bouquet import kube
from bouquet.render import CHILD_KINDS
from bouquet_workloads import progress
from support import cluster
from support.kubelet import wait_for
from support.prometheus import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
WATCHED = (*CHILD_KINDS, ("v1", "Pod"), ("bouquet.dev/v1alpha1", "FederatedJob"))
PHASES = ("Pending", "Running", "Succeeded")


class Witness:
    """Watches WATCHED in one namespace from start() to stop(): every object's uids by
    (kind, name), the most pods live at once by who they run (server, or site S), and each
    FederatedJob's phases in the order they were written."""

    def __init__(self, client: kube.Client, namespace: str) -> None:
        self.client, self.namespace = client, namespace
        self.uids: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.labels: dict[tuple[str, str], dict] = {}
        self.material: dict[tuple[str, str], set[str]] = defaultdict(set)  # a Secret's data digests
        self.live_pods: dict[str, set[str]] = defaultdict(set)  # who -> uids of its live pods
        self.most_live: dict[str, int] = defaultdict(int)
        self.phases: dict[str, list[str]] = defaultdict(list)
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=kind, daemon=True) for kind in WATCHED]

    def start(self) -> Witness:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(40)

    def _watch(self, api_version: str, kind: str) -> None:
        url = kube.path(api_version, kind, self.namespace)
        version = ""
        while not self.stopping.is_set():
            try:
                if not version:  # a list, then a watch from where it stands
                    listed = self.client.request("GET", url)
                    for obj in listed["items"]:
                        self._saw(kind, "ADDED", obj)
                    version = listed["metadata"]["resourceVersion"]
                version = self._stream(url, kind, version)
            except Exception as error:  # noqa: BLE001 - the API server may be restarting: look again
                if "410" in str(error) or "Expired" in str(error):
                    version = ""
                time.sleep(0.5)

    def _stream(self, url: str, kind: str, version: str) -> str:
        api = self.client.api
        query = [("watch", "true"), ("resourceVersion", version), ("timeoutSeconds", "5"), ("allowWatchBookmarks", "true")]
        params = api.param_serialize(
            "GET", url, query_params=query, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        response = api.call_api(*params, _request_timeout=(5, 15)).response
        try:
            if response.status >= 400:
                raise RuntimeError(f"{response.status} watching {url}: {response.read()[:200]!r}")
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise RuntimeError(f"410 Expired: {event['object']}" if event["object"].get("code") == 410 else str(event["object"]))
                version = event["object"]["metadata"].get("resourceVersion", version)
                if event["type"] != "BOOKMARK":
                    self._saw(kind, event["type"], event["object"])
                if self.stopping.is_set():
                    break
        finally:
            response.release_conn()
        return version

    def _saw(self, kind: str, event: str, obj: dict) -> None:
        meta = obj["metadata"]
        key = (kind, meta["name"])
        with self.lock:
            if meta["uid"] not in self.uids[key]:
                self.uids[key].append(meta["uid"])
            self.labels[key] = meta.get("labels", {})
            if kind == "Secret":
                self.material[key].add(hashlib.sha256(json.dumps(obj.get("data", {}), sort_keys=True).encode()).hexdigest())
            if kind == "FederatedJob":
                phase = obj.get("status", {}).get("phase")
                if phase and (not self.phases[meta["name"]] or self.phases[meta["name"]][-1] != phase):
                    self.phases[meta["name"]].append(phase)
            elif kind == "Pod":
                labels = meta.get("labels", {})
                who = f"{labels.get('bouquet.dev/job')} {labels.get('bouquet.dev/site') or labels.get('app.kubernetes.io/component')}"
                ended = event == "DELETED" or meta.get("deletionTimestamp") or obj.get("status", {}).get("phase") in ("Succeeded", "Failed")
                if ended:
                    self.live_pods[who].discard(meta["uid"])
                else:
                    self.live_pods[who].add(meta["uid"])
                self.most_live[who] = max(self.most_live[who], len(self.live_pods[who]))

    def children(self, job: str) -> list[tuple[str, str]]:
        """The (kind, name) of every child of job seen."""
        with self.lock:
            return sorted(
                k for k in self.uids if k[0] not in ("Pod", "FederatedJob") and self.labels.get(k, {}).get("bouquet.dev/job") == job
            )

    def remade(self, job: str) -> list[str]:
        """The job's Secrets made more than once, each time with the same material."""
        with self.lock:
            return sorted(
                name
                for (kind, name), uids in self.uids.items()
                if kind == "Secret"
                and len(uids) > 1
                and len(self.material[(kind, name)]) == 1
                and self.labels[(kind, name)].get("bouquet.dev/job") == job
            )

    def violations(self, job: str) -> list[str]:
        """What went wrong for one job: children made twice (but for a key copy made again
        with its own material), two live pods of one site or of the server, phases out of order."""
        found = []
        remade = self.remade(job)
        with self.lock:
            for (kind, name), uids in sorted(self.uids.items()):
                if kind in ("Pod", "FederatedJob") or self.labels.get((kind, name), {}).get("bouquet.dev/job") != job:
                    continue
                if len(uids) > 1 and not (kind == "Secret" and name in remade):
                    found.append(f"{kind} {name} was made {len(uids)} times (uids {', '.join(uids)})")
            for who, most in sorted(self.most_live.items()):
                if who.startswith(f"{job} ") and most > 1:
                    found.append(f"{most} pods of {who.removeprefix(job + ' ')} were live at once")
            phases = self.phases.get(job, [])
            order = [PHASES.index(p) if p in PHASES else -1 for p in phases]
            if -1 in order or order != sorted(order):
                found.append(f"the job's phases went {' -> '.join(phases)}")
        return found


class OperatorProcess:
    """`bouquet operator` in a process of its own, as its pod runs it: watching one namespace,
    keeping its records and its Lease in another."""

    def __init__(self, kubeconfig: str, namespace: str, own_namespace: str, log, leader_election: bool = False) -> None:
        self.port = free_port()
        env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'workloads'}"}
        command = [sys.executable, "-m", "bouquet", "operator", f"--namespace={namespace}", f"--own-namespace={own_namespace}"]
        command += [f"--port={self.port}", "--resync-seconds=2"]
        if not leader_election:
            command.append("--no-leader-election")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def leading(self) -> float | None:
        """Its bouquet_leader gauge; None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                found = re.search(r"^bouquet_leader (\S+)$", response.read().decode(), re.MULTILINE)
        except OSError:
            return None
        return float(found.group(1)) if found else None

    def healthy(self) -> bool:
        return cluster.healthy(self.port)

    def kill(self) -> None:
        """SIGKILL: no Lease given up, no request finished."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def restart_api_server(kubeconfig: str) -> None:
    """Stops the control plane's kube-apiserver (SIGTERM, as a rollout would) and starts it
    again with the same command line, as scripts/cluster/up.sh did; returns once it answers."""
    restart_component(Path(kubeconfig).parent, "kube-apiserver")
    client = kube.Client.from_environment()
    wait_for(lambda: _answers(client), timeout=120, what="the API server back")


def restart_component(state: Path, name: str, grace: float = 30) -> None:
    """Stops one process of a cluster of scripts/cluster (kube-apiserver, kubelet, ...) as a
    kubelet stops a static pod's container: SIGTERM, and SIGKILL if it has not ended after
    grace seconds (a pod's default terminationGracePeriodSeconds; kube-apiserver drains its
    watches for up to a minute and more); then starts it again with the same command line and
    environment, as up.sh and node.sh started it (its pid file names it, for down.sh)."""
    pid_file = state / "pids" / f"{name}.pid"
    pid = int(pid_file.read_text())
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    environment = dict(entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry)
    for stop, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        os.kill(pid, stop)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            break
    else:
        raise AssertionError(f"{name} (process {pid}) did not end on SIGKILL")
    log = open(state / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the process's for its life
    subprocess.Popen(
        ["setsid", "bash", "-c", 'echo $$ >"$0" && exec "$@"', str(pid_file), *(c.decode() for c in command)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k.decode(): v.decode() for k, v in environment.items()},
    )


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answers(client: kube.Client) -> bool:
    try:
        client.request("GET", "/version")
        return True
    except Exception:  # noqa: BLE001 - not yet
        return False


def example_job(namespace: str, name: str) -> dict:
    """examples/breast-cancer.yaml, named name in namespace."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name, "namespace": namespace}
    return document


def apply(kubeconfig: str, document: dict) -> None:
    """`kubectl apply` of a job, with the kubectl of the cluster of kubeconfig."""
    subprocess.run(
        [str(Path(kubeconfig).parent / "bin" / "kubectl"), "--kubeconfig", kubeconfig, "apply", "-f", "-"],
        input=json.dumps(document),
        check=True,
        capture_output=True,
        text=True,
    )


@dataclass
class Trial:
    """One job, from apply to Succeeded, through faults at random moments."""

    kubeconfig: str
    client: kube.Client
    namespace: str
    server_identity: Callable[[str, str], object]  # (namespace, job) -> the server's API client
    name: str
    rounds: int = 6
    seed: int = 0
    log: list[str] = field(default_factory=list)
    witness: Witness | None = None  # what the last run saw
    unmade: list[str] = field(default_factory=list)  # faults that failed to happen

    def job(self) -> dict:
        document = example_job(self.namespace, self.name)
        document["spec"]["rounds"] = self.rounds
        return document

    def run(self, faults: Callable[[float], None], moments: int = 2, span: float = 6.0, timeout: float = 180) -> list[str]:
        """Applies the job, plays its server (a round every 0.5 s once it runs, then the
        model) and calls faults(t) at `moments` random times within `span` seconds of the
        apply; returns what went wrong (nothing, if all held)."""
        rng = random.Random(self.seed)
        when = sorted(rng.uniform(0, span) for _ in range(moments))
        witness = self.witness = Witness(self.client, self.namespace).start()
        try:
            time.sleep(1)  # the watches open
            started = time.monotonic()
            apply(self.kubeconfig, self.job())
            injector = threading.Thread(target=self._inject, args=(faults, when, started), daemon=True)
            injector.start()
            self._serve(started, timeout)
            injector.join(timeout)
            self._finished(started, timeout)
        except AssertionError as error:
            witness.stop()
            return [*self.unmade, *witness.violations(self.name), f"did not complete: {error}"]
        witness.stop()
        return [*self.unmade, *witness.violations(self.name)]

    def _inject(self, faults: Callable[[float], None], when: list[float], started: float) -> None:
        for at in when:
            time.sleep(max(0.0, started + at - time.monotonic()))
            try:
                began = time.monotonic()
                faults(at)
                self.log.append(f"{self.name}: fault at {at:.2f} s, made in {time.monotonic() - began:.1f} s")
            except Exception as error:  # noqa: BLE001 - a fault that could not be made is a trial that failed
                self.log.append(f"{self.name}: the fault at {at:.2f} s could not be made: {error}")
                self.unmade.append(f"the fault at {at:.2f} s could not be made: {error}")

    def _phase(self) -> str:
        try:
            found = self.client.get("bouquet.dev/v1alpha1", "FederatedJob", self.namespace, self.name)
        except kube.ApiError:
            return ""
        except Exception:  # noqa: BLE001 - the API server restarting
            return ""
        return (found or {}).get("status", {}).get("phase", "")

    def _report(self, state: str, round_: int, **more) -> None:
        """As the server's reporter: with its identity, again until it is taken."""
        server = self.server_identity(self.namespace, self.name)

        def sent() -> bool:
            try:
                progress.apply(server, self.namespace, self.name, {"state": state, "round": round_, "sites": 3, **more})
                return True
            except Exception:  # noqa: BLE001 - the API server restarting; its Role not made yet
                return False

        wait_for(sent, timeout=120, interval=0.3, what=f"the server's report of round {round_} taken")

    def _serve(self, started: float, timeout: float) -> None:
        wait_for(lambda: self._phase() == "Running", timeout=timeout, interval=0.2, what="the job Running")
        for round_ in range(1, self.rounds + 1):
            self._report("Running", round_, metrics={"loss": 1 / round_})
            time.sleep(0.5)
        self.model = {"path": "/model.safetensors", "sizeBytes": 100, "sha256": f"{random.Random(self.name).getrandbits(256):064x}"}
        self._report("Succeeded", self.rounds, metrics={"loss": 1 / self.rounds}, model=self.model)

    def _finished(self, started: float, timeout: float) -> None:
        def done() -> bool:
            try:
                job = self.client.get("bouquet.dev/v1alpha1", "FederatedJob", self.namespace, self.name)
                server = self.client.get("apps/v1", "Deployment", self.namespace, f"{self.name}-server")
            except Exception:  # noqa: BLE001 - the API server restarting
                return False
            status = job.get("status", {})
            return (
                status.get("phase") == "Succeeded"
                and status.get("model", {}).get("sha256") == self.model["sha256"]
                and server["spec"]["replicas"] == 0
            )

        wait_for(
            done,
            timeout=max(10.0, timeout - (time.monotonic() - started)),
            interval=0.3,
            what="Succeeded, its model in the status, the server at 0",
        )


class Operators:
    """A trial's operator replicas, each started again once killed, as their Deployment
    would. With more than one, they elect a leader (the Lease in own_namespace)."""

    def __init__(self, kubeconfig: str, namespace: str, own_namespace: str, log_path: Path, replicas: int = 1) -> None:
        self.args = (kubeconfig, namespace, own_namespace)
        self.log = log_path.open("a")
        self.election = replicas > 1
        self.running = [self._start() for _ in range(replicas)]
        self.takeovers: list[float] = []  # seconds from a leader's SIGKILL to another leading
        if self.election:
            wait_for(lambda: self.leader() is not None, timeout=60, what="an operator leading")
        else:
            wait_for(lambda: self.running[0].leading() is not None, timeout=60, what="the operator serving")

    def _start(self) -> OperatorProcess:
        return OperatorProcess(*self.args, self.log, leader_election=self.election)

    def leader(self) -> OperatorProcess | None:
        return next((o for o in self.running if o.leading() == 1.0), None)

    def kill(self, at: float = 0.0) -> None:
        """SIGKILLs the operator (the leader, if several), and starts another in its place;
        with several, waits until one of the others leads and notes how long that took."""
        victim = self.leader() if self.election else self.running[0]
        if victim is None:
            raise AssertionError("no operator leads")
        victim.kill()
        killed = time.monotonic()
        self.running.remove(victim)
        if self.election:
            wait_for(lambda: self.leader() is not None, timeout=30, interval=0.1, what="another operator leading")
            self.takeovers.append(time.monotonic() - killed)
        self.running.append(self._start())

    def unhealthy(self) -> list[str]:
        """What /healthz says of each replica that does not answer 200 (a worker or the
        resync ended: a pod's liveness probe would restart it, hiding why)."""
        return [f"operator {o.process.pid}: /healthz does not answer 200" for o in self.running if not o.healthy()]

    def threads(self) -> str:
        """Where each thread of each operator stands (`kill -USR1` writes it to the log)."""
        self.log.flush()
        start = Path(self.log.name).stat().st_size
        for operator in self.running:
            operator.process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        return Path(self.log.name).read_text(errors="replace")[start:]

    def stop(self) -> None:
        for operator in self.running:
            operator.stop()
        self.log.close()


def crash_loop(
    kubeconfig: str, client: kube.Client, namespace: str, kubelet, operators: Operators, name: str, hold: float = 120
) -> list[str]:
    """A server that restarts past runPolicy.backoffLimit: the job must read Failed, for that
    reason, and stay so for `hold` seconds (its server at 0 replicas, no server pod back),
    through the operator SIGKILLed and started again halfway; returns what did not hold."""
    document = example_job(namespace, name)
    document["spec"]["runPolicy"] = {"backoffLimit": 1}
    apply(kubeconfig, document)
    selector = f"bouquet.dev/job={name},app.kubernetes.io/component=server"

    def phase() -> str:
        return (client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, name) or {}).get("status", {}).get("phase", "")

    try:
        wait_for(lambda: phase() == "Running", timeout=60, what="the job Running")
        [server] = client.list("v1", "Pod", namespace, selector)
        kubelet.set_phase(server, "Running", restarts=2)
        wait_for(lambda: phase() == "Failed", timeout=30, what="the job Failed")
    except AssertionError as error:
        return [str(error)]
    failed = cluster.condition(client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, name), "Failed")
    found: list[str] = []
    started, killed = time.monotonic(), False
    while time.monotonic() - started < hold and not found:
        time.sleep(1)
        if not killed and time.monotonic() - started >= hold / 2:
            operators.kill()
            killed = True
        job = client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, name)
        status, now = job["status"], cluster.condition(job, "Failed")
        replicas = client.get("apps/v1", "Deployment", namespace, f"{name}-server")["spec"]["replicas"]
        if status.get("phase") != "Failed" or (now.get("reason"), now.get("message")) != (failed["reason"], failed["message"]):
            found.append(f"{time.monotonic() - started:.0f} s after Failed the job read {status.get('phase')}: {now}")
        elif replicas != 0:
            found.append(f"{time.monotonic() - started:.0f} s after Failed its server was scaled to {replicas}")
        elif [p for p in client.list("v1", "Pod", namespace, selector) if not p["metadata"].get("deletionTimestamp")]:
            found.append(f"{time.monotonic() - started:.0f} s after Failed a server pod was made again")
    return found


def api_server_outage(kubeconfig: str, kubelet) -> Callable[[float], None]:
    """A fault: the API server restarted (the nodes' kubelet stands by meanwhile)."""

    def fault(at: float) -> None:
        kubelet.outage.set()
        try:
            restart_api_server(kubeconfig)
            time.sleep(2)
        finally:
            kubelet.outage.clear()

    return fault


def impersonating(kubeconfig: str, user: str):
    """An API client of the cluster's admin that acts as user (the job server's account)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    api_client = k8s.ApiClient(configuration)
    api_client.set_default_header("Impersonate-User", user)
    return api_client


def server_identity(kubeconfig: str) -> Callable[[str, str], object]:
    return lambda namespace, job: impersonating(kubeconfig, f"system:serviceaccount:{namespace}:{job}-server")


def snapshot(client: kube.Client, namespace: str, job: str) -> str:
    """What a trial that did not complete left: the job's status, its workloads, their pods
    and the nodes' taints, a line each (for the failure's message)."""
    lines = []
    try:
        found = client.get("bouquet.dev/v1alpha1", "FederatedJob", namespace, job) or {}
        status = found.get("status", {})
        lines.append(f"job {job}: phase {status.get('phase')}")
        lines += [f"  {c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}" for c in status.get("conditions", [])]
        selector = f"bouquet.dev/job={job}"
        for d in client.list("apps/v1", "Deployment", namespace, selector):
            lines.append(f"Deployment {d['metadata']['name']}: replicas {d['spec'].get('replicas')}, status {d.get('status', {})}")
        for j in client.list("batch/v1", "Job", namespace, selector):
            lines.append(f"Job {j['metadata']['name']}: status {j.get('status', {})}")
        for p in client.list("v1", "Pod", namespace, selector):
            meta, spec, status = p["metadata"], p["spec"], p.get("status", {})
            deleting = " (deleting)" if meta.get("deletionTimestamp") else ""
            lines.append(f"Pod {meta['name']}: node {spec.get('nodeName')}, {status.get('phase')}{deleting}")
        for n in client.request("GET", "/api/v1/nodes")["items"]:
            lines.append(f"Node {n['metadata']['name']}: taints {[t['key'] for t in n['spec'].get('taints', [])]}")
    except Exception as error:  # noqa: BLE001 - what could be read is enough
        lines.append(f"(could not read the rest: {error})")
    return "\n".join(lines)
