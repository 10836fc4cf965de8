"""A site's warm worker: one long-lived process that runs every message its SuperNode receives.

Flower's SuperNode hands each message it receives to its ClientApp through the SuperNode's
runtime API on loopback: a task with a token. Left to itself (`--isolation subprocess`) it
starts a SuperExec that launches a new `flwr-clientapp` process for every task, which imports
torch and reads the site's data again for each message: seconds per message on a small
machine, and torch's memory again in each. With `--isolation process` the SuperNode launches
nothing, and this worker serves the tasks instead, in one process for the whole run: it claims
each task with Flower's own AcquireTask call, pulls the message as `flwr-clientapp` does,
calls the job's ClientApp (installed and loaded once per app bundle, so its imports and the
site's data stay loaded), and pushes the reply and the task's final status. While it runs a
task it sends the task's heartbeats (Flower expires a silent task's token and replies with an
error in the app's place).

Only the job's app runs here: a task of another bundle (the SuperNode refuses those before
any task is made, bouquet_workloads.supernode; this is the second look) is answered with an
error, its bundle neither installed nor loaded, and listed in the refusals file.

It claims a task as soon as its SuperNode says it stored a message (a byte on the pipe
--tasks-fd, bouquet_workloads.wakes), and says when it handed back a reply (--replies-fd).
Without that word it looks a few milliseconds after the last task, then each look twice as
long after the one before, up to IDLE_LONGEST apart; with it, its own looks are the fallback,
TOLD_LONGEST apart. It ends with the SuperNode that started it
(--parent-pid), within PARENT_CHECK_SECONDS.

    python -m bouquet_workloads.worker --app-sha256 HEX --runtime-api-address HOST:PORT [--parent-pid PID] [--refusals FILE]
        [--preload MODULE] [--tasks-fd FD --replies-fd FD]

The calls into Flower's internals are pinned to flwr 1.41.0 (tests/workloads/test_worker.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from . import pulls, wakes
from .supernode import record_refusal

log = logging.getLogger("bouquet_workloads.site")

IDLE_FIRST, IDLE_LONGEST, IDLE_GROWTH = 0.005, 0.25, 2  # seconds between looks for a task: right after one, at most
# With the SuperNode's word (--tasks-fd) a look of its own is only the fallback: after a task,
# and at most, this long apart (each look is a request the SuperNode serves; three idle sites
# looking four times a second were a tenth of a small model's round here). After a word that
# found no task yet, the looks start again from IDLE_FIRST.
TOLD_LONGEST = 1.0


class Worker:
    """Claims the SuperNode's ClientApp tasks and runs them, one at a time, in this process."""

    def __init__(
        self,
        runtime_api_address: str,
        app_sha256: str,
        refusals: Path | None = None,
        tasks_fd: int | None = None,
        replies_fd: int | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.app_sha256 = app_sha256
        self.refusals = refusals
        self.tasks_fd = tasks_fd  # the SuperNode writes a byte here when it stored a message
        self.replies_fd = replies_fd  # this worker writes one here when it handed back a reply
        self.apps: dict[str, ClientApp] = {}  # app bundle sha256 -> its loaded ClientApp
        self.client = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        self.idle = IDLE_FIRST

    @property
    def longest(self) -> float:
        """The longest wait between looks of its own: short without the SuperNode's word."""
        return IDLE_LONGEST if self.tasks_fd is None else TOLD_LONGEST

    def _client(self, *interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # the SuperNode's runtime API, on loopback
            root_certificates=None,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self) -> None:
        """Runs tasks until the process is stopped."""
        while True:
            try:
                ran = self.run_next()
            except httpx.TransportError as error:  # the SuperNode's API is not up yet, or restarting
                log.warning("cannot reach the SuperNode's runtime API at %s (%s); trying again", self.address, error)
                ran = False
            if not ran:
                self.wait(self.idle)
                self.idle = min(self.idle * IDLE_GROWTH, self.longest)

    def wait(self, seconds: float) -> None:
        """Waits until the SuperNode says a message came, or seconds pass."""
        if self.tasks_fd is None:
            time.sleep(seconds)
            return
        try:
            if wakes.wait_readable(self.tasks_fd, seconds):
                self.idle = IDLE_FIRST
        except EOFError:  # the SuperNode ended (this process ends with it): look on its own
            self.tasks_fd = None

    def run_next(self) -> bool:
        """Claims and runs the oldest pending ClientApp task; False when there is none."""
        claimed = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (claimed.HasField("task") and claimed.token):
            return False
        self.run_task(claimed.token, claimed.task.fab_hash)
        # The next message comes with the SuperNode's word; without one, look again soon.
        self.idle = IDLE_FIRST if self.tasks_fd is None else self.longest
        return True

    def run_task(self, token: str, fab_hash: str) -> None:
        """What a `flwr-clientapp` process does with its one task (flwr's run_clientapp), with the
        ClientApp loaded once per bundle and no process exit at the end."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            if fab_hash != self.app_sha256 or fab.hash_str != self.app_sha256:
                self.refuse(run.run_id, fab.hash_str)
                details = f"run {run.run_id} is not this job's app"
                reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details), reply_to=message)
            else:
                reply = self.app(run, fab)(message=message, context=context)
                sub_status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # the app's failure is the site's reply, as in flwr-clientapp
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(error)}:<'{error}'>"
            if isinstance(error, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception", exc_info=error)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as error:
                log.error("could not hand the reply to the SuperNode", exc_info=error)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            wakes.poke(self.replies_fd)  # the SuperNode passes the reply on at once
            heartbeat.stop()
            client.close()

    def app(self, run, fab) -> ClientApp:
        """The bundle's ClientApp, installed and loaded the first time it is asked for."""
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def refuse(self, run_id: int, app_sha256: str) -> None:
        log.error(
            "refused run %s: its app (sha256 %s) is not this job's app (sha256 %s); nothing of it runs here",
            run_id,
            app_sha256 or "none",
            self.app_sha256,
        )
        if self.refusals is not None:
            record_refusal(self.refusals, run_id, app_sha256)

    def close(self) -> None:
        self.client.close()


PARENT_CHECK_SECONDS = 0.2


def end_with(parent_pid: int) -> threading.Thread:
    """Ends this process as soon as parent_pid (its SuperNode) has ended, or the process that
    started it (the SuperNode, or a local run's fork server, bouquet_workloads.forks), whatever
    this process is doing: a worker whose SuperNode is gone has nobody to answer and nothing to
    keep. (Flower's own monitor raises SIGINT once, which a call in progress can swallow, and
    which does nothing in a process that inherited SIGINT ignored.)"""
    starter = os.getppid()

    def watch() -> None:
        while _alive(parent_pid) and os.getppid() == starter:
            time.sleep(PARENT_CHECK_SECONDS)
        log.info("the SuperNode (pid %d) or the process that started this worker has ended; so does the worker", parent_pid)
        os._exit(0)

    thread = threading.Thread(target=watch, name="bouquet-parent-watch", daemon=True)
    thread.start()
    return thread


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie has ended, whether or not its parent has reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def preload(module: str) -> None:
    """Imports the module of the job's ClientApp (its torch, its task) before the first task
    asks for it: the import overlaps the server's start instead of delaying the first round.
    A module that fails to import is left to fail in the task, where the server hears why."""
    try:
        importlib.import_module(module)
    except Exception as error:
        log.warning("could not import %s ahead of the first message: %s", module, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bouquet_workloads.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--app-sha256", required=True, help="sha256 of the job's app bundle: the only app this worker runs")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API, HOST:PORT on loopback")
    parser.add_argument("--parent-pid", type=int, help="end when this process (the SuperNode) ends")
    parser.add_argument("--refusals", type=Path, help="file that lists the runs this site refused")
    parser.add_argument("--preload", metavar="MODULE", help="imported at once, while the site waits for its first message")
    parser.add_argument("--tasks-fd", type=int, help="pipe the SuperNode writes to when it stored a message")
    parser.add_argument("--replies-fd", type=int, help="pipe to write to when a reply was handed back")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pulls.quicken()  # a message's objects are pulled as soon as the SuperNode has them
    if args.parent_pid is not None:
        end_with(args.parent_pid)
    if args.preload:
        preload(args.preload)
    if args.replies_fd is not None:
        os.set_blocking(args.replies_fd, False)
    worker = Worker(args.runtime_api_address, args.app_sha256, args.refusals, args.tasks_fd, args.replies_fd)
    try:
        worker.serve()
    except KeyboardInterrupt:
        return 0
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
