"""Finding processes by their command line, to check that nothing was left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from support.prometheus import free_port


def processes_mentioning(text: str, but_own_children: bool = False) -> list[str]:
    """Command lines of live processes (not zombies) that contain text; with
    but_own_children, not those this process runs itself (a kubectl of the tests' asking a
    cluster that is going down is not something the cluster left behind)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if but_own_children and int(parent) == os.getpid():
            continue
        if state != "Z" and text in command:
            found.append(f"{proc.name}: {command}")
    return found


def start_bouquet(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m bouquet ARGS` in a session of its own, appending its output to log."""
    with log.open("a") as sink:
        return subprocess.Popen([sys.executable, "-m", "bouquet", *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def site_args(job_file: Path, site: str, server_port: int, data: Path, ca: Path) -> list[str]:
    """The arguments of `bouquet site` for one site dialling a server on this machine."""
    return [
        "site", str(job_file), "--site", site, "--server", f"localhost:{server_port}", "--data", str(data),
        "--ca", str(ca), "--runtime-port", str(free_port()),
    ]  # fmt: skip


def stop_bouquet(process: subprocess.Popen, grace: float = 30) -> None:
    """Stops a `bouquet run`, `server` or `site` that a test gave up on: SIGTERM, on which it
    stops the Flower processes it started; what is left after grace seconds is killed."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        from bouquet_workloads.flower import descendants

        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
