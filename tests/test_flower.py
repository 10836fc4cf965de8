"""The environment Bouquet starts Flower's processes in."""

from __future__ import annotations

import subprocess
import sys

from bouquet import flower


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
