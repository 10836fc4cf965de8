"""The server's SuperExec, which starts only the job's ServerApp.

Flower's SuperLink (with `--isolation process`) leaves starting ServerApps to a SuperExec,
which takes each pending task from the SuperLink and launches it. Each task carries the sha256
of its run's app bundle; this SuperExec launches only tasks of the job's bundle (the same pin
the sites hold, bouquet_workloads.flower.app_sha256) and refuses any other before anything of it runs:
the refusal is logged and listed in the refusals file. So even a run submitted on the server's
own loopback port, where the Control API answers, runs no code but the job's at the server.

In `bouquet run` (--forks-fd) the ServerApp is forked from the run's fork server
(bouquet_workloads.forks), torch and the app already imported, in place of the process Flower's
executor would start; a fork server that refuses or is gone is logged, and Flower's own launch
goes ahead.

    python -m bouquet_workloads.superexec --app-sha256 HEX [--refusals FILE] [--forks-fd FD] -- FLOWER-SUPEREXEC-ARGS...
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.supercore.superexec import run_superexec
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.types import LaunchResult

from . import forks as forks_
from .supernode import pinned_parser, record_refusal, run_flower

log = logging.getLogger("bouquet_workloads.server")


# How often the SuperExec asks the SuperLink for a task once it launched the job's ServerApp:
# a server runs one run, and until then it asks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s
# (bouquet_workloads.flower.process_env). Each ask is a request the SuperLink serves, on the
# CPU the rounds need.
LAUNCHED_POLL_SECONDS = 3.0


class _Pace:
    """Stands in for the `time` module of Flower's SuperExec loop: its wait between asks is
    LAUNCHED_POLL_SECONDS at least once a task was launched."""

    def __init__(self) -> None:
        self.launched = False

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, LAUNCHED_POLL_SECONDS) if self.launched else seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def install(app_sha256: str, refusals: Path | None) -> None:
    """Makes the SuperExec's plugin launch only tasks of the job's app, and ask for tasks
    seldom once it launched one."""
    plugin = run_superexec.AutoExecPlugin
    pace = _Pace()
    run_superexec.time = pace

    class PinnedPlugin(plugin):
        def launch_task(self, token: str, task) -> LaunchResult:
            if task.fab_hash != app_sha256:
                log.error(
                    "refused run %s: its app (sha256 %s) is not this job's app (sha256 %s); nothing of it runs here",
                    task.run_id,
                    task.fab_hash or "none",
                    app_sha256,
                )
                if refusals is not None:
                    record_refusal(refusals, task.run_id, task.fab_hash)
                return LaunchResult.failed(f"run {task.run_id} is not this job's app")
            result = super().launch_task(token, task)
            pace.launched = True
            return result

    run_superexec.AutoExecPlugin = PinnedPlugin


SERVERAPP_COMMAND = "flwr-serverapp"


class _Launches:
    """Stands in for the `subprocess` module of Flower's SubprocessExecutor: a ServerApp it
    would start (`subprocess.Popen(["flwr-serverapp", ...])`, its output to this process's or
    to nowhere) is forked by the fork server instead. Anything else, or a fork server that does
    not start it, goes to subprocess as before. Flower keeps nothing of what Popen returns."""

    def __init__(self, forks: forks_.Asker) -> None:
        self.forks: forks_.Asker | None = forks

    def Popen(self, args, *more, **options):  # noqa: N802 (subprocess's name)
        quiet = options.get("stdout") == subprocess.DEVNULL and options.get("stderr") == subprocess.DEVNULL
        plain = not more and set(options) <= {"stdout", "stderr"} and (quiet or not options)
        if self.forks is not None and plain and list(args[:1]) == [SERVERAPP_COMMAND]:
            nowhere = os.open(os.devnull, os.O_WRONLY) if quiet else None
            try:
                env = {name: os.environ[name] for name in forks_.SERVERAPP_ENV if name in os.environ}
                request = {"kind": "serverapp", "args": [str(a) for a in args[1:]], "env": env}
                pid = self.forks.start(request, [nowhere, nowhere] if quiet else [1, 2])
                log.info("the fork server started the ServerApp (pid %d)", pid)
                return None
            except forks_.ForkError as error:
                log.warning("the fork server did not start the ServerApp (%s); starting it as a process of its own", error)
                self.forks = None
            finally:
                if nowhere is not None:
                    os.close(nowhere)
        return subprocess.Popen(args, *more, **options)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def fork_serverapps(forks: forks_.Asker) -> None:
    """Makes Flower's executor ask the fork server for the ServerApp (_Launches)."""
    subprocess_executor.subprocess = _Launches(forks)


def main(argv: list[str] | None = None) -> int:
    parser = pinned_parser("bouquet_workloads.superexec", __doc__, "this server", "flower-superexec")
    parser.add_argument(
        "--forks-fd", type=int, help="socket to a local run's fork server, which forks the ServerApp (bouquet_workloads.forks)"
    )
    args = parser.parse_args(argv)
    install(args.app_sha256, args.refusals)
    if args.forks_fd is not None:
        fork_serverapps(forks_.Asker(args.forks_fd))
    from flwr.supercore.cli.flower_superexec import flower_superexec

    return run_flower(log, "flower-superexec", args.flower_args, flower_superexec)


if __name__ == "__main__":
    sys.exit(main())
