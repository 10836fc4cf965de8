"""Sites and server talk over TLS with the job's own CA, and the server admits a site only by
its own registered key: a site holding another CA, none, no key or a key of its own making
cannot join."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bouquet import identity, tls
from bouquet_workloads import flower
from bouquet_workloads.server import Server
from support.processes import processes_mentioning

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "breast-cancer.yaml"
APP = "0" * 64  # no run is submitted here: the pin is never consulted


def joined(processes: flower.Processes, name: str) -> bool:
    return "SuperNode ID" in processes.tail(name, 200)


def test_only_a_site_with_the_jobs_ca_and_its_own_registered_key_joins(tmp_path):
    job_certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "job-tls")
    other_certs = tls.issue("other", ["localhost", "127.0.0.1"]).write(tmp_path / "other-tls")
    job_tls = flower.Tls(job_certs["ca.crt"], job_certs["tls.crt"], job_certs["tls.key"])
    member_key, member_pub = identity.make().write(tmp_path / "keys" / "member")
    own_key, _ = identity.make().write(tmp_path / "keys" / "intruder")
    data = tmp_path / "unused.csv"
    data.write_text("a,y\n1,0\n")
    processes = flower.Processes(tmp_path / "logs")
    server = Server({"metadata": {"name": "job"}, "spec": {}}, tmp_path / "out", job_tls, processes, public_keys={"member": member_pub})

    def site(name: str, ca, key) -> None:
        command = flower.supernode_command(server.address, name, data, None, flower.free_port(), ca, flower.SiteIdentity(APP, key))
        processes.start(name, command)

    try:
        server.start()
        site("other-ca", other_certs["ca.crt"], member_key)
        site("plain-text", None, member_key)
        site("no-key", job_certs["ca.crt"], None)
        site("own-key", job_certs["ca.crt"], own_key)
        site("member", job_certs["ca.crt"], member_key)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not joined(processes, "member"):
            time.sleep(0.5)
        assert joined(processes, "member")
        time.sleep(5)  # time enough for the others to have joined, had they been able to
        for name in ("other-ca", "plain-text", "no-key", "own-key"):
            assert not joined(processes, name), processes.tail(name, 200)
        assert "CERTIFICATE_VERIFY_FAILED" in processes.tail("other-ca", 200)
        assert "SuperNode authentication is enabled. All SuperNodes must be registered" in processes.tail("no-key", 200)
        assert "Failed to activate SuperNode" in processes.tail("own-key", 200)
    finally:
        processes.stop()
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []


def test_a_site_whose_key_the_server_does_not_hold_says_so_and_stops(tmp_path):
    """`bouquet site` (a site pod's entrypoint) with a key the server never registered, and
    with none: it stops, and its last line says why (on Kubernetes, the job's status shows it)."""
    job_certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "job-tls")
    job_tls = flower.Tls(job_certs["ca.crt"], job_certs["tls.crt"], job_certs["tls.key"])
    _, registered = identity.make().write(tmp_path / "keys" / "registered")
    wrong = identity.make()
    wrong_key, _ = wrong.write(tmp_path / "keys" / "wrong")
    data = tmp_path / "unused.csv"
    data.write_text("a,y\n1,0\n")
    processes = flower.Processes(tmp_path / "logs")
    server = Server({"metadata": {"name": "job"}, "spec": {}}, tmp_path / "out", job_tls, processes, public_keys={"hospital-a": registered})
    site = [
        sys.executable,
        "-m",
        "bouquet",
        "site",
        str(EXAMPLE),
        "--site",
        "hospital-a",
        "--data",
        str(data),
        "--ca",
        str(job_certs["ca.crt"]),
    ]
    try:
        server.start()
        site += ["--server", server.address, "--runtime-port"]
        for extra, why in [
            (
                ["--key", str(wrong_key)],
                f"the server does not admit site hospital-a's key (public key sha256 {identity.fingerprint(wrong.public)[:16]}...)",
            ),
            ([], "site hospital-a has no key, and the server admits only the job's registered site keys"),
        ]:
            result = subprocess.run(
                [*site, str(flower.free_port()), *extra], capture_output=True, text=True, timeout=120, env=flower.process_env()
            )
            assert result.returncode != 0
            assert result.stderr.strip().splitlines()[-1].startswith(f"error: {why}"), result.stderr[-3000:]
    finally:
        processes.stop()
        server.stop()
    assert processes_mentioning(str(tmp_path)) == []


def test_a_site_whose_node_the_server_still_counts_online_tries_again_rather_than_stopping():
    """Flower says code 2004 both for a key it does not hold and for a registered key whose
    node is still online (an earlier SuperNode of the site, not yet timed out): only the
    second is waited out."""
    from bouquet_workloads import site

    still = (
        "Failed to initialize the connection to the SuperLink. [code: 2004] Attempted to register SuperNode with public key: "
        "b'...', exception: SuperNode with node ID 4735682362065246607 could not be activated."
    )
    unknown = (
        "[code: 2004] Attempted to register SuperNode with public key: b'...', exception: No SuperNode found with the given public key."
    )
    assert site.still_online(still) and not site.still_online(unknown)
    assert not site.still_online("[code: 2001] ... could not be activated")
    assert "counted another connection of site hospital-a online" in site.not_admitted("hospital-a", None, still)
