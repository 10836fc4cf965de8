"""The server's SuperExec, which starts only the job's ServerApp.

Flower's SuperLink (with `--isolation process`) leaves starting ServerApps to a SuperExec,
which takes each pending task from the SuperLink and launches it. Each task carries the sha256
of its run's app bundle; this SuperExec launches only tasks of the job's bundle (the same pin
the sites hold, bouquet_workloads.flower.app_sha256) and refuses any other before anything of it runs:
the refusal is logged and listed in the refusals file. So even a run submitted on the server's
own loopback port, where the Control API answers, runs no code but the job's at the server.

    python -m bouquet_workloads.superexec --app-sha256 HEX [--refusals FILE] -- FLOWER-SUPEREXEC-ARGS...
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from flwr.supercore.superexec import run_superexec
from flwr.supercore.superexec.executor.types import LaunchResult

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


def main(argv: list[str] | None = None) -> int:
    args = pinned_parser("bouquet_workloads.superexec", __doc__, "this server", "flower-superexec").parse_args(argv)
    install(args.app_sha256, args.refusals)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    return run_flower(log, "flower-superexec", args.flower_args, flower_superexec)


if __name__ == "__main__":
    sys.exit(main())
