import json
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bouquet_workloads.metrics import JobCollector, serve
from support.prometheus import free_port


def entry(round_: int, duration: float) -> dict:
    return {
        "round": round_,
        "sites": ["a", "b"],
        "train": {"loss": 0.5},
        "loss": 0.4 / round_,
        "accuracy": 0.8 + round_ / 100,
        "auroc": 0.9,
        "evaluatedOn": "held-out test set",
        "siteEvaluation": {},
        "durationSeconds": duration,
        "bytesSent": 1000,
        "bytesReceived": 500,
    }


def write(out, history, state="Running", rounds=10):
    (out / "history.json").write_text(json.dumps(history))
    (out / "progress.json").write_text(json.dumps({"state": state, "round": len(history), "rounds": rounds}))


def exposition(out) -> str:
    registry = CollectorRegistry()
    registry.register(JobCollector(out, "ns", "job-1"))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels["namespace"] == "ns" and sample.labels["job_name"] == "job-1"
            key = sample.name + (f'{{le="{sample.labels["le"]}"}}' if "le" in sample.labels else "")
            found[key] = sample.value
    return found


def test_metrics_follow_the_committed_history(tmp_path):
    write(tmp_path, [entry(1, 3.0), entry(2, 12.0), entry(3, 40.0)])
    found = samples(exposition(tmp_path))
    assert found["bouquet_job_current_round"] == 3
    assert found["bouquet_job_rounds"] == 10
    assert found["bouquet_job_completed"] == 0
    assert found["bouquet_round_accuracy"] == pytest.approx(0.83)
    assert found["bouquet_round_sites"] == 2
    assert found["bouquet_bytes_sent_total"] == 3000 and found["bouquet_bytes_received_total"] == 1500
    assert found["bouquet_round_duration_seconds_count"] == 3 and found["bouquet_round_duration_seconds_sum"] == 55.0
    assert found['bouquet_round_duration_seconds_bucket{le="2.5"}'] == 0
    assert found['bouquet_round_duration_seconds_bucket{le="5.0"}'] == 1
    assert found['bouquet_round_duration_seconds_bucket{le="15.0"}'] == 2
    assert found['bouquet_round_duration_seconds_bucket{le="+Inf"}'] == 3


def test_a_round_whose_evaluation_comes_with_the_next_leaves_the_previous_rounds_metrics(tmp_path):
    """Scored by the sites alone, a round's model is evaluated in the next round's exchange
    (bouquet_workloads.server_app.evaluates_ahead): until then the metrics are the last ones known."""
    pending = {k: v for k, v in entry(3, 40.0).items() if k not in ("loss", "accuracy", "auroc", "evaluatedOn", "siteEvaluation")}
    pending["awaitingSiteEvaluation"] = True
    write(tmp_path, [entry(1, 3.0), entry(2, 12.0), pending])
    found = samples(exposition(tmp_path))
    assert found["bouquet_job_current_round"] == 3
    assert found["bouquet_round_accuracy"] == pytest.approx(0.82)


def test_a_job_that_has_not_started_has_round_zero_and_no_accuracy(tmp_path):
    found = samples(exposition(tmp_path))
    assert found["bouquet_job_current_round"] == 0
    assert "bouquet_round_accuracy" not in found


def test_promtool_finds_nothing_to_criticise(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package, which brings it"
    write(tmp_path, [entry(1, 3.0), entry(2, 12.0)], state="Succeeded", rounds=2)
    result = subprocess.run([promtool, "check", "metrics"], input=exposition(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_the_endpoint_serves_what_the_files_say_at_each_scrape(tmp_path):
    port = free_port()
    server, _ = serve(tmp_path, "ns", "job-1", port)
    try:
        write(tmp_path, [entry(1, 3.0)])
        first = samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        write(tmp_path, [entry(1, 3.0), entry(2, 4.0)], state="Succeeded", rounds=2)
        second = samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert first["bouquet_job_current_round"] == 1 and first["bouquet_job_completed"] == 0
    assert second["bouquet_job_current_round"] == 2 and second["bouquet_job_completed"] == 1


def test_refused_runs_are_each_sites_highest_report(tmp_path):
    history = [entry(1, 3.0), entry(2, 3.0), entry(3, 3.0)]
    history[1]["refusedRuns"] = {"a": 2}
    history[2]["refusedRuns"] = {"a": 1, "b": 1}  # a restarted and refused another since
    write(tmp_path, history)
    refused = {
        s.labels["site"]: s.value
        for family in text_string_to_metric_families(exposition(tmp_path))
        for s in family.samples
        if s.name == "bouquet_site_refused_runs"
    }
    assert refused == {"a": 2, "b": 1}
    write(tmp_path, history[:1])
    assert "bouquet_site_refused_runs{" not in exposition(tmp_path), "no series for sites that refused nothing"
