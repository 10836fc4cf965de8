"""Sites and server talk over TLS with the job's own CA: a site holding another CA, or
none, cannot join."""

from __future__ import annotations

import sqlite3
import time

import pytest

from bouquet import flower, tls
from support.processes import processes_mentioning

pytestmark = pytest.mark.slow


def registered_nodes(state_db) -> int:
    with sqlite3.connect(state_db) as db:
        return db.execute("select count(*) from node").fetchone()[0]


def test_only_a_site_with_the_jobs_ca_joins(tmp_path):
    job_certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "job-tls")
    other_certs = tls.issue("other", ["localhost", "127.0.0.1"]).write(tmp_path / "other-tls")
    job_tls = flower.Tls(job_certs["ca.crt"], job_certs["tls.crt"], job_certs["tls.key"])
    data = tmp_path / "unused.csv"
    data.write_text("a,y\n1,0\n")
    processes = flower.Processes(tmp_path / "logs")
    port = flower.free_port()
    state_db = tmp_path / "state.db"
    try:
        processes.start("server", flower.superlink_command(port, state_db, job_tls))
        flower.wait_healthy(port, job_tls, 60, processes)
        server = f"localhost:{port}"
        processes.start("other-ca", flower.supernode_command(server, "intruder", data, None, flower.free_port(), other_certs["ca.crt"]))
        processes.start("plain-text", flower.supernode_command(server, "plain", data, None, flower.free_port(), None))
        processes.start("job-ca", flower.supernode_command(server, "member", data, None, flower.free_port(), job_certs["ca.crt"]))

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "SuperNode ID" not in processes.tail("job-ca", 200):
            time.sleep(0.5)
        assert "SuperNode ID" in processes.tail("job-ca", 200)
        time.sleep(5)  # time enough for the others to have joined, had they been able to
        assert "SuperNode ID" not in processes.tail("other-ca", 200)
        assert "SuperNode ID" not in processes.tail("plain-text", 200)
        assert "CERTIFICATE_VERIFY_FAILED" in processes.tail("other-ca", 200)
        assert registered_nodes(state_db) == 1
    finally:
        processes.stop()
    assert processes_mentioning(str(tmp_path)) == []
