"""A job's server: Flower's SuperLink (which starts the ServerApp), the run submitted to it,
and the wait for the run's end. `bouquet run` uses it on this machine; `bouquet server` is
the same thing as a process of its own, the entrypoint of the server pod on Kubernetes.

Restarting a server on the same output directory continues the job: the ServerApp finds
the newest checkpoint and carries on from the round after it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import flower, outputs, progress, wakes
from .gate import Gate

START_SECONDS = 60
POLL_SECONDS = 0.5  # between looks at the run's status and history (in-process: cheap)
# Once the ServerApp has reported the run's end, Flower says it is over within a second or so:
# looked for this often then, so that `bouquet run` goes on to its end at once.
ENDING_POLL_SECONDS = 0.05


def _tls_files(tls: flower.Tls) -> tuple[str | None, str | None, str | None]:
    return (str(tls.ca), str(tls.cert), str(tls.key)) if tls.enabled else (None, None, None)


class RunFailed(flower.LaunchError):
    """Training did not complete: why, and the end of the server's log."""


class Server:
    """The SuperLink on a loopback port of its own, the gate on the port the sites dial, and
    the run. public_keys (site -> public key file) are registered before any site connects, and
    only SuperNodes holding one of their keys are admitted; with None (or TLS disabled) any
    SuperNode with the job's CA is, and a site's name is what its SuperNode says."""

    def __init__(
        self,
        job: dict,
        out: Path,
        tls: flower.Tls,
        processes: flower.Processes,
        port: int = 0,
        host: str = "127.0.0.1",
        public_keys: Mapping[str, Path] | None = None,
        forks_fd: int | None = None,
    ) -> None:
        self.job = job
        self.forks_fd = forks_fd  # a local run's fork server, which forks the ServerApp (bouquet_workloads.forks)
        self.out = out
        self.tls = tls
        self.processes = processes
        self.port = port or flower.free_port()
        self.host = host
        self.public_keys = dict(public_keys) if public_keys is not None and tls.enabled else None
        self.superlink_port = flower.free_port()
        self.gate = Gate(host, self.port, self.superlink_port, *_tls_files(tls), notice_port=0)
        self.control: flower.Control | None = None  # the SuperLink's Control API, once it answers
        self.run_id: int | None = None

    @property
    def address(self) -> str:
        """How sites on this machine reach the server (the certificate names localhost)."""
        return f"localhost:{self.port}"

    def start(self) -> None:
        """Starts the SuperLink, registers the sites' keys, and only then opens the gate: a
        site that dialled a server whose keys were not registered yet was refused (Flower's
        code 2004), and the site gives up on a refusal (bouquet_workloads.site)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.processes.start("server", flower.superlink_command(self.superlink_port, self.tls, self.public_keys is not None))
        flower.wait_healthy(self.superlink_port, self.tls, START_SECONDS, self.processes)
        self.control = flower.Control(self.superlink_port, self.tls)
        if self.public_keys is not None:
            # The SuperLink just started holds no key, whatever an earlier server registered;
            # nodes.json (node id -> site and key) is what the ServerApp names sites by.
            nodes = flower.register_site_keys(self.public_keys, self.control)
            outputs.write_json(self.out / outputs.NODES, {str(node): entry for node, entry in sorted(nodes.items())})
        try:
            self.gate.start()
        except OSError as error:
            raise flower.LaunchError(str(error)) from None
        flower.wait_healthy(self.port, self.tls, START_SECONDS, self.processes)
        # The ServerApp it starts writes to the SuperLink's log, as it would under the SuperLink.
        pin = flower.superexec_command(
            self.superlink_port, self.tls, flower.app_sha256(self.job), self.out / "logs" / "server-refused.json", self.forks_fd
        )
        # The ServerApp it starts tells the gate when it pushed messages (bouquet_workloads.wakes).
        notice = {wakes.NOTICE_PORT_VARIABLE: str(self.gate.notice_port)}
        passed = () if self.forks_fd is None else (self.forks_fd,)
        self.processes.start("superexec", pin, log_as="server", env=notice, pass_fds=passed)

    def stop(self) -> None:
        self.gate.stop()
        if self.control is not None:
            self.control.close()
            self.control = None

    def submit(self) -> int:
        """Submits the job's run; the ServerApp resumes from a checkpoint if there is one."""
        app_dir = flower.write_app(self.out / "app", self.job)
        config = flower.run_config(self.job, self.out, "claims" if self.public_keys is None else "keys")
        self.run_id = self.control.start_run(app_dir, config)
        return self.run_id

    def follow(self, say: Callable[[str], None], started: float, ended: Callable[[str], None] | None = None) -> None:
        """Reports each round as it is committed, until Flower says the run is over;
        raises RunFailed unless the final model was written. ended is called with the
        ServerApp's verdict (Succeeded or Failed) once it has reported it after reporting
        the run Running (with Succeeded, the sites were told the run is over by then), before
        Flower says the run is over."""
        rounds = self.job["spec"]["rounds"]
        reported = len(outputs.read_json(self.out / outputs.HISTORY, []) or [])
        if reported:
            say(f"continuing after round {reported} (from its checkpoint)")
        first_new = reported
        running = False
        while True:
            self.processes.check()
            if not self.gate.alive:
                raise flower.LaunchError(f"the server's port {self.host}:{self.port} stopped answering")
            status = self.control.run_status(self.run_id)
            # Read after the status, so that the rounds of a run that just finished are shown.
            history = outputs.read_json(self.out / outputs.HISTORY, []) or []
            finished = status.startswith("finished")
            for entry in history[reported:]:
                if not (finished or outputs.evaluated(entry)):
                    break  # its evaluation comes with the next round's exchange (server_app.evaluates_ahead)
                say(round_line(entry, rounds, history[first_new:], started))
                reported += 1
            if finished:
                break
            state = (outputs.read_json(self.out / outputs.PROGRESS, {}) or {}).get("state")
            ending = state in ("Succeeded", "Failed") and running  # (not a verdict an earlier run left)
            running = running or state == "Running"
            if ending and ended is not None:
                ended(state)
                ended = None
            time.sleep(ENDING_POLL_SECONDS if ending else POLL_SECONDS)
        progress = outputs.read_json(self.out / outputs.PROGRESS, {}) or {}
        # The built-in task also reports its own end; a job's own app is done when Flower says so.
        builtin_done = "app" in self.job["spec"] or progress.get("state") == "Succeeded"
        if status != "finished:completed" or not builtin_done:
            reason = progress.get("message") or f"Flower reports the run {status}"
            raise RunFailed(f"{reason} (the server's log: {self.processes.log_dir / 'server.log'})", self.processes.tail("server"))


def round_line(entry: dict, rounds: int, timed: list[dict], started: float) -> str:
    """One line of progress: round i of N, its metrics, elapsed and estimated remaining
    time (from the rounds this process saw)."""
    elapsed = time.monotonic() - started
    durations = [e["durationSeconds"] for e in timed] or [entry["durationSeconds"]]
    remaining = (rounds - entry["round"]) * sum(durations) / len(durations)
    metrics_text = "  ".join(f"{k} {entry[k]:.4f}" for k in ("loss", "accuracy", "auroc") if k in entry)
    return f"round {entry['round']:>3}/{rounds}  {metrics_text}  sites {len(entry['sites'])}  elapsed {clock(elapsed)}  remaining ~{clock(remaining)}"


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def serve(
    job: dict,
    out: Path,
    tls: flower.Tls,
    port: int,
    host: str,
    metrics_port: int,
    say: Callable[[str], None] = print,
    report_status: bool = False,
    public_keys: Mapping[str, Path] | None = None,
) -> None:
    """`bouquet server`: runs the job's server in the foreground until the run ends,
    serving the job's metrics meanwhile (and, in a pod, reporting each round to the
    FederatedJob's status). Restarted on the same output directory, it continues from the
    last checkpoint."""
    from . import metrics

    namespace = job["metadata"].get("namespace", "local")
    metrics_server, _ = metrics.serve(out, namespace, job["metadata"]["name"], metrics_port, host)
    reporter = progress.Reporter.in_cluster(out, namespace, job["metadata"]["name"]).start() if report_status else None
    processes = flower.Processes(out / "logs")
    started = time.monotonic()
    server = Server(job, out, tls, processes, port, host, public_keys)
    # Told to stop (its pod deleted: SIGTERM, which a container's first process would
    # otherwise ignore until the kill), it stops its Flower processes as Ctrl-C does.
    stop = signal.signal(signal.SIGTERM, flower.raise_interrupt)
    try:
        server.start()
        say(f"server of job {job['metadata']['name']} listening on {host}:{server.port}")
        if server.public_keys is not None:  # its SuperLink started afresh: it holds these keys and no other
            say(f"sites admitted (their keys registered): {', '.join(sorted(server.public_keys))}; no other key")
        server.submit()
        server.follow(say, started)
    finally:
        # The gate and the Control client first: a SuperLink told to stop waits for their
        # connections to close.
        server.stop()
        processes.stop()
        metrics_server.shutdown()
        if reporter:
            reporter.stop()
        signal.signal(signal.SIGTERM, stop)
