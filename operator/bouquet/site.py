"""`bouquet site`: one site of a job, in the foreground: Flower's SuperNode, which starts the
ClientApp for every message the server sends and hands it this site's data file only."""

from __future__ import annotations

import os
from pathlib import Path

from . import flower


def exec_site(job: dict, site: str, server: str, data: Path, ca: Path | None, runtime_port: int) -> None:
    """Replaces this process with the site's SuperNode (signals then reach it directly)."""
    settings = next(s for s in job["spec"]["sites"] if s["name"] == site)
    data_format = settings.get("data", {}).get("format")
    command = flower.supernode_command(server, site, data.resolve(), data_format, runtime_port, ca)
    os.execve(command[0], command, flower.process_env())
