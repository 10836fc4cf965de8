"""Test-only: records which process opens files under a watched directory.

Put this folder on PYTHONPATH and set BOUQUET_TEST_OPEN_LOG (the log file) and
BOUQUET_TEST_WATCH (the directory). Every Python process started with that environment,
including the ones Flower spawns, appends "role<TAB>path" lines, where role is the site
whose SuperNode the process descends from or belongs to ("site:<name>"), "server" for the
SuperLink's and the server's SuperExec's descendants (the ServerApp), or "other". A process
that names its owner with --parent-pid (a worker, a ServerApp, a local run's fork server and
what it forked) belongs to that process.
"""

import os
import re
import sys

_LOG = os.environ.get("BOUQUET_TEST_OPEN_LOG")
_WATCH = os.environ.get("BOUQUET_TEST_WATCH")


def _role() -> str:
    pid, argv = os.getpid(), list(sys.argv)  # this process's own word: a process forked by a
    # local run's fork server (bouquet_workloads.forks) has the fork server's command line
    while pid > 1:
        try:
            if argv is None:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return "other"
        command = " ".join(argv)
        if "flower-supernode" in command or "bouquet_workloads.supernode" in command:
            found = re.search(r'site="([^"]+)"', command)
            return f"site:{found.group(1)}" if found else "site:?"
        if "flower-superlink" in command or "bouquet_workloads.superlink" in command or "bouquet_workloads.superexec" in command:
            return "server"
        # A worker, a ServerApp and the fork server say whom they belong to: --parent-pid.
        owner = argv[argv.index("--parent-pid") + 1] if "--parent-pid" in argv[:-1] else ""
        pid, argv = (int(owner) if owner.isdigit() else ppid), None
    return "other"


def _hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if path.startswith(_WATCH) and not path.startswith(_LOG):
        with open(_LOG, "a") as log:
            log.write(f"{_role()}\t{path}\n")


if _LOG and _WATCH:
    sys.addaudithook(_hook)
