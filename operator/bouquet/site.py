"""`bouquet site`: one site of a job, in the foreground: Flower's SuperNode, which starts the
ClientApp for every message the server sends and hands it this site's data file only.

A SuperNode never ends by itself, but a site's Kubernetes Job must complete when the run
does. So the server, once the final model is written, tells every site the run is over;
the ClientApp that receives it leaves a file in a folder this process watches, and this
process then gives the SuperNode a few seconds to send its reply, stops it and exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bouquet_workloads.client_app import DONE_FILE_VARIABLE

from . import flower

POLL_SECONDS = 0.5
# After the run-over message the SuperNode still has to send its reply: stopping it at once
# left the server waiting minutes for a reply whose content never came.
REPLY_GRACE_SECONDS = 5.0


def run_site(job: dict, site: str, server: str, data: Path, ca: Path | None, runtime_port: int, key: Path | None = None) -> int:
    """Runs the site's SuperNode until the run is over (exit 0) or it fails (its code). The
    SuperNode proves the site with key and runs only the app of this copy of the job."""
    settings = next(s for s in job["spec"]["sites"] if s["name"] == site)
    data_format = settings.get("data", {}).get("format")
    with tempfile.TemporaryDirectory(prefix="bouquet-site-") as state:
        identity = flower.SiteIdentity(flower.app_sha256(job), key, Path(state) / "refused.json")
        command = flower.supernode_command(server, site, data.resolve(), data_format, runtime_port, ca, identity)
        done = Path(state) / "run-finished"
        env = {**flower.process_env(), DONE_FILE_VARIABLE: str(done)}
        processes = flower.Processes(Path(state) / "logs", env)
        # The SuperNode writes to this process's own output, where a pod's log is read.
        supernode = processes.start_attached("supernode", command)
        stop = signal.signal(signal.SIGTERM, flower.raise_interrupt)
        try:
            while not done.exists():
                code = supernode.poll()
                if code is not None:
                    return code
                time.sleep(POLL_SECONDS)
            print(f"site {site}: the run is over", flush=True)
            try:
                supernode.wait(REPLY_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            return 0
        except KeyboardInterrupt:
            return 130
        finally:
            processes.stop()
            signal.signal(signal.SIGTERM, stop)
