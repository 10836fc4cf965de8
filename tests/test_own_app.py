"""A job's own Flower app (spec.app) runs the way the built-in task does: Bouquet starts the
server and the sites, hands each site its data file and the app its config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bouquet import kubeyaml
from support.processes import processes_mentioning
from support.prometheus import free_port

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parent / "support" / "own_app" / "mean_app.py"


def test_own_app_runs_with_its_config_and_each_sites_data(tmp_path):
    shutil.copy(APP, tmp_path / "mean_app.py")
    (tmp_path / "a.csv").write_text("x\n1\n2\n3\n")
    (tmp_path / "b.csv").write_text("x\n10\n")
    job = {
        "apiVersion": "bouquet.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "own-app"},
        "spec": {
            "rounds": 1,
            "app": {"serverApp": "mean_app:server", "clientApp": "mean_app:client", "config": {"scale": "2"}},
            "sites": [{"name": "a", "data": {"path": "a.csv"}}, {"name": "b", "data": {"path": "b.csv"}}],
        },
    }
    (tmp_path / "job.yaml").write_text(kubeyaml.dump(job))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bouquet", "run", str(tmp_path / "job.yaml"), "--out", str(out), "--metrics-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path.parent,  # the app is found beside the job file, not in the working directory
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "result.json").read_text()) == {"mean": 2 * (1 + 2 + 3 + 10) / 4, "sites": 2}
    assert processes_mentioning(str(out)) == []
