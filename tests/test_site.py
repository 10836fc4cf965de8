"""`bouquet site` (a site pod's entrypoint) keeps its site in the run when Flower's SuperNode
ends by itself before the run is over."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from bouquet import flower, site, tls
from bouquet.server import Server
from support.kubelet import wait_for
from support.processes import processes_mentioning, site_args, start_bouquet

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "breast-cancer.yaml"


def supernodes(below: int) -> list[int]:
    """The SuperNode processes under a `bouquet site` process."""
    found = []
    for pid in flower.descendants(below):
        try:
            if "bouquet_workloads.supernode" in Path(f"/proc/{pid}/cmdline").read_bytes().decode():
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_supernode_that_ends_before_the_run_is_over_is_started_again(tmp_path, monkeypatch):
    job = yaml.safe_load(EXAMPLE.read_text())
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    job_tls = flower.Tls(certs["ca.crt"], certs["tls.crt"], certs["tls.key"])
    data = tmp_path / "hospital-a.csv"
    data.write_text("a,y\n1,0\n")
    processes = flower.Processes(tmp_path / "logs")
    server = Server(job, tmp_path / "out", job_tls, processes)
    log = tmp_path / "site.log"
    bouquet_site = None
    try:
        server.start()
        bouquet_site = start_bouquet(site_args(job_file, "hospital-a", server.port, data, certs["ca.crt"]), log)
        wait_for(lambda: log.read_text().count("SuperNode ID") == 1, timeout=60, what="the site to join")
        [first] = supernodes(bouquet_site.pid)
        os.kill(first, signal.SIGKILL)  # as Flower's SuperNode ending by itself would, with no word
        wait_for(lambda: log.read_text().count("SuperNode ID") == 2, timeout=60, what="the site to join again")
        said = log.read_text()
        assert (
            f"site hospital-a: the SuperNode stopped (exit -9) before the run was over; starting it again (1 of {site.SUPERNODE_RESTARTS})"
            in said
        )
        assert bouquet_site.poll() is None and supernodes(bouquet_site.pid) not in ([], [first])
    finally:
        if bouquet_site is not None and bouquet_site.poll() is None:
            bouquet_site.send_signal(signal.SIGTERM)
            bouquet_site.wait(30)
        processes.stop()
        server.stop()
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []
