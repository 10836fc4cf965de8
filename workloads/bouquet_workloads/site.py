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
import sys
import tempfile
import time
from pathlib import Path

from bouquet import identity

from . import flower
from .client_app import DONE_FILE_VARIABLE

POLL_SECONDS = 0.5
# After the run-over message the SuperNode still has to send its reply: stopping it at once
# left the server waiting minutes for a reply whose content never came.
REPLY_GRACE_SECONDS = 5.0


# Flower's error codes for a SuperNode the SuperLink will not have (flwr.supercore.error).
NO_KEY, KEY_NOT_REGISTERED = "[code: 2001]", "[code: 2004]"
# Code 2004 also when the key is registered but its node still counts as online: a previous
# SuperNode of this site (its pod replaced, or a server before this one) has not missed
# enough heartbeats yet (Flower: 2 of 30 s). Then the site tries again, this long at most.
STILL_ONLINE = "could not be activated"
STILL_ONLINE_PATIENCE_SECONDS = 120.0
RETRY_SECONDS = 5.0  # before a site starts its SuperNode again
# Flower's SuperNode also ends by itself, with no connection error, when its server goes away
# in the middle of a request in some ways (a TLS connection cut mid-read makes it give up, an
# answer of 401 from a server that no longer knows its session makes it interrupt itself):
# that is how a server restarted with its sites (a spec change) or moved can look. The run is
# not over, so the site starts its SuperNode again, this many times in a row at most. A server
# started again forgets its sites' nodes (bouquet_workloads.flower.superlink_command), so each restart of
# the server also ends every site's SuperNode once: a SuperNode that ran STABLE_SECONDS before
# it ended starts the count again.
SUPERNODE_RESTARTS = 5
STABLE_SECONDS = 60.0


def still_online(flower_message: str) -> bool:
    """Whether the SuperLink refused the SuperNode because its node is online already."""
    return KEY_NOT_REGISTERED in flower_message and STILL_ONLINE in flower_message


# Flower's SuperNode gives up at once on a connection error that mentions TLS, as a certificate
# its CA does not vouch for does; but a server that stops (its pod replaced) or is not yet
# serving in the middle of a site's TLS handshake breaks it off the same way, and that passes.
BROKEN_OFF = ("eof occurred", "unexpected_eof", "connection reset", "server disconnected", "broken pipe")


def broken_off(flower_message: str) -> bool:
    """Whether the SuperNode's connection broke off (the site tries again) rather than being
    refused: no Flower code, no certificate at fault, no HTTP answer."""
    text = flower_message.lower()
    refused = "[code:" in text or "certificate" in text or " error '" in text
    return not refused and any(words in text for words in BROKEN_OFF)


def not_admitted(site: str, key: Path | None, flower_message: str) -> str:
    """What Flower's connection error means for the site, as the site's log and (on
    Kubernetes, from its pod's termination message) the job's status say it."""
    if still_online(flower_message):
        return (
            f"the server counted another connection of site {site} online for over {STILL_ONLINE_PATIENCE_SECONDS:.0f}s: "
            "is a second SuperNode running with this site's key?"
        )
    if NO_KEY in flower_message:
        return f"site {site} has no key, and the server admits only the job's registered site keys: give the site its key (--key)"
    if KEY_NOT_REGISTERED in flower_message and key is not None:
        held = identity.fingerprint(identity.public_of(key.read_bytes()))
        return (
            f"the server does not admit site {site}'s key (public key sha256 {held[:16]}...): it is not a key the job registered, "
            "so it is a wrong key, a key replaced since (revoked), or the key of a site no longer in the job"
        )
    reason = flower_message.removeprefix("Failed to initialize the connection to the SuperLink.").strip().replace("\n", " ")
    return f"site {site} could not connect to the server: {reason}"


def run_site(job: dict, site: str, server: str, data: Path, ca: Path | None, runtime_port: int, key: Path | None = None) -> int:
    """Runs the site's SuperNode until the run is over (exit 0) or it fails (its code). The
    SuperNode proves the site with key and runs only the app of this copy of the job."""
    settings = next(s for s in job["spec"]["sites"] if s["name"] == site)
    data_format = settings.get("data", {}).get("format")
    with tempfile.TemporaryDirectory(prefix="bouquet-site-") as state:
        connection_error = Path(state) / "connection-error"
        pinned = flower.SiteIdentity(flower.app_sha256(job), key, Path(state) / "refused.json", connection_error)
        command = flower.supernode_command(server, site, data.resolve(), data_format, runtime_port, ca, pinned, flower.client_module(job))
        done = Path(state) / "run-finished"
        env = {**flower.process_env(), DONE_FILE_VARIABLE: str(done)}
        processes = flower.Processes(Path(state) / "logs", env)
        # The SuperNode writes to this process's own output, where a pod's log is read.
        supernode = processes.start_attached("supernode", command)
        stop = signal.signal(signal.SIGTERM, flower.raise_interrupt)
        verdict = ""
        patience = time.monotonic() + STILL_ONLINE_PATIENCE_SECONDS
        restarts = 0
        started = time.monotonic()
        try:
            while not done.exists():
                code = supernode.poll()
                if code is not None:
                    if time.monotonic() - started >= STABLE_SECONDS:
                        restarts = 0
                    message = connection_error.read_text() if connection_error.exists() else ""
                    if still_online(message) and time.monotonic() < patience:
                        why = "the server still counts an earlier connection of this site online; trying again"
                    elif message and not broken_off(message):
                        verdict = not_admitted(site, key, message)
                        return code
                    elif done.exists():
                        continue  # it ended as the run did: the run is over
                    elif restarts < SUPERNODE_RESTARTS:
                        restarts += 1
                        if message:
                            why = f"{not_admitted(site, key, message)}; trying again ({restarts} of {SUPERNODE_RESTARTS})"
                        else:
                            why = f"the SuperNode stopped (exit {code}) before the run was over; starting it again ({restarts} of {SUPERNODE_RESTARTS})"
                    else:
                        verdict = (
                            not_admitted(site, key, message)
                            if message
                            else f"the site's SuperNode stopped {restarts + 1} times before the run was over (last exit {code})"
                        )
                        return code or 1
                    print(f"site {site}: {why}", flush=True)
                    connection_error.unlink(missing_ok=True)
                    time.sleep(RETRY_SECONDS)
                    supernode = processes.start_attached("supernode", command)
                    started = time.monotonic()
                    continue
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
            if verdict:  # the last line of the site's log: its pod's termination message
                print(f"error: {verdict}", file=sys.stderr, flush=True)
