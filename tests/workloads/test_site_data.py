"""A site's bad data over real processes, as on Kubernetes: `bouquet server` and one `bouquet
site` per site (what the server and site pods run), over TLS. The sites check their data
before round 1; the server stops the run naming the site, the column and the row, and the
value itself is only in that site's own log."""

from __future__ import annotations

import json
import time

import pytest

from bouquet import jobfile, kubeyaml, tls
from bouquet_workloads.local import write_builtin_shares
from support.processes import processes_mentioning, site_args, start_bouquet
from support.prometheus import free_port

pytestmark = pytest.mark.slow

JOB = {
    "apiVersion": "bouquet.dev/v1alpha1",
    "kind": "FederatedJob",
    "metadata": {"name": "site-data"},
    "spec": {
        "rounds": 2,
        "strategy": {"name": "FedAvg", "fractionEvaluate": 0},
        "task": {"labelColumn": "diagnosis"},
        "dataset": {"name": "breast-cancer"},
        "sites": [{"name": "site-a"}, {"name": "site-b"}],
    },
}
SECRET_VALUE = "Jane Roe"


def test_a_sites_bad_value_stops_the_server_before_round_1_and_stays_at_the_site(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(kubeyaml.dump(JOB))
    data = write_builtin_shares(jobfile.load(job_file), tmp_path / "data")
    lines = data["site-b"].read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[4].split(",")
    cells[header.index('"mean_area"')] = SECRET_VALUE
    lines[4] = ",".join(cells)
    data["site-b"].write_text("\n".join(lines) + "\n")
    certs = tls.issue("site-data", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    port, out = free_port(), tmp_path / "out"

    server = start_bouquet(
        [
            "server",
            str(job_file),
            "--out",
            str(out),
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
            "--tls-dir",
            str(tmp_path / "tls"),
        ],
        tmp_path / "server.log",
    )
    sites = {
        name: start_bouquet(site_args(job_file, name, port, path, certs["ca.crt"]), tmp_path / f"{name}.log") for name, path in data.items()
    }
    try:
        assert server.wait(240) == 1, (tmp_path / "server.log").read_text()[-3000:]
        said = (tmp_path / "server.log").read_text()
        last = said.rstrip().splitlines()[-1]
        assert last.startswith("error: the run cannot start: site site-b: "), said[-3000:]
        assert f"{data['site-b']}: column 'mean_area', row 4: the value is not a number (the value is in the site's log)" in last
        assert "1 of 2 sites passed their data check and strategy.minSitesToStart is 2 (the default: every site)" in last
        assert SECRET_VALUE not in said, "a value of a site's data reached the server"
        deadline = time.monotonic() + 30
        while SECRET_VALUE not in (tmp_path / "site-b.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert f"column 'mean_area', row 4: '{SECRET_VALUE}' is not a number" in (tmp_path / "site-b.log").read_text()
        assert not (out / "model.json").exists() and not (out / "history.json").exists()
        progress = json.loads((out / "progress.json").read_text())
        assert progress["state"] == "Failed" and "site site-b" in progress["message"]  # what the job's status shows
    finally:
        for process in [server, *sites.values()]:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
    assert processes_mentioning(str(out)) == []
