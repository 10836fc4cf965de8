"""A server killed mid-run and started again continues from its last checkpoint: the sites
reconnect, and the history ends with every round exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bouquet import jobfile, kubeyaml, tls
from bouquet_workloads import flower
from bouquet_workloads.local import write_builtin_shares
from support.processes import processes_mentioning, site_args, start_bouquet
from support.prometheus import free_port

pytestmark = pytest.mark.slow

ROUNDS = 6
JOB = {
    "apiVersion": "bouquet.dev/v1alpha1",
    "kind": "FederatedJob",
    "metadata": {"name": "resume"},
    "spec": {
        "rounds": ROUNDS,
        "strategy": {"name": "FedAdam", "fractionEvaluate": 0, "serverLearningRate": 0.05},
        "task": {"labelColumn": "diagnosis", "training": {"learningRate": 0.05}},
        "dataset": {"name": "breast-cancer"},
        "sites": [{"name": "site-a", "gpus": 1}, {"name": "site-b"}],
    },
}


def history(out: Path) -> list[dict]:
    try:
        return json.loads((out / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_for(condition, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n" + "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists()))


def kill_tree(process: subprocess.Popen) -> None:
    for pid in [process.pid, *flower.descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@pytest.mark.parametrize("stop", ["killed", "terminated"])
def test_a_stopped_server_resumes_from_last_checkpoint(tmp_path, stop):
    """The server killed (SIGKILL, nothing of it stops cleanly) or told to stop (SIGTERM, as
    when its pod is deleted) mid-run, and started again on the same output."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(kubeyaml.dump(JOB))
    job = jobfile.load(job_file)
    out = tmp_path / "out"
    data = write_builtin_shares(job, tmp_path / "data")
    certs = tls.issue("resume", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    port = free_port()
    server_log = tmp_path / "server.log"
    server_args = [
        str(job_file),
        "--out",
        str(out),
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--tls-dir",
        str(tmp_path / "tls"),
    ]
    site_logs = [tmp_path / f"{name}.log" for name in data]

    server = start_bouquet(["server", *server_args], server_log)
    sites = [
        start_bouquet(site_args(job_file, name, port, path, certs["ca.crt"]), log)
        for (name, path), log in zip(data.items(), site_logs, strict=True)
    ]
    try:
        wait_for(lambda: len(history(out)) >= 2, 240, "two rounds", [server_log, *site_logs])
        if stop == "killed":
            kill_tree(server)
        else:
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 130  # it stopped its Flower processes and exited as Ctrl-C makes it
        before = history(out)
        assert 2 <= len(before) < ROUNDS

        restarted = start_bouquet(["server", *server_args], server_log)
        wait_for(lambda: restarted.poll() is not None, 300, "the restarted server to finish", [server_log, *site_logs])
        assert restarted.returncode == 0, server_log.read_text()[-3000:]
        # Told that the run is over, each site ends by itself with success (a Job completes).
        wait_for(lambda: all(s.poll() is not None for s in sites), 60, "the sites to end", site_logs)
        assert [s.returncode for s in sites] == [0, 0]
    finally:
        for process in [server, *sites]:
            if process.poll() is None:
                kill_tree(process)

    after = history(out)
    assert [e["round"] for e in after] == list(range(1, ROUNDS + 1))
    assert after[: len(before)] == before  # committed rounds were kept, not trained again
    assert f"continuing after round {len(before)}" in server_log.read_text()
    model = json.loads((out / "model.json").read_text())
    assert model["rounds"] == ROUNDS and model["metrics"]["accuracy"] > 0.85
    trained = [json.loads(line)["round"] for line in (out / "audit.jsonl").read_text().splitlines() if '"train"' in line]
    # Each round after the checkpoint was trained once after the restart; at most the
    # round cut short by the kill appears twice (its replies arrived before the kill).
    assert sorted(set(trained)) == list(range(1, ROUNDS + 1))
    assert processes_mentioning(str(out)) == []
    # site-a asked for a GPU; this machine has none, and the site says so.
    assert "asks for 1 GPU(s) but CUDA is not available: training on the CPU" in site_logs[0].read_text()
    assert "CUDA" not in site_logs[1].read_text()
