"""The environment Bouquet starts Flower's processes in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bouquet import tls
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
def test_the_run_status_is_asked_of_the_superlink_from_this_process(tmp_path):
    """RunStatus asks a real SuperLink over TLS, as `flwr ls --run-id` would: a submitted run
    (its sites never come) is under way, a run the SuperLink does not know and a SuperLink
    whose certificate another CA signed are errors that say so."""
    job = load_valid(yaml.safe_load(EXAMPLE.read_text()))
    certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    other = tls.issue("other", ["localhost", "127.0.0.1"]).write(tmp_path / "other")
    job_tls = flower.Tls(certs["ca.crt"], certs["tls.crt"], certs["tls.key"])
    processes = flower.Processes(tmp_path / "logs")
    server = Server(job, tmp_path / "out", job_tls, processes)
    try:
        server.start()
        run_id = server.submit()
        status = flower.RunStatus(server.superlink_port, job_tls, run_id)
        assert status().split(":")[0] in ("pending", "starting", "running")
        with pytest.raises(flower.LaunchError, match=f"does not know run {run_id + 1}|did not say how run {run_id + 1}"):
            flower.RunStatus(server.superlink_port, job_tls, run_id + 1)()
        with pytest.raises(flower.LaunchError, match="CERTIFICATE_VERIFY_FAILED"):
            flower.RunStatus(server.superlink_port, flower.Tls(other["ca.crt"]), run_id)()
        status.close()
    finally:
        processes.stop()
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []
