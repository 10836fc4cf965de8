"""The environment Bouquet starts Flower's processes in."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.proto.control_pb2 import ListRunsRequest

from bouquet import identity, tls
from bouquet.schema import load_valid
from bouquet_workloads import flower
from bouquet_workloads.server import Server
from support.processes import processes_mentioning

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "breast-cancer.yaml"


def test_flowers_processes_report_nothing_to_flowers_servers(monkeypatch):
    """Flower's telemetry posts each process's start and end (with the machine's platform)
    to Flower's servers; in the environment Bouquet gives its processes it is off, whatever
    the caller's environment says, and Flower itself reads it so."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    env = flower.process_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    probe = "from flwr.supercore.telemetry import EventType, event; print(event(EventType.FLWR_CLIENTAPP_RUN_ENTER).result(timeout=30))"
    sent = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "disabled"


@pytest.mark.slow
def test_the_superlinks_control_api_is_called_from_this_process(tmp_path):
    """Control does over TLS what `flwr supernode register`, `flwr run` and `flwr ls --run-id`
    do, against a real SuperLink: a site key is registered under the site's name, a key Flower
    would refuse is refused with the site named, a run submitted is of the job's app (the
    bundle the sites and the server's SuperExec are pinned to) and under way (its sites never
    come), and a run the SuperLink does not know and a SuperLink whose certificate another CA
    signed are errors that say so."""
    job = load_valid(yaml.safe_load(EXAMPLE.read_text()))
    certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    other = tls.issue("other", ["localhost", "127.0.0.1"]).write(tmp_path / "other")
    job_tls = flower.Tls(certs["ca.crt"], certs["tls.crt"], certs["tls.key"])
    _, public = identity.make().write(tmp_path / "keys" / "hospital-a")
    ed25519 = tmp_path / "ed25519.pub"  # a key of a curve Flower does not admit
    ed25519.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))
    processes = flower.Processes(tmp_path / "logs")
    server = Server(job, tmp_path / "out", job_tls, processes)
    control = None
    try:
        server.start()
        control = flower.Control(server.superlink_port, job_tls)
        nodes = flower.register_site_keys({"hospital-a": public}, control)
        [(node, entry)] = nodes.items()
        assert node > 0 and entry["site"] == "hospital-a"
        with pytest.raises(flower.LaunchError, match="site hospital-b's public key .* is not an EC key on a NIST curve"):
            control.register(ed25519, "hospital-b")
        with pytest.raises(flower.LaunchError, match="site hospital-c's public key .* cannot be read"):
            control.register(tmp_path / "missing.pub", "hospital-c")
        run_id = server.submit()
        assert control.run_status(run_id).split(":")[0] in ("pending", "starting", "running")
        assert control.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id].fab_hash == flower.app_sha256(job)
        with pytest.raises(flower.LaunchError, match=f"does not know run {run_id + 1}|did not say how run {run_id + 1}"):
            control.run_status(run_id + 1)
        with pytest.raises(flower.LaunchError, match="CERTIFICATE_VERIFY_FAILED"):
            flower.Control(server.superlink_port, flower.Tls(other["ca.crt"])).run_status(run_id)
    finally:
        if control is not None:
            control.close()
        processes.stop()
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []


def test_processes_told_to_stop_are_no_failure_and_leave_nothing_behind(tmp_path):
    """terminate() asks a process tree to stop without waiting (a site once the run is over):
    its end is then no failure for check(), while another process's end still is; stop()
    then leaves nothing of either tree."""
    processes = flower.Processes(tmp_path / "logs", env={})
    spawner = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    site = processes.start("site-a", [sys.executable, "-c", spawner])
    other = processes.start("other", [sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = time.monotonic() + 30
    while not flower.descendants(site.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    [grandchild] = flower.descendants(site.pid)
    processes.terminate(["site-a"])
    assert site.wait(10) == -signal.SIGTERM
    processes.check()
    other.kill()
    other.wait()
    with pytest.raises(flower.LaunchError, match="other exited"):
        processes.check()
    processes.stop()
    assert processes.running == {} and processes.ending == set()
    assert not flower._alive(grandchild), "the site's child was stopped with it"


def test_the_servers_verdict_is_passed_on_once_and_only_when_this_run_gave_it(tmp_path, monkeypatch):
    """Server.follow calls ended once, with the ServerApp's verdict, as soon as the ServerApp
    reports it (before Flower says the run is over), and never for a verdict an earlier run
    left in the output folder. Flower's side is played: the run's status, and the progress
    the ServerApp writes, look by look."""
    from bouquet_workloads import outputs
    from bouquet_workloads import server as server_module

    monkeypatch.setattr(server_module, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(server_module, "ENDING_POLL_SECONDS", 0.0)
    looks = [("running", "Failed"), ("running", "Failed"), ("running", "Running"), ("running", "Succeeded"), ("running", "Succeeded")]
    looks += [("finished:completed", "Succeeded")]
    heard: list[tuple[int, str]] = []

    class Control:
        calls = 0

        def run_status(self, run_id):
            status, state = looks[self.calls]
            outputs.write_json(tmp_path / outputs.PROGRESS, {"state": state})
            self.calls += 1
            return status

    server = Server.__new__(Server)
    server.job, server.out, server.run_id, server.control = {"spec": {"rounds": 1}}, tmp_path, 1, Control()
    server.processes = flower.Processes(tmp_path / "logs", env={})
    server.gate = type("Gate", (), {"alive": True})()
    server.follow(lambda line: None, time.monotonic(), ended=lambda verdict: heard.append((server.control.calls, verdict)))
    assert heard == [(4, "Succeeded")], "at the first look at this run's verdict, and once"
