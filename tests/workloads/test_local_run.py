"""`bouquet run` of examples/breast-cancer.yaml, for real: a SuperLink and three SuperNodes
over TLS on loopback, scraped by a real Prometheus, with every site process's file reads
recorded. One run; each test checks one promise about it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.numpy
import yaml

from bouquet_workloads.task import build_model, load_arrays
from support.dashboards import empty_panels
from support.processes import processes_mentioning, stop_bouquet
from support.prometheus import Prometheus, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
AUDIT_HOOK = Path(__file__).resolve().parents[1] / "support" / "audit"
RUN_TIMEOUT = 600

pytestmark = pytest.mark.slow


@dataclass
class Run:
    returncode: int
    output: str
    out: Path
    opens: list[tuple[str, str]]
    mid_run_round: float | None
    mid_run_history_rounds: int
    final_round: float | None
    final_accuracy: float | None
    round_histogram_count: float | None
    empty_dashboard_panels: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    work = tmp_path_factory.mktemp("breast-cancer")
    out = work / "out"
    opens_log = work / "opens.log"
    metrics_port = free_port()
    prometheus = Prometheus(work / "prometheus", [f"127.0.0.1:{metrics_port}"])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(AUDIT_HOOK), os.environ.get("PYTHONPATH", "")]),
        "BOUQUET_TEST_OPEN_LOG": str(opens_log),
        "BOUQUET_TEST_WATCH": str(out),
    }
    log = work / "bouquet-run.log"
    mid_run_round, mid_run_history_rounds, empty = None, 0, ["not asked"]
    try:
        with log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "bouquet", "run", str(EXAMPLE), "--out", str(out), "--metrics-port", str(metrics_port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
            )
            deadline = time.monotonic() + RUN_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                history = _read_json(out / "history.json") or []
                if not mid_run_history_rounds and len(history) >= 3:
                    mid_run_round = prometheus.first_value('bouquet_job_current_round{job_name="breast-cancer"} >= 3')
                    mid_run_history_rounds = len(_read_json(out / "history.json"))
                    empty = empty_panels(prometheus, "training")
                time.sleep(0.5)
            if process.poll() is None:
                stop_bouquet(process)
                pytest.fail(f"bouquet run did not finish within {RUN_TIMEOUT}s:\n{log.read_text()}")
        window = "[15m]"
        final_round = prometheus.value(f'last_over_time(bouquet_job_current_round{{job_name="breast-cancer"}}{window})')
        final_accuracy = prometheus.value(f'last_over_time(bouquet_round_accuracy{{job_name="breast-cancer"}}{window})')
        histogram_count = prometheus.value(f'last_over_time(bouquet_round_duration_seconds_count{{job_name="breast-cancer"}}{window})')
    finally:
        prometheus.stop()
    opens = [tuple(line.split("\t", 1)) for line in opens_log.read_text().splitlines()] if opens_log.exists() else []
    return Run(
        process.returncode,
        log.read_text(),
        out,
        opens,
        mid_run_round,
        mid_run_history_rounds,
        final_round,
        final_accuracy,
        histogram_count,
        empty,
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_run_succeeds_and_reports_progress(run):
    assert run.returncode == 0, run.output
    assert "round  10/10" in run.output
    assert "remaining" in run.output and "elapsed" in run.output


def test_federated_accuracy_reaches_target_and_is_near_the_centralized_baseline(run):
    model = json.loads((run.out / "model.json").read_text())
    baseline = json.loads((run.out / "baseline.json").read_text())
    assert model["evaluatedOn"] == baseline["evaluatedOn"] == "held-out test set"
    assert model["metrics"]["accuracy"] >= 0.93, model
    assert abs(model["metrics"]["accuracy"] - baseline["accuracy"]) <= 0.02, (model["metrics"], baseline)
    assert "centralized baseline" in run.output


def test_history_holds_every_round_exactly_once(run):
    history = json.loads((run.out / "history.json").read_text())
    rounds = yaml.safe_load(EXAMPLE.read_text())["spec"]["rounds"]
    assert [e["round"] for e in history] == list(range(1, rounds + 1))
    for entry in history:
        assert sorted(entry["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert {"loss", "accuracy", "auroc", "durationSeconds"} <= set(entry)


def test_model_file_loads_strictly_and_matches_its_sha256(run):
    info = json.loads((run.out / "model.json").read_text())
    weights_file = run.out / "model.safetensors"
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == info["sha256"]
    assert info["job"] == "breast-cancer" and info["rounds"] == 10 and info["strategy"] == "FedAvg"
    job = yaml.safe_load(EXAMPLE.read_text())
    model = build_model({**job["spec"]["task"]}, len(info["features"]), seed=0)
    load_arrays(model, safetensors.numpy.load_file(weights_file))  # strict=True inside


def test_report_and_checkpoints_are_written(run):
    assert (run.out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted(p.name for p in (run.out / "checkpoints").iterdir())
    assert checkpoints == ["round-000008.safetensors", "round-000009.safetensors", "round-000010.safetensors"]


def test_prometheus_reads_round_progress_and_final_metrics(run):
    model = json.loads((run.out / "model.json").read_text())
    assert run.mid_run_history_rounds < 10, "the run ended before Prometheus was asked mid-run"
    assert run.mid_run_round is not None and 3 <= run.mid_run_round <= run.mid_run_history_rounds
    assert run.final_round == 10
    assert run.final_accuracy == pytest.approx(model["metrics"]["accuracy"])
    assert run.round_histogram_count == 10


def test_every_training_dashboard_panel_returns_data_mid_run(run):
    assert run.empty_dashboard_panels == []


def test_each_site_process_reads_only_its_own_data(run):
    site_reads = {(role, Path(path).name) for role, path in run.opens if role.startswith("site:") and "/data/" in path}
    assert site_reads == {
        ("site:hospital-a", "hospital-a.csv"),
        ("site:hospital-b", "hospital-b.csv"),
        ("site:hospital-c", "hospital-c.csv"),
    }
    assert not [path for role, path in run.opens if role == "server" and "/data/" in path]


def test_server_received_weights_and_metrics_only(run):
    info = json.loads((run.out / "model.json").read_text())
    weights = safetensors.numpy.load_file(run.out / "model.safetensors")
    # The weights travel packed, one flat array per dtype (bouquet_workloads.wire): the model's, and nothing more.
    sizes: dict[str, int] = {}
    for value in weights.values():
        sizes[str(value.dtype)] = sizes.get(str(value.dtype), 0) + value.size
    expected_arrays = {dtype: {"shape": [size], "dtype": dtype} for dtype, size in sizes.items()}
    entries = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in entries} == {"data-check", "train", "run-finished"}
    for entry in entries:
        assert "error" not in entry, entry
        if entry["phase"] in ("train", "evaluate"):  # the site's name, and how many runs of other apps it refused
            assert entry["configs"] == {"site": ["name", "refusedRuns"]}
        else:
            assert entry["configs"] == {"site": ["name"]}
        if entry["phase"] == "run-finished":  # an acknowledgement: nothing else
            assert entry["arrays"] == {} and entry["metrics"] == {}
        elif entry["phase"] == "train":
            assert entry["arrays"] == {"arrays": expected_arrays}
            assert entry["metrics"] == {"metrics": {"loss": "float", "num-examples": "int"}}
        else:  # per-feature aggregates: one count, and one sum and sum of squares per feature
            features = len(info["features"])
            assert entry["arrays"] == {}
            assert entry["metrics"] == {"moments": {"count": 1, "sum": features, "sumsq": features}}


def test_no_process_is_left_running(run):
    assert processes_mentioning(str(run.out)) == []


def test_each_site_runs_every_message_in_one_warm_worker(run):
    # Flower's own SuperNode would start a ClientApp process, importing and loading the app
    # again, for each message; the site's worker loads it once and serves every message.
    rounds = yaml.safe_load(EXAMPLE.read_text())["spec"]["rounds"]
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        said = (run.out / "logs" / f"site-{site}.log").read_text()
        assert said.count("Loading ClientApp") == 1, site
        assert said.count("Receiving:") >= rounds + 2, site  # the data check, every round, the end
        assert "flwr-clientapp" not in said and "worker ended" not in said, site


def test_a_large_model_over_more_sites_trains_every_round_its_replies_let_in_a_few_at_a_time(tmp_path):
    """A 4 MB model (past PULL_ALONE_BYTES) over five sites, for real: the ServerApp takes each
    update alone and asks the gate to hold replies back until it took earlier ones; every
    round has every site, the bytes are the updates', and no reply waited out the gate's
    longest hold (the ServerApp said each time it took one)."""
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"]["name"] = "large"
    spec = job["spec"]
    spec["rounds"] = 2
    spec["task"]["model"] = {"mlp": {"hiddenSizes": [1024, 1024]}}
    spec["dataset"] = {"name": "breast-cancer", "partitioning": "IID", "testFraction": 0.2}
    spec["sites"] = [{"name": f"site-{i}"} for i in range(1, 6)]
    job_file, out = tmp_path / "large.yaml", tmp_path / "out"
    job_file.write_text(yaml.safe_dump(job))
    done = subprocess.run(
        [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    update = sum(v.nbytes for v in safetensors.numpy.load_file(out / "model.safetensors").values())
    assert update >= 4 << 20, "the model is large enough for its updates to be taken alone"
    history = json.loads((out / "history.json").read_text())
    assert [(e["round"], e["sites"]) for e in history] == [(r, [f"site-{i}" for i in range(1, 6)]) for r in (1, 2)]
    assert all(5 * update <= e["bytesReceived"] < 5 * update + 5 * 4096 for e in history), [e["bytesReceived"] for e in history]
    gate = (out / "logs" / "gate.log").read_text()
    assert "went in after" not in gate, gate
    assert processes_mentioning(str(out)) == []
