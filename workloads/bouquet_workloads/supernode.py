"""A site's SuperNode that runs only the job's app.

Flower's SuperNode runs whatever run its SuperLink hands it: it fetches the run's app bundle
(FAB) and starts the bundle's ClientApp on the site's data. Flower can check a bundle's
signature (`--trusted-entities`), but only for bundles from Flower's app hub. So a site pins
its job's app by content instead: the sha256 of the bundle, which the site works out from its
own copy of the job (the bundle is built from the job and nothing else, see
bouquet_workloads.flower.app_sha256). Before the SuperNode takes on a run it has not seen, it compares
the run's bundle hash with the pin; a run of any other app is refused before its bundle is
downloaded: nothing of it is stored or started at the site, the refusal is logged, and it is
counted in the file the site's metrics are read from.

Flower's SuperNode also waits with fixed sleeps: 3 s after each pull that found no message
(so the next round's message waits about that long), and 0.5 s between looks for the
ClientApp's reply. This SuperNode paces them instead (Pace): right after a message it pulls
again within tens of milliseconds, backing off to Flower's 3 s only while it stays idle, and
it looks for the reply every few milliseconds.

Flower's SuperNode would also start a new `flwr-clientapp` process for every message (imports,
torch and the site's data again each time). This SuperNode runs with `--isolation process`
instead, its runtime API on loopback at --runtime-port, and starts the site's warm worker
(bouquet_workloads.worker), one process for the whole run that serves each message; the worker
ends with the SuperNode, and if it ends first (a crash; Flower answers the server with an error
for the message it was running) the SuperNode starts another.

When the SuperLink will not have the SuperNode (no key, a key it does not hold), Flower exits
with its connection error; with --connection-error the SuperNode leaves Flower's message in
that file, for `bouquet site` to say what it means for the site.

    python -m bouquet_workloads.supernode --app-sha256 HEX --runtime-port PORT [--preload MODULE] [--refusals FILE]
        [--connection-error FILE] [--worker-forks-fd FD] -- FLOWER-SUPERNODE-ARGS...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.supercore.exit import ExitCode, add_exit_handler
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supernode import fleet_http_connection, start_client_internal

from . import forks as forks_
from . import pulls, wakes

log = logging.getLogger("bouquet_workloads.site")

# Flower's SuperNode takes each message from the SuperLink through this function, which is
# given (by keyword) the call that fetches a run's details; the pin wraps that call.
PATCHED = "_pull_and_store_message"
# The sleeps of flwr 1.41.0's start_client_internal (its only ones, through its module's
# `time`): after a pull that found nothing, and while a reply or its content is not there yet.
# tests/workloads/test_supernode.py checks that the source still says so.
IDLE_SLEEP, REPLY_SLEEP = 3, 0.5


class Pace:
    """Stands in for the `time` module of Flower's SuperNode loop: the same functions, but its
    fixed waits replaced.

    After a pull that found nothing: when the pull itself took HELD seconds or more, the server
    held it until it had a message or a second passed (Bouquet's gate does, see
    bouquet_workloads.wakes), and the next pull follows FIRST_PULL seconds later. Otherwise (a
    server that answers at once) the next pull comes FIRST_PULL seconds after a message and
    each pull that finds nothing doubles the wait, up to Flower's own 3 s: an idle site asks
    such a server no more often than Flower's does, and a message waits at most about as long
    as the site was idle.

    While the ClientApp runs, the reply is looked for when the worker says it handed one back
    (the pipe `replies`, bouquet_workloads.wakes), or every REPLY_POLL s without a worker."""

    FIRST_PULL = 0.02
    GROWTH = 2
    HELD = 0.25
    REPLY_POLL = 0.005
    REPLY_FALLBACK = 0.1  # the longest a reply handed back goes unseen if its wake-up is lost

    def __init__(self) -> None:
        self.idle = self.FIRST_PULL
        self.replies: int | None = None  # the read end of the worker's pipe, once it runs
        self.tasks: int | None = None  # the write end of the pipe the worker waits on
        self.lock = threading.Lock()
        self.woke = time.monotonic()

    def busy(self) -> None:
        """A message came: the next one is likely soon (the round's next phase)."""
        self.idle = self.FIRST_PULL

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            if time.monotonic() - self.woke >= self.HELD:
                seconds, self.idle = self.FIRST_PULL, self.FIRST_PULL
            else:
                seconds, self.idle = self.idle, min(self.idle * self.GROWTH, IDLE_SLEEP)
            time.sleep(seconds)
        elif seconds == REPLY_SLEEP and self.replies is not None:
            replies = self.replies
            try:
                wakes.wait_readable(replies, self.REPLY_FALLBACK)
            except EOFError:  # the worker ended; its successor gets a new pipe
                if self.replies == replies:
                    self.replies = None
                os.close(replies)
        else:
            time.sleep(self.REPLY_POLL if seconds == REPLY_SLEEP else seconds)
        self.woke = time.monotonic()

    def __getattr__(self, name: str):
        return getattr(time, name)


class Pin:
    """The one app this site runs, and the runs it refused."""

    def __init__(self, app_sha256: str, refusals: Path | None) -> None:
        self.app_sha256 = app_sha256
        self.refusals = refusals

    def guard(self, get_run: Callable[[int], Run]) -> Callable[[int], Run]:
        def pinned_get_run(run_id: int) -> Run:
            run = get_run(run_id)
            if run.fab_hash != self.app_sha256:
                self.refuse(run)
                # Flower's SuperNode drops a message of a run it may not take part in.
                raise RunNotRunningException(f"run {run_id} is not this job's app")
            return run

        return pinned_get_run

    def refuse(self, run: Run) -> None:
        log.error(
            "refused run %s: its app (sha256 %s) is not this job's app (sha256 %s); nothing of it runs here",
            run.run_id,
            run.fab_hash,
            self.app_sha256,
        )
        if self.refusals is not None:
            record_refusal(self.refusals, run.run_id, run.fab_hash)


def record_refusal(path: Path, run_id: int, app_sha256: str) -> None:
    """Adds a refused run to the JSON list in path (replaced whole, never half written)."""
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append({"run": run_id, "appSha256": app_sha256, "at": time.time()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)


def install(pin: Pin, pace: Pace) -> None:
    """Wraps the SuperNode's message intake so that every run it meets passes the pin, and
    paces the SuperNode's waits (its object pulls included, bouquet_workloads.pulls)."""
    original = getattr(start_client_internal, PATCHED)

    def pull_and_store_message(**kwargs):
        kwargs["get_run"] = pin.guard(kwargs["get_run"])
        run_id = original(**kwargs)
        if run_id is not None:
            pace.busy()
            with pace.lock:
                wakes.poke(pace.tasks)  # the worker claims the message's task at once
        return run_id

    setattr(start_client_internal, PATCHED, pull_and_store_message)
    start_client_internal.time = pace
    pulls.quicken()


def record_connection_error(path: Path) -> None:
    """Leaves Flower's message in path when the SuperNode cannot open its connection to the
    SuperLink (Flower's connection then calls flwr_exit, which ends the process)."""
    original = fleet_http_connection.flwr_exit

    def flwr_exit(code, message=None, *args, **kwargs):
        if code == ExitCode.SUPERNODE_CONNECTION_ERROR:
            path.write_text(message or "")
        return original(code, message, *args, **kwargs)

    fleet_http_connection.flwr_exit = flwr_exit


WORKER_RESTART_SECONDS = 1.0  # before a worker that ended is replaced


def keep_worker(command: list[str], pace: Pace, forks: tuple[forks_.Asker, dict] | None = None) -> threading.Thread:
    """Starts the site's warm worker, and another each time one ends, for as long as this
    process lives (the worker ends with it: --parent-pid). A worker stopped with the site
    (both are signalled together) is not replaced. Each worker gets two pipes: this process
    pokes one when it stored a message, the worker the other when it handed back a reply.
    With forks (a local run's fork server, bouquet_workloads.forks, and what to ask it for:
    worker_request) the worker is forked from it, torch and the app already imported; when the
    fork server refuses or is gone, that is logged and the worker is started as a process of
    its own."""
    stopping = threading.Event()
    add_exit_handler(stopping.set)  # Flower runs it when the SuperNode is told to stop

    def keep() -> None:
        nonlocal forks
        while True:
            tasks_read, tasks_write = os.pipe()
            replies_read, replies_write = os.pipe()
            for fd in (tasks_write, replies_read):
                os.set_blocking(fd, False)
            wait = None
            if forks is not None:
                try:
                    forks[0].start(forks[1], [tasks_read, replies_write, 1, 2])
                    wait = forks[0].wait
                except forks_.ForkError as error:
                    log.warning("the fork server did not start the worker (%s); starting it as a process of its own", error)
                    forks = None
            if wait is None:
                wait = subprocess.Popen(
                    [*command, "--tasks-fd", str(tasks_read), "--replies-fd", str(replies_write)],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(tasks_read, replies_write),
                ).wait
            os.close(tasks_read)
            os.close(replies_write)
            pace.tasks, pace.replies = tasks_write, replies_read
            try:
                code = wait()
            except forks_.ForkError as error:  # the worker it forked ends with it (bouquet_workloads.worker)
                code, forks = str(error), None
            with pace.lock:  # no poke of a pipe whose number a new file may take
                pace.tasks = None
                os.close(tasks_write)
            # The replies pipe is closed by its reader, which sees it end (bouquet_workloads.wakes).
            time.sleep(WORKER_RESTART_SECONDS)
            if stopping.is_set():
                return
            log.error("the site's worker ended (exit %s); starting another", code)

    thread = threading.Thread(target=keep, name="bouquet-worker", daemon=True)
    thread.start()
    return thread


def worker_command(app_sha256: str, runtime_port: int, refusals: Path | None, preload: str | None) -> list[str]:
    command = [sys.executable, "-m", "bouquet_workloads.worker", "--app-sha256", app_sha256]
    command += ["--runtime-api-address", f"127.0.0.1:{runtime_port}", "--parent-pid", str(os.getpid())]
    command += ["--refusals", str(refusals)] if refusals else []
    return command + (["--preload", preload] if preload else [])


def worker_request(runtime_port: int, refusals: Path | None) -> dict:
    """What a local run's fork server is asked for in place of worker_command: it runs the app
    it was told to pin, and the modules it imported."""
    return {"kind": "worker", "runtimeApiAddress": f"127.0.0.1:{runtime_port}", "refusals": str(refusals.resolve()) if refusals else None}


def pinned_parser(module: str, doc: str, runs_at: str, flower_command: str) -> argparse.ArgumentParser:
    """The arguments of a pinned Flower process (this SuperNode, the server's SuperExec):
    the pin, where refusals are listed, then -- and the Flower command's own arguments."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--app-sha256", required=True, help=f"sha256 of the job's app bundle: the only app {runs_at} runs")
    parser.add_argument("--refusals", type=Path, help=f"file that lists the runs {runs_at} refused")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help=f"-- then {flower_command}'s arguments")
    return parser


def run_flower(logger: logging.Logger, command: str, flower_args: list[str], entry) -> int:
    """Runs Flower's command entry (its console script's function) with flower_args, after
    the caller's patches, this process's refusals logged to stderr by logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sys.argv = [command, *(flower_args[1:] if flower_args[:1] == ["--"] else flower_args)]
    return entry() or 0


def main(argv: list[str] | None = None) -> int:
    parser = pinned_parser("bouquet_workloads.supernode", __doc__, "this site", "flower-supernode")
    parser.add_argument("--connection-error", type=Path, help="file to leave Flower's message in if the SuperLink refuses the SuperNode")
    parser.add_argument(
        "--runtime-port", type=int, required=True, help="port of the SuperNode's runtime API on loopback, which the worker serves"
    )
    parser.add_argument("--preload", metavar="MODULE", help="module the worker imports before the first message (the job's ClientApp's)")
    parser.add_argument(
        "--worker-forks-fd", type=int, help="socket to a local run's fork server, which forks the worker (bouquet_workloads.forks)"
    )
    args = parser.parse_args(argv)
    pace = Pace()
    install(Pin(args.app_sha256, args.refusals), pace)
    if args.connection_error:
        record_connection_error(args.connection_error)
    from flwr.supernode.cli import flower_supernode

    forks = None
    if args.worker_forks_fd is not None:
        forks = forks_.Asker(args.worker_forks_fd), worker_request(args.runtime_port, args.refusals)
    keep_worker(worker_command(args.app_sha256, args.runtime_port, args.refusals, args.preload), pace, forks)
    flower_args = [*args.flower_args, "--host", "127.0.0.1", "--port", str(args.runtime_port), "--isolation", "process"]
    return run_flower(log, "flower-supernode", flower_args, flower_supernode)


if __name__ == "__main__":
    sys.exit(main())
