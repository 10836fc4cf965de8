"""A local run's fork server (bouquet_workloads.forks): a real fork server process, asked through
its sockets the way the run's SuperNodes, SuperExec and `bouquet run` ask it, and misused. The
forked processes serving a real run are tested in tests/workloads/test_local_run.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bouquet_workloads import forks
from bouquet_workloads.flower import descendants
from support.processes import processes_mentioning, stop_bouquet
from support.prometheus import free_port

ROOT = Path(__file__).resolve().parents[2]
PIN = "c" * 64


@dataclass
class ForkServer:
    process: subprocess.Popen
    askers: dict[str, socket.socket]  # kind -> the asker's end
    log: Path

    def children(self) -> set[int]:
        return descendants(self.process.pid)


def start_fork_server(tmp_path: Path, parent_pid: int | None = None, extra: list[str] = (), command: list[str] | None = None) -> ForkServer:
    ends = {kind: forks.pair() for kind in forks.KINDS}
    command = [
        *(command or [sys.executable, "-m", "bouquet_workloads.forks"]),
        "--app-sha256",
        PIN,
        "--parent-pid",
        str(parent_pid or os.getpid()),
    ]
    for kind, (theirs, _) in ends.items():
        command += ["--asker", f"{kind}:{theirs.fileno()}"]
    log = tmp_path / "fork-server.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [*command, *extra],
            stdout=sink,
            stderr=subprocess.STDOUT,
            pass_fds=[t.fileno() for t, _ in ends.values()],
            start_new_session=True,
        )
    for theirs, _ in ends.values():
        theirs.close()
    return ForkServer(process, {kind: ours for kind, (_, ours) in ends.items()}, log)


@pytest.fixture
def server(tmp_path) -> Iterator[ForkServer]:
    found = start_fork_server(tmp_path)
    yield found
    for pid in found.children():
        _kill(pid)
    found.process.kill()
    found.process.wait()
    for asker in found.askers.values():
        asker.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sinks(count: int) -> list[int]:
    return [os.open(os.devnull, os.O_WRONLY) for _ in range(count)]


def ask(asker: socket.socket, data: bytes, fd_count: int) -> dict:
    fds = _sinks(fd_count)
    try:
        socket.send_fds(asker, [data], fds)
    finally:
        for fd in fds:
            os.close(fd)
    asker.settimeout(30)
    return json.loads(asker.recv(65536))


def _named(pid: int, name: str) -> bool:
    """Whether pid names itself name within a few seconds (it does once forked)."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text().strip() != name:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


WORKER = {"kind": "worker", "runtimeApiAddress": "127.0.0.1:9", "refusals": None}
SERVERAPP = {"kind": "serverapp", "args": ["--help"], "env": {}}
BASELINE = {"kind": "baseline", "result": "/tmp/result.json"}


@pytest.mark.parametrize(
    "kind, data, fd_count, reason",
    [
        ("worker", b"not json", 4, "a request is a JSON object"),
        ("worker", b"[1, 2]", 4, "a request is a JSON object"),
        ("worker", json.dumps(SERVERAPP).encode(), 2, "this asker may ask for 'worker' only"),
        ("serverapp", json.dumps(WORKER).encode(), 4, "this asker may ask for 'serverapp' only"),
        ("serverapp", json.dumps(BASELINE).encode(), 2, "this asker may ask for 'serverapp' only"),
        ("worker", json.dumps(WORKER).encode(), 2, "takes 4 file descriptors, not 2"),
        ("worker", json.dumps(WORKER).encode(), 0, "takes 4 file descriptors, not 0"),
        ("worker", json.dumps({**WORKER, "appSha256": "d" * 64}).encode(), 4, "takes the fields"),
        ("worker", json.dumps({**WORKER, "preload": "os"}).encode(), 4, "takes the fields"),
        ("worker", json.dumps({"kind": "worker", "refusals": None}).encode(), 4, "takes the fields"),
        ("worker", json.dumps({**WORKER, "runtimeApiAddress": "10.0.0.7:9092"}).encode(), 4, "must be 127.0.0.1:PORT"),
        ("worker", json.dumps({**WORKER, "runtimeApiAddress": "127.0.0.1:0"}).encode(), 4, "must be 127.0.0.1:PORT"),
        ("worker", json.dumps({**WORKER, "runtimeApiAddress": "127.0.0.1:99999"}).encode(), 4, "must be 127.0.0.1:PORT"),
        ("worker", json.dumps({**WORKER, "runtimeApiAddress": 9092}).encode(), 4, "must be 127.0.0.1:PORT"),
        ("worker", json.dumps({**WORKER, "refusals": "relative.json"}).encode(), 4, "refusals must be null or an absolute path"),
        ("serverapp", json.dumps({**SERVERAPP, "args": "--insecure"}).encode(), 2, "args must be a list"),
        ("serverapp", json.dumps({**SERVERAPP, "args": ["--x"] * 33}).encode(), 2, "args must be a list"),
        ("serverapp", json.dumps({**SERVERAPP, "env": {"LD_PRELOAD": "/tmp/evil.so"}}).encode(), 2, "env may set only"),
        ("serverapp", json.dumps({**SERVERAPP, "env": {"PYTHONPATH": "/tmp"}}).encode(), 2, "env may set only"),
        ("serverapp", json.dumps({**SERVERAPP, "env": {"BOUQUET_GATE_NOTICE_PORT": 1}}).encode(), 2, "env may set only"),
        ("baseline", json.dumps({**BASELINE, "result": "out.json"}).encode(), 2, "result must be an absolute path"),
        ("baseline", json.dumps({**BASELINE, "job": "/tmp/other-job.json"}).encode(), 2, "takes the fields"),
        ("baseline", b"x" * 70000, 2, "one datagram of at most"),
    ],
)
def test_a_request_that_is_not_exactly_one_forks_nothing_and_is_answered_why(server, kind, data, fd_count, reason):
    answer = ask(server.askers[kind], data, fd_count)
    assert reason in answer.get("error", ""), answer
    assert server.children() == set()
    # The fork server goes on serving: the same asker's proper request is carried out.
    assert "pid" in ask(server.askers["serverapp"], json.dumps(SERVERAPP).encode(), 2)


def test_more_than_eight_descriptors_are_refused_and_none_is_kept(server):
    ask(server.askers["worker"], b"{}", 4)  # answered: it is up, its own descriptors open
    own = len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))
    answer = ask(server.askers["worker"], json.dumps(WORKER).encode(), 12)
    assert "at most 8 file descriptors" in answer["error"]
    assert server.children() == set()
    # What it received is closed again: it holds its own descriptors only.
    assert len(list(Path(f"/proc/{server.process.pid}/fd").iterdir())) == own


def test_a_fork_that_fails_is_answered_as_an_error_and_the_fork_server_goes_on(tmp_path):
    """The machine has no process to give (fork fails with EAGAIN, as at a pids limit): the
    asker hears why, and the fork server answers the next request."""
    failing = (
        "import errno, os, sys\n"
        "from bouquet_workloads import forks\n"
        "def fork():\n"
        "    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))\n"
        "os.fork = fork\n"
        "sys.exit(forks.main())\n"
    )
    found = start_fork_server(tmp_path, command=[sys.executable, "-c", failing])
    try:
        answer = ask(found.askers["worker"], json.dumps(WORKER).encode(), 4)
        assert answer == {"error": "could not fork: [Errno 11] Resource temporarily unavailable"}
        assert ask(found.askers["serverapp"], json.dumps(SERVERAPP).encode(), 2) == answer
        assert found.process.poll() is None and found.children() == set()
        assert "could not fork" in found.log.read_text()
    finally:
        found.process.kill()
        found.process.wait()
        for asker in found.askers.values():
            asker.close()


def test_an_asker_may_have_one_process_at_a_time_and_hears_its_exit(server):
    asker = forks.Asker(os.dup(server.askers["worker"].fileno()))
    sinks = _sinks(4)
    try:
        pid = asker.start(WORKER, sinks)  # no SuperNode answers there: the worker waits for one
        with pytest.raises(forks.ForkError, match="still runs: one at a time"):
            asker.start(WORKER, sinks)
        assert server.children() == {pid}
        assert _named(pid, "bouquet-worker")
        os.kill(pid, signal.SIGTERM)
        assert asker.wait() == -signal.SIGTERM
        assert asker.start(WORKER, sinks) != pid  # the next one, now that it ended
    finally:
        for fd in sinks:
            os.close(fd)
        asker.close()


def test_a_forked_serverapp_runs_flowers_own_command_with_its_arguments(server, tmp_path):
    asker = forks.Asker(os.dup(server.askers["serverapp"].fileno()))
    output = (tmp_path / "serverapp.log").open("wb")
    try:
        asker.start({"kind": "serverapp", "args": ["--no-such-option"], "env": {}}, [output.fileno(), output.fileno()])
        assert asker.wait() == 2  # argparse's exit for an unknown option: flwr-serverapp's own parser ran
    finally:
        output.close()
        asker.close()
    assert "flwr-serverapp" in (tmp_path / "serverapp.log").read_text()


def test_a_worker_belongs_to_the_process_that_asked_and_ends_with_it(server, tmp_path):
    # The asker's pid comes from the kernel (SO_PASSCRED), not from the request.
    asker_script = textwrap.dedent(
        f"""
        import sys, time
        from bouquet_workloads import forks
        asker = forks.Asker({server.askers["worker"].fileno()})
        log = open({str(tmp_path / "worker.log")!r}, "wb")
        print(asker.start({WORKER!r}, [log.fileno(), log.fileno(), log.fileno(), log.fileno()]), flush=True)
        time.sleep(120)
        """
    )
    asker = subprocess.Popen([sys.executable, "-c", asker_script], stdout=subprocess.PIPE, pass_fds=[server.askers["worker"].fileno()])
    try:
        worker = int(asker.stdout.readline())
        assert worker in server.children()
        time.sleep(1)  # the worker is up and watching its SuperNode
        asker.kill()
        assert _gone_within(worker, 5), "the worker outlived the SuperNode that asked for it"
    finally:
        asker.kill()
        asker.wait()


def test_the_fork_server_and_what_it_forked_end_with_its_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    found = start_fork_server(tmp_path, parent_pid=parent.pid)
    try:
        pid = forks.Asker(os.dup(found.askers["worker"].fileno())).start(WORKER, _sinks(4))
        parent.kill()
        parent.wait()
        found.process.wait(10)
        assert _gone_within(pid, 5), "a process of the fork server outlived it"
    finally:
        parent.kill()
        found.process.kill()


def test_an_asker_whose_fork_server_is_gone_hears_so(server):
    server.process.kill()
    server.process.wait()
    asker = forks.Asker(os.dup(server.askers["worker"].fileno()))
    with pytest.raises(forks.ForkError, match="fork server"):
        asker.start(WORKER, _sinks(4))


def test_a_supernode_whose_fork_server_is_gone_starts_its_worker_itself(tmp_path):
    theirs, ours = forks.pair()
    theirs.close()  # the fork server has ended
    script = textwrap.dedent(
        f"""
        import logging, sys, time
        from bouquet_workloads import forks, supernode
        logging.basicConfig(level=logging.INFO)
        command = [sys.executable, "-c", "print('the worker runs', flush=True); import time; time.sleep(30)"]
        request = supernode.worker_request(9, None)
        supernode.keep_worker(command, supernode.Pace(), (forks.Asker({ours.fileno()}), request))
        time.sleep(4)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, pass_fds=[ours.fileno()])
    assert "the fork server did not start the worker" in done.stderr, done.stderr
    assert "the worker runs" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_a_local_run_whose_fork_server_is_killed_fails_naming_it_and_leaves_nothing(tmp_path):
    job = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    job["metadata"]["name"] = "fork-server-killed"
    job["spec"]["rounds"] = 50
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    with (tmp_path / "run.log").open("w") as sink:
        run = subprocess.Popen(
            [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not (out / "history.json").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "history.json").exists(), (tmp_path / "run.log").read_text()
        # Its forks have its command line; it alone has its name.
        [fork_server] = [
            int(line.split(":")[0])
            for line in processes_mentioning(str(out))
            if Path(f"/proc/{line.split(':')[0]}/comm").read_text().strip() == "bouquet-forks"
        ]
        os.kill(fork_server, signal.SIGKILL)
        assert run.wait(120) != 0
    finally:
        stop_bouquet(run)
    said = (tmp_path / "run.log").read_text()
    assert "fork-server exited with code -9" in said, said
    assert processes_mentioning(str(out)) == []
    assert len(json.loads((out / "history.json").read_text())) < 50
