"""The server starts only its job's ServerApp: the server's SuperExec refuses a task of any
other app before launching anything (a real server refuses a foreign run in
tests/test_federation.py)."""

from __future__ import annotations

import inspect
import json
import subprocess

import pytest
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.types import LaunchResult, LaunchResultStatus

from bouquet_workloads import forks, superexec


@pytest.fixture
def launched(monkeypatch):
    """Flower's plugin, with its launch replaced by a record of what it was asked to launch."""
    calls = []
    monkeypatch.setattr(
        run_superexec.AutoExecPlugin, "launch_task", lambda self, token, task: calls.append(task.run_id) or LaunchResult.accepted()
    )
    monkeypatch.setattr(run_superexec, "AutoExecPlugin", run_superexec.AutoExecPlugin)  # restored after the test
    monkeypatch.setattr(run_superexec, "time", run_superexec.time)
    return calls


def test_only_tasks_of_the_jobs_app_are_launched_and_others_are_listed(launched, tmp_path):
    refusals = tmp_path / "server-refused.json"
    superexec.install("a" * 64, refusals)
    plugin = run_superexec.AutoExecPlugin.__new__(run_superexec.AutoExecPlugin)
    assert plugin.launch_task("token", Task(task_id=1, run_id=11, fab_hash="a" * 64)).status == LaunchResultStatus.ACCEPTED
    for run_id, fab_hash in ((12, "b" * 64), (13, "")):
        assert plugin.launch_task("token", Task(task_id=2, run_id=run_id, fab_hash=fab_hash)).status == LaunchResultStatus.FAILED
    assert launched == [11]
    assert [(e["run"], e["appSha256"]) for e in json.loads(refusals.read_text())] == [(12, "b" * 64), (13, "")]


def test_flowers_superexec_still_launches_tasks_through_the_plugin_the_pin_wraps():
    # A Flower upgrade that moves this breaks the pin: this test says so before anything runs.
    source = inspect.getsource(run_superexec.run_superexec)
    assert "AutoExecPlugin(" in source and "plugin.launch_task(" in source
    assert "fab_hash" in Task.DESCRIPTOR.fields_by_name


def test_once_it_launched_the_jobs_serverapp_the_superexec_asks_for_tasks_seldom(launched, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(superexec.time, "sleep", slept.append)
    superexec.install("a" * 64, None)
    assert "time.sleep(task_poll_interval)" in inspect.getsource(run_superexec.run_superexec)
    pace = run_superexec.time
    plugin = run_superexec.AutoExecPlugin.__new__(run_superexec.AutoExecPlugin)
    pace.sleep(0.1)
    plugin.launch_task("token", Task(task_id=2, run_id=12, fab_hash="b" * 64))  # refused: no launch
    pace.sleep(0.1)
    plugin.launch_task("token", Task(task_id=1, run_id=11, fab_hash="a" * 64))
    pace.sleep(0.1)
    assert slept == [0.1, 0.1, superexec.LAUNCHED_POLL_SECONDS]
    assert pace.monotonic() > 0  # the rest of `time`, as it is


def test_flowers_executor_starts_a_serverapp_the_way_the_fork_server_shim_takes_it():
    # A Flower upgrade that changes this leaves a local run's ServerApp to Flower's own start:
    # this test says so.
    source = inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in source
    assert (
        "subprocess.Popen(  # pylint: disable=consider-using-with\n                args,\n                stdout=subprocess.DEVNULL,\n                stderr=subprocess.DEVNULL,\n            )"
        in source
    )
    assert "subprocess.Popen(args)" in source
    assert subprocess_executor.TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP] == superexec.SERVERAPP_COMMAND


class _Forks:
    def __init__(self, error: str | None = None) -> None:
        self.asked: list[tuple[dict, int]] = []
        self.error = error

    def start(self, request, fds):
        if self.error:
            raise forks.ForkError(self.error)
        self.asked.append((request, len(fds)))
        return 4242


def test_a_serverapp_is_asked_of_the_fork_server_with_its_arguments_and_the_gates_port(monkeypatch):
    started = []
    monkeypatch.setattr(superexec.subprocess, "Popen", lambda *args, **options: started.append(args[0]))
    monkeypatch.setenv("BOUQUET_GATE_NOTICE_PORT", "5555")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/not-passed.so")
    fork_server = _Forks()
    launches = superexec._Launches(fork_server)
    args = ["flwr-serverapp", "--serverappio-api-address", "127.0.0.1:1", "--token", "t", "--insecure", "--parent-pid", "7"]
    assert launches.Popen(args, stdout=launches.DEVNULL, stderr=launches.DEVNULL) is None
    assert launches.Popen(args) is None
    expected = {"kind": "serverapp", "args": args[1:], "env": {"BOUQUET_GATE_NOTICE_PORT": "5555"}}
    assert fork_server.asked == [(expected, 2), (expected, 2)]
    launches.Popen(["flwr-clientapp", "--insecure"])  # anything else: started as Flower would
    launches.Popen(["flwr-serverapp", "--insecure"], cwd="/tmp")  # options the shim does not know
    assert started == [["flwr-clientapp", "--insecure"], ["flwr-serverapp", "--insecure"]]


def test_a_serverapp_the_fork_server_does_not_start_is_started_as_flower_would(monkeypatch):
    started = []
    monkeypatch.setattr(superexec.subprocess, "Popen", lambda *args, **options: started.append((args[0], options)))
    launches = superexec._Launches(_Forks(error="the fork server has ended"))
    launches.Popen(["flwr-serverapp", "--insecure"], stdout=launches.DEVNULL, stderr=launches.DEVNULL)
    launches.Popen(["flwr-serverapp", "--insecure"])
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    assert started == [(["flwr-serverapp", "--insecure"], quiet), (["flwr-serverapp", "--insecure"], {})]
