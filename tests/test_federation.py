"""A real `bouquet run`, attacked during its rounds by an outsider who holds the job's CA
certificate (every hospital holds it) and reaches the server's port, and by a compromised
server that submits an app of its own. Nothing foreign runs at any site, no site file is
opened for it, and the run completes with every round exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomli_w
import yaml
from prometheus_client import CollectorRegistry

from bouquet import identity
from bouquet_workloads import flower
from bouquet_workloads.metrics import JobCollector
from support.processes import processes_mentioning, start_bouquet, stop_bouquet
from support.prometheus import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FOREIGN_APP = ROOT / "tests" / "support" / "foreign_app"


def flwr(args: list[str], home: Path, address: str, ca: Path | None) -> dict:
    """The flwr CLI against address, as an outsider configures it: the job's CA, nothing else
    (ca None: a server without TLS)."""
    home.mkdir(parents=True, exist_ok=True)
    connection = {"address": address, **({"root-certificates": str(ca)} if ca else {"insecure": True})}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "x", "x": connection}}))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env={**flower.process_env(), "FLWR_HOME": str(home)},
        timeout=120,
    )
    return json.loads(result.stdout)


def request(port: int, ca: Path, method: str, path: str) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    call = urllib.request.Request(f"https://localhost:{port}{path}", data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(call, context=context, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def metrics_registry(out: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobCollector(out, "", "breast-cancer"))
    return registry


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def job_file(tmp_path) -> Path:
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["spec"]["rounds"] = 3
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_an_outsider_and_a_foreign_app_get_nowhere(tmp_path, job_file):
    out, log, markers = tmp_path / "out", tmp_path / "run.log", tmp_path / "markers"
    markers.mkdir()
    run = start_bouquet(["run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())], log)
    try:
        wait_for(lambda: "server up on" in log.read_text() or run.poll() is not None, "the server to start")
        port = int(re.search(r"server up on localhost:(\d+)", log.read_text()).group(1))
        with sites_held(run.pid):
            attack(tmp_path, out, port, markers, job_file)
        assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        stop_bouquet(run)
    assert list(markers.iterdir()) == [], "nothing of the foreign app ran, at the server or at a site"
    history = json.loads((out / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2, 3]
    assert all(entry["sites"] == ["hospital-a", "hospital-b", "hospital-c"] for entry in history)
    assert not any((out / "logs" / f"site-{site}-refused.json").exists() for site in ("hospital-a", "hospital-b", "hospital-c"))
    assert processes_mentioning(str(out)) == []


@contextlib.contextmanager
def sites_held(run_pid: int):
    """The run's three site workers stopped (SIGSTOP) while the body runs, then let go: the
    run cannot get past its first exchange with the sites meanwhile, so every attack meets a
    run that is under way (a round waits for its replies for roundTimeoutSeconds, 600 s)."""
    workers: list[int] = []

    def found() -> bool:
        # A local run's workers are forked by its fork server, and named so (bouquet_workloads.forks).
        workers[:] = [pid for pid in flower.descendants(run_pid) if name(pid) == "bouquet-worker"]
        return len(workers) == 3

    wait_for(found, "the three sites' workers to start")
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)


def name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def attack(tmp_path: Path, out: Path, port: int, markers: Path, job_file: Path) -> None:
    """Every attack of an outsider holding the job's CA, then of someone on the server."""
    ca = out / "tls" / "ca.crt"
    address = f"localhost:{port}"

    # The Control API is not on the port the sites reach: no listing, no submitting, no registering.
    listed = flwr(["ls", "x"], tmp_path / "outsider", address, ca)
    assert not listed.get("success", True), listed
    submitted = flwr(["run", str(FOREIGN_APP), "x", "--run-config", f'marker-dir="{markers}"'], tmp_path / "outsider", address, ca)
    assert not submitted.get("success", True), submitted
    attacker_key, attacker_pub = identity.make().write(tmp_path / "attacker")
    registered = flwr(["supernode", "register", str(attacker_pub), "x"], tmp_path / "outsider", address, ca)
    assert not registered.get("success", True), registered
    for method, path in [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/get-nodes"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ]:
        assert request(port, ca, method, path) == 404, (method, path)

    # SuperNodes of the outsider's own, claiming a real site's name: with no key, with a key of its own.
    data = out / "data" / "hospital-a.csv"
    for name, key in [("no-key", None), ("own-key", attacker_key)]:
        command = flower.supernode_command(
            address,
            "hospital-a",
            data,
            None,
            free_port(),
            ca,
            flower.SiteIdentity(flower.app_sha256(yaml.safe_load(job_file.read_text())), key),
        )
        with (tmp_path / f"{name}.log").open("w") as sink:
            result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=60, env=flower.process_env())
        assert result.returncode != 0
        assert "SuperNode ID" not in (tmp_path / f"{name}.log").read_text()

    # Someone on the server submits an app of its own on the loopback port, where the
    # Control API answers: the server's SuperExec does not start its ServerApp.
    # (the SuperLink's one port, which the server's SuperExec is given)
    [superexec] = [c for c in processes_mentioning(str(out)) if "bouquet_workloads.superexec" in c]
    internal = re.search(r"--runtime-api-address 127\.0\.0\.1:(\d+)", superexec).group(1)
    foreign = flwr(
        ["run", str(FOREIGN_APP), "x", "--run-config", f'marker-dir="{markers}"'], tmp_path / "insider", f"localhost:{internal}", ca
    )
    assert foreign.get("success", True), foreign
    server_refusals = out / "logs" / "server-refused.json"
    wait_for(server_refusals.exists, "the server to refuse the foreign run")
    assert [str(entry["run"]) for entry in json.loads(server_refusals.read_text())] == [str(foreign["run-id"])]
    assert "refused run" in (out / "logs" / "server.log").read_text()


def test_a_site_runs_only_its_jobs_app_whatever_a_server_asks(tmp_path, job_file):
    """A server that runs anything (stock Flower, as one taken over would) starts a foreign
    app and asks the site for its records: the site's SuperNode refuses the run before it
    fetches its bundle; no ClientApp of it starts, no record leaves."""
    markers, data, refusals = tmp_path / "markers", tmp_path / "hospital-a.csv", tmp_path / "site-refused.json"
    markers.mkdir()
    data.write_text("mean_radius,diagnosis\n1.0,0\n")
    port = free_port()
    processes = flower.Processes(tmp_path / "logs")
    bin_dir = Path(sys.executable).parent
    try:
        processes.start(
            "stock-server",
            [str(bin_dir / "flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)],
        )
        pin = flower.SiteIdentity(flower.app_sha256(yaml.safe_load(job_file.read_text())), None, refusals)
        processes.start("site", flower.supernode_command(f"127.0.0.1:{port}", "hospital-a", data, None, free_port(), None, pin))
        wait_for(lambda: "SuperNode ID" in processes.tail("site", 200), "the site to join the server")
        foreign = ["run", str(FOREIGN_APP), "x", "--run-config", f'marker-dir="{markers}"']
        run_id = flwr(foreign, tmp_path / "intruder", f"127.0.0.1:{port}", None)["run-id"]
        wait_for(refusals.exists, "the site to refuse the foreign run")
        wait_for(lambda: (markers / "serverapp-ran").exists(), "the foreign ServerApp to have asked")
        time.sleep(3)  # time enough for a ClientApp to have started, had the site taken the run
        assert [str(entry["run"]) for entry in json.loads(refusals.read_text())] == [str(run_id)]
        assert "refused run" in processes.tail("site", 200)
        assert sorted(p.name for p in markers.iterdir()) == ["serverapp-ran"], "no ClientApp ran, no record was sent"
    finally:
        processes.stop()
    assert processes_mentioning(str(tmp_path)) == []


def test_a_sites_worker_runs_only_its_jobs_app_even_behind_a_supernode_that_takes_any_run(tmp_path, job_file):
    """The worker's own look at each task's bundle, behind a stock SuperNode (no pin of its
    own) and a stock server running a foreign app: the task is answered with an error, the
    foreign ClientApp is neither installed nor started, and the refusal is listed."""
    markers, data, refusals = tmp_path / "markers", tmp_path / "hospital-a.csv", tmp_path / "worker-refused.json"
    markers.mkdir()
    data.write_text("mean_radius,diagnosis\n1.0,0\n")
    port, runtime_port = free_port(), free_port()
    processes = flower.Processes(tmp_path / "logs")
    bin_dir = Path(sys.executable).parent
    try:
        processes.start(
            "stock-server",
            [str(bin_dir / "flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)],
        )
        node_config = f'site="hospital-a" data-path="{data}"'
        processes.start(
            "stock-site",
            [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--isolation", "process"]
            + ["--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config],
        )
        app_sha256 = flower.app_sha256(yaml.safe_load(job_file.read_text()))
        processes.start(
            "worker",
            [sys.executable, "-m", "bouquet_workloads.worker", "--app-sha256", app_sha256]
            + ["--runtime-api-address", f"127.0.0.1:{runtime_port}", "--refusals", str(refusals)],
        )
        wait_for(lambda: "SuperNode ID" in processes.tail("stock-site", 200), "the site to join the server")
        foreign = ["run", str(FOREIGN_APP), "x", "--run-config", f'marker-dir="{markers}"']
        run_id = flwr(foreign, tmp_path / "intruder", f"127.0.0.1:{port}", None)["run-id"]
        wait_for(refusals.exists, "the worker to refuse the foreign run's task")
        wait_for(lambda: (markers / "serverapp-ran").exists(), "the foreign ServerApp to have asked")
        time.sleep(3)  # time enough for its ClientApp to have run, had the worker taken the task
        assert {str(entry["run"]) for entry in json.loads(refusals.read_text())} == {str(run_id)}
        assert "refused run" in processes.tail("worker", 200)
        assert sorted(p.name for p in markers.iterdir()) == ["serverapp-ran"], "no ClientApp ran, no record was sent"
        assert processes.running["worker"].poll() is None  # and the worker goes on serving its site
    finally:
        processes.stop()
    assert processes_mentioning(str(tmp_path)) == []
