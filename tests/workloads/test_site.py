"""`bouquet site` (a site pod's entrypoint) keeps its site in the run when Flower's SuperNode
ends by itself before the run is over, and when the site's warm worker does; the worker ends
with its SuperNode."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from bouquet import tls
from bouquet_workloads import flower, site
from bouquet_workloads.server import Server
from support.kubelet import wait_for
from support.processes import processes_mentioning, site_args, start_bouquet

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "breast-cancer.yaml"


def running(module: str, below: int) -> list[int]:
    """The live processes of a Python module under a process."""
    found = []
    for pid in flower.descendants(below):
        try:
            if f"-m\0{module}\0" in Path(f"/proc/{pid}/cmdline").read_bytes().decode() and flower._alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def supernodes(below: int) -> list[int]:
    """The SuperNode processes under a `bouquet site` process."""
    return running("bouquet_workloads.supernode", below)


def workers(below: int) -> list[int]:
    """The site's warm workers under a process."""
    return running("bouquet_workloads.worker", below)


def _site(tmp_path: Path, port=None):
    """A server for the example job, and `bouquet site` for its hospital-a, started; it dials
    port(server's port), the server's own by default."""
    job = yaml.safe_load(EXAMPLE.read_text())
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    certs = tls.issue("job", ["localhost", "127.0.0.1"]).write(tmp_path / "tls")
    job_tls = flower.Tls(certs["ca.crt"], certs["tls.crt"], certs["tls.key"])
    data = tmp_path / "hospital-a.csv"
    data.write_text("a,y\n1,0\n")
    processes = flower.Processes(tmp_path / "logs")
    server = Server(job, tmp_path / "out", job_tls, processes)
    server.start()
    log = tmp_path / "site.log"
    dialled = port(server.port) if port else server.port
    return server, processes, start_bouquet(site_args(job_file, "hospital-a", dialled, data, certs["ca.crt"]), log), log


class BreaksOff:
    """A port that takes the first `breaks` connections and closes them without a byte of TLS
    in answer (as a server whose pod stops, or that is not serving yet, does mid-handshake),
    then passes connections on to `upstream`."""

    def __init__(self, breaks: int) -> None:
        self.breaks = breaks
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = 0

    def __call__(self, upstream: int) -> int:
        self.upstream = upstream
        threading.Thread(target=self._accept, daemon=True).start()
        return self.port

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.breaks > 0:
                self.breaks -= 1
                # The ClientHello read first: closed with it unread, the connection would be
                # reset (RST), an error Flower's SuperNode retries by itself.
                conn.recv(65536)
                conn.close()
                continue
            far = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((conn, far), (far, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _stop(tmp_path: Path, server, processes, bouquet_site) -> None:
    if bouquet_site is not None and bouquet_site.poll() is None:
        bouquet_site.send_signal(signal.SIGTERM)
        bouquet_site.wait(30)
    processes.stop()
    server.stop()
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_sites_worker_that_dies_is_replaced_and_a_worker_ends_with_its_supernode(tmp_path):
    server = processes = bouquet_site = None
    try:
        server, processes, bouquet_site, log = _site(tmp_path)
        wait_for(
            lambda: log.read_text().count("SuperNode ID") == 1 and len(workers(bouquet_site.pid)) == 1, timeout=60, what="the site to join"
        )
        [first] = workers(bouquet_site.pid)
        os.kill(first, signal.SIGKILL)  # a crash: the out-of-memory killer, a segfault in a library
        wait_for(lambda: workers(bouquet_site.pid) not in ([], [first]), timeout=30, what="another worker")
        assert "the site's worker ended (exit -9); starting another" in log.read_text()
        [second] = workers(bouquet_site.pid)
        [supernode] = supernodes(bouquet_site.pid)
        os.kill(supernode, signal.SIGKILL)  # nothing of the SuperNode is left to stop its worker
        wait_for(lambda: not flower._alive(second), timeout=10, what="the worker to end with its SuperNode")
        assert bouquet_site.poll() is None  # the site goes on: it starts its SuperNode (and a worker) again
        wait_for(lambda: len(workers(bouquet_site.pid)) == 1, timeout=60, what="the new SuperNode's worker")
        [third] = workers(bouquet_site.pid)
    finally:
        if server is not None:
            _stop(tmp_path, server, processes, bouquet_site)
    assert not flower._alive(third)  # and the last worker ended with the site


def test_a_supernode_that_ends_before_the_run_is_over_is_started_again(tmp_path):
    server = processes = bouquet_site = None
    try:
        server, processes, bouquet_site, log = _site(tmp_path)
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
        if server is not None:
            _stop(tmp_path, server, processes, bouquet_site)


def test_a_site_whose_tls_handshake_is_broken_off_tries_again(tmp_path):
    """Flower's SuperNode gives up at once on a connection error that mentions TLS. A server
    stopping, or not serving yet, in the middle of the handshake breaks it off so: the site
    says so and tries again, and joins once the server answers."""
    server = processes = bouquet_site = None
    breaks = BreaksOff(2)
    try:
        server, processes, bouquet_site, log = _site(tmp_path, breaks)
        wait_for(lambda: log.read_text().count("SuperNode ID") == 1, timeout=90, what="the site to join")
        said = log.read_text()
        assert "site hospital-a: site hospital-a could not connect to the server: [SSL: UNEXPECTED_EOF_WHILE_READING]" in said, said
        assert f"trying again (2 of {site.SUPERNODE_RESTARTS})" in said
        assert bouquet_site.poll() is None
    finally:
        breaks.listener.close()
        if server is not None:
            _stop(tmp_path, server, processes, bouquet_site)


def test_only_a_broken_off_connection_is_tried_again():
    eof = "Failed to initialize the connection to the SuperLink. [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol"
    assert site.broken_off(eof)
    assert site.broken_off("Failed to initialize the connection to the SuperLink. Server disconnected without sending a response.")
    for refused in (
        "Failed to initialize the connection to the SuperLink. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
        "unable to get local issuer certificate (_ssl.c:1006)",
        "[code: 2004] Attempted to register SuperNode with public key: b'...', exception: No SuperNode found. EOF occurred",
        "Client error '404 Not Found' for url 'https://localhost:9092/v1/fleet/activate-node'",
    ):
        assert not site.broken_off(refused), refused
