"""The README as a new user meets it: each command block run exactly as written, from the
root of a fresh copy of the checkout, with only what the README tells the user to set up.
(The Kubernetes blocks run in tests/e2e, on the host's own cluster.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import readme
from support.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
# How a test says which block it runs: the helpers of support.readme that take a block's id.
_RUNS_A_BLOCK = r"(?:commands|transcript|run_block|block|output|python)\(\s*\"{}\""


def test_every_command_block_is_run_by_a_test_or_says_why_not():
    blocks = readme.blocks()
    assert [b.line for b in blocks if b.id is None and b.why_not is None] == [], "blocks of README.md without a marker"
    ids = [b.id for b in blocks if b.id]
    assert len(ids) == len(set(ids)), "two README blocks share an id"
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "readme.py")
    unrun = [i for i in ids if not re.search(_RUNS_A_BLOCK.format(re.escape(i)), sources)]
    assert unrun == [], f"README blocks marked as run by the tests that no test runs: {unrun}"


def test_ci_runs_the_readmes_test_command_from_a_fresh_clone():
    """The quick start's second line is `make test`: CI runs exactly it (.ci/run), in a fresh
    clone, which is the one place it can run (it runs this test)."""
    assert readme.commands("quick-start")[1].split("#")[0].strip() == "make test"
    assert readme.commands("tests")[0].split("#")[0].strip() == "make test"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test" and 'cd "$(dirname "$0")/.."' in ci


@pytest.fixture(scope="module")
def session(quick_start) -> readme.Session:
    """A user's shell at the root of a fresh copy of the checkout, after the quick start's
    `make run` (tests/conftest.py)."""
    return quick_start


def metrics_part(line: str) -> str:
    """A progress line without its clock: elapsed and remaining time differ run to run."""
    return line.split("  elapsed")[0]


@pytest.mark.slow
def test_the_quick_start_trains_to_the_readmes_figures(session):
    printed = session.quick_start.stdout.splitlines()
    shown = readme.output("quick-start").splitlines()
    assert printed[0] == shown[0]
    assert re.sub(r"localhost:\d+", "localhost:PORT", printed[1]) == re.sub(r"localhost:\d+", "localhost:PORT", shown[1])
    rounds = {line.split()[1]: metrics_part(line) for line in printed if line.startswith("round ")}
    for line in shown:
        if line.startswith("round "):
            assert rounds.get(line.split()[1]) == metrics_part(line), f"README: {line}\nprinted:\n" + "\n".join(printed)
    evaluated = shown.index("evaluated on the held-out test set:")
    assert printed[-5:-1] == shown[evaluated : evaluated + 4], "\n".join(printed)
    # The weights' sha256 is the README machine's: a processor that adds in another order
    # (wider vector units, another BLAS kernel) changes the last bits, not the figures above.
    sha256 = r"\(sha256 ([0-9a-f]{16})\.\.\.\)"
    assert re.sub(sha256, "", printed[-1].split(": ", 1)[1]) == re.sub(sha256, "", shown[-1].split(": ", 1)[1]), "the model's path"
    weights = (session.cwd / "runs" / "breast-cancer" / "model.safetensors").read_bytes()
    assert re.search(sha256, printed[-1]).group(1) == hashlib.sha256(weights).hexdigest()[:16], printed[-1]
    assert (session.cwd / "runs" / "breast-cancer" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert processes_mentioning(str(session.cwd / "runs")) == []


@pytest.mark.slow
def test_the_bouquet_command_comes_with_the_set_up(session):
    results = session.run_block("bouquet-command")
    assert results[-1].stdout == "examples/breast-cancer.yaml: valid\n"
    assert session.run("command -v bouquet").stdout.strip() == str(session.cwd / "bin" / "bouquet")


@pytest.mark.slow
def test_validate_prints_what_the_readme_shows(session):
    for command, shown in readme.transcript("validate"):
        result = session.run(command, check=False)
        assert result.returncode == 1
        assert (result.stdout + result.stderr).rstrip("\n") == shown


@pytest.mark.slow
def test_predict_reproduces_the_held_out_accuracy(session):
    [result] = session.run_block("predict")
    info = json.loads((session.cwd / "runs" / "breast-cancer" / "model.json").read_text())
    accuracy = info["metrics"]["accuracy"]
    assert result.stderr.strip() == f"accuracy {accuracy:.4f} on 114 rows (model.json: {accuracy:.4f} on the held-out test set)"
    lines = (session.cwd / "predictions.csv").read_text().splitlines()
    assert lines[0] == "row,prediction,p_malignant,p_benign" and len(lines) == 115
    assert info["classes"] == ["malignant", "benign"] and info["labelValues"] == ["0", "1"]


@pytest.mark.slow
def test_own_data_trains_from_the_files_the_readme_writes(session):
    results = session.run_block("own-data-local", timeout=900)
    assert (session.cwd / "examples" / "own-data" / "hospital-a.csv").exists()
    history = json.loads((session.cwd / "runs" / "own-data" / "history.json").read_text())
    assert [e["sites"] for e in history] == [["hospital-a", "hospital-b"]] * 3
    # No test set at the server: the sites' evaluation scores each round. It rides on the next
    # round's training messages, and the final model's comes in one exchange of its own; each
    # round is shown once, in order, once its evaluation is in.
    assert all(e["evaluatedOn"] == "sites' validation data" and 0 < e["accuracy"] <= 1 for e in history)
    shown = [line.split() for line in results[-1].stdout.splitlines() if line.startswith("round ")]
    assert [(words[1], "accuracy" in words) for words in shown] == [("1/3", True), ("2/3", True), ("3/3", True)]
    audit = [json.loads(line) for line in (session.cwd / "runs" / "own-data" / "audit.jsonl").read_text().splitlines()]
    assert [(e["round"], e["phase"]) for e in audit if e["phase"] in ("train", "evaluate")] == [
        (round_, phase) for round_, phase in [(1, "train"), (2, "train"), (3, "train"), (3, "evaluate")] for _ in range(2)
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, session) -> Path:
    """A fresh environment with `pip install .` of the checkout in it. Its dependencies are
    the lock's, already in Bouquet's environment: the fresh one sees them through a .pth
    file rather than download torch again, so what this checks is Bouquet's own packaging
    (the command, both packages, the CRD inside)."""
    fresh = tmp_path_factory.mktemp("pip") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    site = next((fresh / "lib").glob("python3.*/site-packages"))
    shared = next(Path(sys.executable).parent.parent.glob("lib/python3.*/site-packages"))
    (site / "bouquet-dependencies.pth").write_text(f"{shared}\n")
    done = subprocess.run(
        [str(fresh / "bin" / "pip"), "install", "--no-deps", "--quiet", str(session.cwd)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return fresh


@pytest.mark.slow
def test_pip_install_gives_a_bouquet_command(installed, session):
    validated = subprocess.run(
        [str(installed / "bin" / "bouquet"), "validate", "examples/breast-cancer.yaml", "tests/invalid/fedprox-without-mu.yaml"],
        capture_output=True,
        text=True,
        env=readme.user_environment(),
        cwd=session.cwd,
    )
    assert validated.returncode == 1
    assert validated.stdout == "examples/breast-cancer.yaml: valid\n"
    assert "spec.strategy.proximalMu: Invalid value" in validated.stderr
    probe = "import bouquet, bouquet_workloads; print(bouquet.__file__)"
    where = subprocess.run([str(installed / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=readme.user_environment())
    assert where.stdout.startswith(str(installed)), "the installed package, not the checkout's"


@pytest.mark.slow
def test_the_python_example_predicts_with_the_installed_package(installed, session):
    code = readme.block("predict-python").text
    ran = subprocess.run(
        [str(installed / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env=readme.user_environment(),
        cwd=session.cwd,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    info = json.loads((session.cwd / "runs" / "breast-cancer" / "model.json").read_text())
    predictions, accuracy = ran.stdout.rsplit("] ", 1)
    assert float(accuracy) == pytest.approx(info["metrics"]["accuracy"])
    assert set(re.findall(r"'(\w+)'", predictions)) <= {"malignant", "benign"} and predictions.count("'") == 10


@pytest.mark.slow
def test_the_benchmarks_print_their_figures(session):
    # The three blocks run side by side, each in a shell of its own at the checkout's root:
    # minutes each, much of it waiting (stock Flower's fixed sleeps, a control plane's
    # round trips). Their figures are only printed here, not held to anything.
    blocks = [
        lambda shell: shell.run_block("bench-local", timeout=1200),
        lambda shell: shell.run_block("bench-operator", timeout=1200),
        lambda shell: shell.run_block("bench", timeout=1800),
    ]
    with ThreadPoolExecutor(len(blocks)) as pool:
        running = [pool.submit(block, dataclasses.replace(session, history=[])) for block in blocks]
        [local], [operator], [compared] = (r.result() for r in running)
    assert "wall time" in local.stdout and "peak memory, all procs" in local.stdout and "final accuracy          0.9737" in local.stdout
    assert "median" in operator.stdout and "operator memory (RSS)" in operator.stdout
    for figure in ("round time, median", "round overhead, median", "peak RSS, server side", "peak PSS, all processes"):
        assert re.search(rf"{figure} +-?[\d.,]+ \w+ +-?[\d.,]+ \w+", compared.stdout), f"no {figure} of both in:\n{compared.stdout}"
    assert "stock Flower's median round is" in compared.stdout
