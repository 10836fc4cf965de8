"""The site's warm worker runs Flower's ClientApp tasks the way flwr 1.41.0's `flwr-clientapp`
does, through the same internal calls; these tests hold those calls to what the worker assumes,
so that another flwr fails here, loudly, rather than in a run. The worker serving a real
SuperNode is tested in tests/workloads/test_site.py and tests/workloads/test_local_run.py."""

from __future__ import annotations

import inspect
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import flwr
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from bouquet_workloads import flower, worker


def test_flower_is_the_version_the_worker_is_written_against():
    assert flwr.__version__ == "1.41.0", f"the worker mirrors flwr 1.41.0's flwr-clientapp and SuperExec, not {flwr.__version__}'s"


def test_the_calls_the_worker_shares_with_flwr_clientapp_are_as_it_uses_them():
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == ["client", "context", "sub_status", "details"]
    source = inspect.getsource(run_clientapp.run_clientapp)
    # flwr-clientapp calls the app this way, and says an app's failure in this form (the server
    # reports sites' errors in it); the worker does the same.
    assert "client_app(message=message, context=context)" in source
    assert """reason = str(type(ex)) + ":<'" + str(ex) + "'>\"""" in source
    assert "HeartbeatSender(make_task_heartbeat_fn_http(client))" in source


def test_the_worker_claims_tasks_as_flowers_superexec_does():
    assert TaskType.CLIENT_APP == "flwr-clientapp"
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert "client.AcquireTask(" in inspect.getsource(run_superexec.run_superexec)


def test_a_supernode_in_process_isolation_starts_no_clientapp_process_of_its_own():
    source = inspect.getsource(start_client_internal.start_client_internal)
    launch = source.index("subprocess.Popen(command)")
    guard = source.rindex("if isolation == ISOLATION_MODE_SUBPROCESS:", 0, launch)
    assert re.fullmatch(
        r"(?s)if isolation == ISOLATION_MODE_SUBPROCESS:\n(\s{8,}.*\n)+\s+subprocess\.Popen\(command\)", source[guard : launch + 25]
    )


def test_an_idle_worker_backs_off_and_looks_again_soon_after_a_task(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(worker.time, "sleep", slept.append)

    class Claims:
        def __init__(self, tasks: list[bool]) -> None:
            self.tasks = iter(tasks)

        def run_next(self) -> bool:
            try:
                return next(self.tasks)
            except StopIteration:
                raise KeyboardInterrupt from None

    w = worker.Worker.__new__(worker.Worker)
    w.idle = worker.IDLE_FIRST
    w.address = "127.0.0.1:1"
    w.tasks_fd = None  # no SuperNode to say when a task is there: the worker looks on its own
    claims = Claims([False] * 60 + [True, False])

    def run_next() -> bool:
        ran = claims.run_next()
        if ran:
            w.idle = worker.IDLE_FIRST
        return ran

    w.run_next = run_next
    try:
        w.serve()
    except KeyboardInterrupt:
        pass
    idle, after = slept[:60], slept[60:]
    assert idle[0] == worker.IDLE_FIRST and idle == sorted(idle) and idle[-1] == worker.IDLE_LONGEST
    for i, wait in enumerate(idle):  # a task waits at most about as long as the worker was idle
        assert wait <= worker.IDLE_FIRST + sum(idle[:i]) + 1e-9
    assert after == [worker.IDLE_FIRST]


def test_a_told_worker_looks_on_its_own_seldom_after_a_task_and_soon_again_after_a_word(monkeypatch):
    """With its SuperNode's word (--tasks-fd) a worker's own looks are the fallback: after a
    task, TOLD_LONGEST apart. A word that finds no task yet (the task not made yet) starts the
    quick looks again."""
    from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611

    heard = iter([False, False, True, False, False])  # what each wait hears: the word comes in the third
    waited: list[float] = []

    def wait_readable(fd: int, seconds: float, read=None) -> bool:
        waited.append(seconds)
        try:
            return next(heard)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(worker.wakes, "wait_readable", wait_readable)
    tasks = iter([True] + [False] * 6)

    class Client:
        def AcquireTask(self, request):
            if next(tasks):
                claimed = AcquireTaskResponse(token="token")
                claimed.task.fab_hash = "0" * 64
                return claimed
            return AcquireTaskResponse()

    ran: list[str] = []
    w = worker.Worker.__new__(worker.Worker)
    w.client, w.tasks_fd, w.idle = Client(), 5, worker.IDLE_FIRST
    w.run_task = lambda token, fab_hash: ran.append(token)
    with pytest.raises(KeyboardInterrupt):
        w.serve()
    assert ran == ["token"]
    long_, first = worker.TOLD_LONGEST, worker.IDLE_FIRST
    assert waited == [long_, long_, long_, *(first * worker.IDLE_GROWTH**k for k in (1, 2, 3))]


def test_a_worker_told_of_a_task_looks_at_once_and_looks_on_its_own_once_its_supernode_is_gone():
    read, write = os.pipe()
    w = worker.Worker.__new__(worker.Worker)
    w.tasks_fd, w.idle = read, worker.IDLE_LONGEST
    os.write(write, b"xx")  # two messages stored before the worker looked
    began = time.monotonic()
    w.wait(60)
    assert time.monotonic() - began < 30, "the worker waited out its back-off though told of a task"
    assert w.idle == worker.IDLE_FIRST
    assert not select.select([read], [], [], 0)[0], "a wake-up was left to be seen twice"
    os.close(write)  # the SuperNode ended
    w.wait(60)
    assert w.tasks_fd is None
    os.close(read)


def test_the_worker_preloads_the_jobs_clientapp_module_and_leaves_a_failing_one_to_its_first_task(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    worker.preload("json.tool")
    assert "json.tool" in sys.modules
    worker.preload("bouquet_workloads.no_such_module")  # the task that loads it fails, and says why
    assert "could not import bouquet_workloads.no_such_module ahead of the first message" in caplog.text


def test_a_sites_supernode_is_told_which_module_its_worker_preloads():
    job = {"spec": {}}
    assert flower.client_module(job) == "bouquet_workloads.client_app"
    assert flower.client_module({"spec": {"app": {"clientApp": "my_task.client:app"}}}) == "my_task.client"
    command = flower.supernode_command("localhost:1", "a", Path("a.csv"), None, 9, None, flower.SiteIdentity("0" * 64), "my_task.client")
    assert command[command.index("--preload") + 1] == "my_task.client" and command.index("--preload") < command.index("--")


def test_a_worker_ends_with_its_supernode_whatever_it_is_doing_and_even_with_sigint_ignored():
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    # A worker busy in a call that never returns, in a process that inherited SIGINT ignored
    # (a background job's): Flower's own monitor, which raises SIGINT, could not end it.
    busy = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from bouquet_workloads import worker\n"
        f"worker.end_with({parent.pid})\n"
        "while True:\n    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        parent.wait(10)
        assert child.wait(5) == 0
    finally:
        for process in (parent, child):
            if process.poll() is None:
                process.kill()
