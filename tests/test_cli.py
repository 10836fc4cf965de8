"""The `bouquet` command's answers to bad input: a clear message naming the field or the
option, a non-zero exit, and nothing started or written."""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bouquet import cli, jobfile, kubeyaml
from bouquet_workloads import datasets
from bouquet_workloads.local import write_builtin_shares
from support.processes import processes_mentioning
from support.prometheus import free_port

ROOT = Path(__file__).resolve().parents[1]
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("**/*.yaml") if "kind: FederatedJob" in p.read_text())


def expected(path: Path) -> tuple[str, str]:
    """What an invalid job file's first line promises: the start of the violation's line
    (its field path, or nothing for a rule on the whole object, written <root>) and a
    fragment of its message."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <path> <message>'"
    field, _, message = first.removeprefix("# expect: ").partition(" ")
    return ("" if field == "<root>" else f"{field}: "), message


def test_there_are_at_least_15_distinct_invalid_jobs():
    assert len(INVALID) >= 15
    assert len({repr(yaml.safe_load(p.read_text())) for p in INVALID}) == len(INVALID)


def test_examples_are_valid(capsys):
    assert cli.main(["validate", *map(str, EXAMPLES)]) == 0
    assert capsys.readouterr().out.count(": valid") == len(EXAMPLES)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_validate_rejects_invalid_job_naming_the_field(path, capsys):
    field, message = expected(path)
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"  {field}" in err and message in err, err


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_run_rejects_invalid_job_before_starting_anything(path, tmp_path, capsys):
    field, message = expected(path)
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--out", str(out), "--metrics-port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert f"  {field}" in err and message in err, err
    assert not out.exists()
    assert processes_mentioning(str(out)) == []


def test_run_command_exits_non_zero_with_the_field_in_its_message(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bouquet", "run", str(INVALID[0]), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    field, message = expected(INVALID[0])
    assert result.returncode == 1
    assert field in result.stderr and message in result.stderr
    assert not out.exists()


def own_data_job(tmp_path: Path, data_path: str) -> Path:
    job = {
        "apiVersion": "bouquet.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "own-data"},
        "spec": {
            "rounds": 2,
            "task": {"model": {"logreg": {}}, "features": ["a", "b"], "labelColumn": "y"},
            "sites": [{"name": "one", "data": {"path": data_path}}],
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(kubeyaml.dump(job))
    return path


def test_missing_data_file_is_named_and_nothing_starts(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(own_data_job(tmp_path, "missing.csv")), "--out", str(out), "--metrics-port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "spec.sites[0].data.path" in err and "missing.csv" in err and "does not exist" in err
    assert not out.exists()


def test_metrics_port_in_use_is_reported_and_nothing_starts(tmp_path, capsys):
    out = tmp_path / "out"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["run", str(ROOT / "examples" / "breast-cancer.yaml"), "--out", str(out), "--metrics-port", str(port)]) == 1
    assert f"port {port} is already in use (--metrics-port)" in capsys.readouterr().err
    assert not out.exists()


def test_bad_port_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(ROOT / "examples" / "breast-cancer.yaml"), "--metrics-port", "70000"])
    assert exit_info.value.code == 2
    assert "--metrics-port" in capsys.readouterr().err


def own_data_sites(tmp_path: Path, rounds: int = 2) -> tuple[Path, dict[str, Path]]:
    """examples/breast-cancer.yaml with each site's share of the data as a file of its own:
    the job file and the files."""
    example = jobfile.load(ROOT / "examples" / "breast-cancer.yaml")
    files = write_builtin_shares(example, tmp_path / "data")
    features, label = datasets.describe("breast-cancer")
    job = {
        "apiVersion": "bouquet.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "own-data"},
        "spec": {
            "rounds": rounds,
            "strategy": {"name": "FedAvg", "fractionEvaluate": 0},
            "task": {"features": features, "labelColumn": label, "training": {"learningRate": 0.05}},
            "sites": [{"name": name, "data": {"path": f"data/{path.name}"}} for name, path in files.items()],
        },
    }
    (tmp_path / "job.yaml").write_text(kubeyaml.dump(job))
    return tmp_path / "job.yaml", files


def set_cell(path: Path, row: int, column: str, value: str | None) -> None:
    """Puts value in one cell of a CSV file (row counted from 1 after the header), or
    drops the column with value None."""
    rows = list(csv.reader(path.read_text().splitlines()))
    at = rows[0].index(column)
    for i, cells in enumerate(rows):
        if value is None:
            del cells[at]
        elif i == row:
            cells[at] = value
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


BAD_DATA = {
    "missing-label-column": ("diagnosis", None, "no column 'diagnosis' (the file has: mean_radius, "),
    "non-numeric-value": ("mean_texture", "abc", "column 'mean_texture', row 5: 'abc' is not a number"),
    "empty-cell": ("worst_area", "", "column 'worst_area', row 5: the cell is empty: impute missing values or drop their rows"),
    "unknown-label": ("diagnosis", "2", "column 'diagnosis', row 5: '2' is not a class of the task: labels are integers from 0 to 1"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_a_sites_bad_data_stops_the_run_before_anything_starts(case, tmp_path, capsys):
    job_file, files = own_data_sites(tmp_path)
    column, value, message = BAD_DATA[case]
    set_cell(files["hospital-b"], 5, column, value)
    out = tmp_path / "out"
    assert cli.main(["run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "error: the run cannot start: 2 of 3 sites have data they can train on, "
        "and strategy.minSitesToStart is 3 (the default: every site):"
    )
    assert lines[-1].startswith(f"  site hospital-b: {files['hospital-b']}: {message}"), lines  # the cause, last
    assert not out.exists()  # no model, no checkpoint: a rerun starts from round 1
    assert processes_mentioning(str(out)) == []


@pytest.mark.slow
def test_after_the_data_is_fixed_every_site_trains_from_round_1(tmp_path):
    job_file, files = own_data_sites(tmp_path)
    good = files["hospital-b"].read_text()
    set_cell(files["hospital-b"], 5, "mean_texture", "abc")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "'abc' is not a number" in refused.stderr.splitlines()[-1]
    files["hospital-b"].write_text(good)
    fixed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "then round 1 begins" in fixed.stdout and "continuing after" not in fixed.stdout
    history = json.loads((out / "history.json").read_text())
    assert [(e["round"], e["sites"]) for e in history] == [(r, ["hospital-a", "hospital-b", "hospital-c"]) for r in (1, 2)]
    assert processes_mentioning(str(out)) == []


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_the_same_command_resumes(tmp_path):
    job = yaml.safe_load((ROOT / "examples" / "sleep-quality.yaml").read_text())
    job["spec"]["rounds"] = 3  # site evaluation on: the round stopped at waits for it (server_app.evaluates_ahead)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(kubeyaml.dump(job))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        # As from a terminal: SIGINT is not ignored, even if this test runs in the background.
        first = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list((out / "checkpoints").glob("round-*.safetensors")):
            assert first.poll() is None, log.read_text()
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 130, log.read_text()
    assert "run the same command again to resume" in log.read_text()
    assert processes_mentioning(str(out)) == []

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing after round" in second.stdout
    history = yaml.safe_load((out / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2, 3]
    assert all({"loss", "accuracy"} <= set(e["siteEvaluation"]) for e in history)
    assert processes_mentioning(str(out)) == []


def test_the_operator_validate_and_render_do_not_load_torch_or_flower():
    """Kept out so the operator's memory is that of a small controller (make bench-operator)."""
    probe = "import sys, bouquet.cli, bouquet.controller; print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_validate_warns_of_a_key_given_twice_and_judges_the_last_value_as_kubectl_does(tmp_path, capsys):
    job = (ROOT / "examples" / "breast-cancer.yaml").read_text().replace("  rounds: 10\n", "  rounds: 10\n  rounds: 0\n")
    (tmp_path / "job.yaml").write_text(job)
    assert cli.main(["validate", str(tmp_path / "job.yaml")]) == 1
    err = capsys.readouterr().err
    assert "spec.rounds: Invalid value: 0: spec.rounds in body should be greater than or equal to 1" in err
    assert "warning: line 17: the key 'rounds' is given again; kubectl takes this last value" in err


def test_a_run_whose_saved_rounds_left_out_a_required_site_is_not_continued(tmp_path, capsys):
    """As a run made before sites' data was checked would have it: round 2 without hospital-b."""
    job_file, _ = own_data_sites(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps(jobfile.load(job_file)))
    history = [{"round": 1, "sites": ["hospital-a", "hospital-b", "hospital-c"]}, {"round": 2, "sites": ["hospital-a", "hospital-c"]}]
    (out / "history.json").write_text(json.dumps(history))
    assert cli.main(["run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out} cannot be continued: round 2 of the saved training was trained without hospital-b (only hospital-a, "
        "hospital-c took part), and strategy.minSites is 3 (the default: every site): continuing would give a model that never "
        f"learnt from them; start again from round 1 with another --out (or remove {out}), or lower strategy.minSites"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "job.json"]  # nothing started, nothing written
    assert processes_mentioning(str(out)) == []


@pytest.mark.slow
def test_min_sites_to_start_lets_a_local_run_go_ahead_without_a_site_whose_data_fails(tmp_path):
    job_file, files = own_data_sites(tmp_path)
    job = kubeyaml.load_all(job_file.read_text())[0]
    job["spec"]["strategy"].update({"minSites": 2, "minSitesToStart": 2})
    job_file.write_text(kubeyaml.dump(job))
    set_cell(files["hospital-c"], 2, "mean_area", "")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "warning: site hospital-c: " in done.stdout
        and "the run goes ahead without this site (strategy.minSitesToStart is 2)" in done.stdout
    )
    history = json.loads((out / "history.json").read_text())
    assert [e["sites"] for e in history] == [["hospital-a", "hospital-b"]] * 2
    # The centralized baseline pools the sites that took part: a's and b's training rows only.
    rows = [len(files[site].read_text().splitlines()) - 1 for site in ("hospital-a", "hospital-b")]
    assert json.loads((out / "baseline.json").read_text())["trainingRows"] == sum(n - round(n * 0.2) for n in rows)
    assert processes_mentioning(str(out)) == []
