"""Starting Flower's processes for a job: the SuperLink (with the ServerApp it spawns), one
SuperNode per site, and the submission of the run.

This is the only module that knows Flower's command lines. Local runs (`bouquet run`) and
the pods the operator creates (`bouquet server`, `bouquet site`) both go through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

SERVER_APP = "bouquet_workloads.server_app:app"
SITE_NAMES = "site-names"
CLIENT_APP = "bouquet_workloads.client_app:app"


class LaunchError(RuntimeError):
    """A Flower process could not be started or stopped working. `log` holds the end of its
    log, which is shown before the error itself."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class Tls:
    """Where the job's TLS files are; None fields mean TLS is off."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.ca is not None


def write_app(directory: Path, job: Mapping) -> Path:
    """Writes the Flower app bundle's manifest for a job: which ServerApp and ClientApp run
    (the built-in ones or the job's own) and the run-config keys they accept. The code
    itself is imported from the installed packages, not shipped in the bundle."""
    app = job["spec"].get("app", {})
    config = {"job": "", "output-dir": "", SITE_NAMES: "", **{k: "" for k in app.get("config", {})}}
    manifest = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "bouquet-job", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "bouquet",
                    "components": {
                        "serverapp": app.get("serverApp", SERVER_APP),
                        "clientapp": app.get("clientApp", CLIENT_APP),
                    },
                    "config": config,
                }
            }
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(manifest))
    return directory


def run_config(job: Mapping, out: Path, site_names: str) -> dict[str, str]:
    """What the ServerApp and ClientApps receive as their run config. site_names is where
    the ServerApp takes a site's name from: "keys" (the registered keys, nodes.json) or
    "claims" (what each SuperNode says: only when sites are not authenticated)."""
    return {
        "job": json.dumps(job, separators=(",", ":")),
        "output-dir": _absolute(out),
        SITE_NAMES: site_names,
        **job["spec"].get("app", {}).get("config", {}),
    }


def _absolute(path: Path) -> str:
    """A path as Flower is handed it: absolute, whatever the user typed. Flower refuses some
    relative paths (a connection's root-certificates) and resolves others against the working
    directory of whichever process reads them."""
    return str(Path(path).resolve())


@dataclass
class Processes:
    """Processes started for a job, each in its own process group so that stopping one
    also stops what it spawned (the ServerApp under the SuperLink, ClientApps under a
    SuperNode)."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: process_env())
    running: dict[str, subprocess.Popen] = field(default_factory=dict)
    ending: set[str] = field(default_factory=set)  # told to stop (terminate): their end is no failure

    def start(
        self,
        name: str,
        command: list[str],
        log_as: str | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Collection[int] = (),
    ) -> subprocess.Popen:
        """Starts command as name, its output in <log_as or name>.log (appended to), with env
        added to the processes' environment and the file descriptors pass_fds kept open in it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{log_as or name}.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        self.running[name] = process
        return process

    def start_attached(self, name: str, command: list[str]) -> subprocess.Popen:
        """Like start, but the process writes to this process's stdout and stderr."""
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.running[name] = process
        return process

    def check(self) -> None:
        """Raises if a process ended on its own."""
        for name, process in self.running.items():
            if name in self.ending:
                continue
            code = process.poll()
            if code is not None:
                raise LaunchError(f"{name} exited with code {code} (its log: {self.log_dir / (name + '.log')})", self.tail(name))

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def terminate(self, names: list[str]) -> None:
        """Tells the named processes and everything they started to stop (SIGTERM), without
        waiting for them: stop() collects them."""
        self.ending.update(names)
        _signal_all(self._trees({n: p for n, p in self.running.items() if n in names}), signal.SIGTERM)

    def stop(self, names: list[str] | None = None, grace: float = 5.0) -> None:
        """Stops the named processes (default: all) and everything they started: SIGTERM,
        then SIGKILL to whatever is left after grace seconds."""
        chosen = {n: p for n, p in self.running.items() if names is None or n in names}
        pids = self._trees(chosen)
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in chosen.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        _signal_all(pids, signal.SIGKILL)
        for name, process in chosen.items():
            process.wait()
            del self.running[name]
            self.ending.discard(name)

    @staticmethod
    def _trees(chosen: Mapping[str, subprocess.Popen]) -> set[int]:
        """The processes and everything they started. Flower starts its ServerApp and
        ClientApps in sessions of their own, so the whole process tree is collected rather
        than trusting process groups; and a process whose parent has exited is no one's
        descendant any more, but still in the group it was started in (the SuperExec of a
        SuperNode that gave up, a worker whose SuperNode ended first)."""
        pids = {pid for p in chosen.values() for pid in (p.pid, *descendants(p.pid))}
        return pids | group_members({p.pid for p in chosen.values()})


SUPEREXEC_POLL_SECONDS = 0.1
FLOWER_IN_MEMORY = ":flwr-in-memory:"  # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME


def process_env(extra_paths: list[Path] = ()) -> dict[str, str]:
    """The environment for Flower's processes. Flower starts further console scripts of
    its own by name, so this environment's bin directory goes first on PATH; and the
    ServerApp and ClientApps import the same Bouquet code as this process (plus a job's
    own app modules from extra_paths). Flower's telemetry is off: left on, every Flower process
    (a ClientApp for each message a site receives) reports the machine to Flower's servers,
    which a site's network must not reach. A SuperExec looks for a task to start (a site's
    ClientApp for each message) every SUPEREXEC_POLL_SECONDS rather than Flower's 1 s."""
    import bouquet_workloads  # this package: its folder goes on the processes' PYTHONPATH

    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_SECONDS))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    roots = [*extra_paths, Path(bouquet_workloads.__file__).parent.parent]
    inherited = [Path(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(_absolute(p) for p in [*roots, *inherited]))
    return env


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group_members(groups: set[int]) -> set[int]:
    """Every process whose process group is one of groups, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited already; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def superlink_command(port: int, tls: Tls, authenticate_sites: bool) -> list[str]:
    """The SuperLink, on loopback only: the sites reach it through the gate (bouquet_workloads.gate),
    which passes on nothing but the Fleet API. With authenticate_sites (which needs TLS) it
    admits only SuperNodes whose keys were registered (`register_site_keys`).

    Its state is Flower's in-memory one. Kept in SQLite instead (`--database FILE`), every
    request of a round (each site's pulls, each weight object in and out) went through
    SQLAlchemy: about half a core of a two-core machine on a small model's rounds, a second
    and more of each round. Nothing in it outlives a run that Bouquet does not keep itself
    (checkpoints and history are Bouquet's): a restarted server registers the sites' keys
    again, and each site's SuperNode, no longer known to it, ends and is started again by its
    site (bouquet_workloads.site) and joins."""
    command = [
        # Flower's SuperLink, its HTTP middleware applied only where it acts (bouquet_workloads.superlink).
        sys.executable, "-m", "bouquet_workloads.superlink",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--database", FLOWER_IN_MEMORY,
        # The ServerApp is started by Bouquet's own SuperExec (superexec_command), which
        # starts only the job's app.
        "--isolation", "process",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if tls.enabled:
        command += ["--ssl-ca-certfile", _absolute(tls.ca), "--ssl-certfile", _absolute(tls.cert), "--ssl-keyfile", _absolute(tls.key)]
        if authenticate_sites:
            command.append("--enable-supernode-auth")
    else:
        command.append("--insecure")
    return command


def superexec_command(port: int, tls: Tls, app_sha256: str, refusals: Path | None, forks_fd: int | None = None) -> list[str]:
    """The server's SuperExec, which starts the ServerApp of the job's app and of no other
    (bouquet_workloads.superexec), connected to the SuperLink's runtime API on loopback; with
    forks_fd, forked by a local run's fork server (bouquet_workloads.forks)."""
    command = [sys.executable, "-m", "bouquet_workloads.superexec", "--app-sha256", app_sha256]
    if refusals:
        command += ["--refusals", _absolute(refusals)]
    if forks_fd is not None:
        command += ["--forks-fd", str(forks_fd)]
    command += ["--", "--runtime-api-address", f"127.0.0.1:{port}"]
    command += ["--root-certificates", _absolute(tls.ca)] if tls.enabled else ["--insecure"]
    return command


@dataclass(frozen=True)
class SiteIdentity:
    """What a site's SuperNode proves itself and its app with: its private key (None when the
    job disables TLS, and with it SuperNode authentication) and the sha256 of the job's app."""

    app_sha256: str
    key: Path | None = None
    refusals: Path | None = None
    connection_error: Path | None = None  # where the SuperNode leaves why the SuperLink refused it


def client_module(job: Mapping) -> str:
    """The module of the job's ClientApp (the built-in one or the job's own)."""
    return job["spec"].get("app", {}).get("clientApp", CLIENT_APP).partition(":")[0]


def server_module(job: Mapping) -> str:
    """The module of the job's ServerApp (the built-in one or the job's own)."""
    return job["spec"].get("app", {}).get("serverApp", SERVER_APP).partition(":")[0]


def forks_command(
    app_sha256: str, askers: Mapping[int, str], preload: list[str], job: Path | None, baseline_sites: Mapping[str, Path]
) -> list[str]:
    """A local run's fork server (bouquet_workloads.forks), for the askers (fd -> the kind it may
    ask for), with the modules preload imported; with job, it trains the centralized baseline
    on baseline_sites (site -> data file) when asked."""
    command = [sys.executable, "-m", "bouquet_workloads.forks", "--app-sha256", app_sha256, "--parent-pid", str(os.getpid())]
    for fd, kind in askers.items():
        command += ["--asker", f"{kind}:{fd}"]
    for module in preload:
        command += ["--preload", module]
    if job is not None:
        command += [
            "--job",
            _absolute(job),
            "--baseline-sites",
            json.dumps({site: _absolute(path) for site, path in baseline_sites.items()}),
        ]
    return command


def supernode_command(
    server: str,
    site: str,
    data: Path,
    data_format: str | None,
    runtime_port: int,
    ca: Path | None,
    identity: SiteIdentity,
    preload: str | None = None,
    forks_fd: int | None = None,
) -> list[str]:
    """A site's SuperNode, pinned to the job's app (bouquet_workloads.supernode); its warm
    worker imports the module preload (client_module) before the first message comes, or with
    forks_fd is forked by a local run's fork server (bouquet_workloads.forks)."""
    node_config = f'site="{site}" data-path="{_absolute(data)}"'
    if data_format:
        node_config += f' data-format="{data_format}"'
    if identity.refusals:  # the job's ClientApp reports how many runs the site refused
        node_config += f' refusals-path="{_absolute(identity.refusals)}"'
    command = [sys.executable, "-m", "bouquet_workloads.supernode", "--app-sha256", identity.app_sha256]
    if identity.refusals:
        command += ["--refusals", _absolute(identity.refusals)]
    if identity.connection_error:
        command += ["--connection-error", _absolute(identity.connection_error)]
    if preload:
        command += ["--preload", preload]
    if forks_fd is not None:
        command += ["--worker-forks-fd", str(forks_fd)]
    # The SuperNode serves its runtime API on loopback at runtime_port to the site's warm worker.
    command += ["--runtime-port", str(runtime_port), "--", "--superlink", server, "--node-config", node_config]
    command += ["--root-certificates", _absolute(ca)] if ca else ["--insecure"]
    if identity.key:
        command += ["--auth-supernode-private-key", _absolute(identity.key)]
    return command


def app_sha256(job: Mapping) -> str:
    """The sha256 of the app bundle the job's run is submitted with. The bundle is built from
    the job alone and Flower builds it reproducibly (fixed file dates), so the server and
    every site work it out alike from their own copies of the job."""
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="bouquet-app-") as directory:
        return hashlib.sha256(build_fab_from_disk(write_app(Path(directory), job))).hexdigest()


def wait_healthy(port: int, tls: Tls, timeout: float, processes: Processes) -> None:
    """Waits until the SuperLink answers /health."""
    scheme = "https" if tls.enabled else "http"
    context = ssl.create_default_context(cafile=str(tls.ca)) if tls.enabled else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        try:
            with urllib.request.urlopen(f"{scheme}://localhost:{port}/health", timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LaunchError(f"the server did not become healthy on port {port} within {timeout:.0f}s")


class Control:
    """The SuperLink's Control API on loopback, called from this process: what `flwr run`,
    `flwr supernode register` and `flwr ls --run-id` do, with flwr 1.41.0's
    own client and the headers its CLI sends (tests/workloads/test_flower.py), but without a
    `flwr` process for each: a Python start with Flower's CLI imports, seconds on two cores
    (registering three sites' keys and submitting the run took about 11 s of every start)."""

    def __init__(self, port: int, tls: Tls) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self.client = ControlHttpClient.from_server_address(
            f"localhost:{port}",  # the name the server's certificate holds
            insecure=not tls.enabled,
            root_certificates=Path(tls.ca).read_bytes() if tls.enabled else None,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def _call(self, what: str, method: str, request):
        try:
            return getattr(self.client, method)(request)
        except Exception as error:  # Flower raises its own errors, of several kinds, for a refused call
            raise LaunchError(f"the server refused to {what}: {error}") from None

    def register(self, public_key: Path, site: str) -> int:
        """Registers a site's public key (OpenSSH form, an EC key on a NIST curve, as Flower's
        CLI requires) under the site's name; returns the node id it is known by."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

        try:
            key = serialization.load_ssh_public_key(Path(public_key).read_bytes())
        except (ValueError, OSError) as error:
            raise LaunchError(f"site {site}'s public key {public_key} cannot be read: {error}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
            raise LaunchError(f"site {site}'s public key {public_key} is not an EC key on a NIST curve")
        reply = self._call(
            f"register site {site}'s key", "RegisterNode", RegisterNodeRequest(public_key=public_key_to_bytes(key), name=site)
        )
        if not reply.node_id:
            raise LaunchError(f"the server did not register site {site}'s key")
        return int(reply.node_id)

    def start_run(self, app_dir: Path, config: Mapping[str, str]) -> int:
        """Submits a run of the app in app_dir (built into Flower's app bundle, as `flwr run`
        does) with config overriding its run config; returns the run id."""
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        bundle = build_fab_from_disk(Path(app_dir))
        fab = Fab(hashlib.sha256(bundle).hexdigest(), bundle, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(config)), federation="")
        reply = self._call("start the run", "StartRun", request)
        if not reply.HasField("run_id"):
            raise LaunchError("the server did not start the run")
        return int(reply.run_id)

    def run_status(self, run_id: int) -> str:
        """The run's status as Flower reports it ("running", "finished:completed", ...)."""
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            reply = self.client.ListRuns(ListRunsRequest(run_id=run_id))
        except Exception as error:
            raise LaunchError(f"the server did not say how run {run_id} stands: {error}") from None
        if run_id not in reply.run_dict:
            raise LaunchError(f"the server does not know run {run_id}")
        status = reply.run_dict[run_id].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else status.status

    def close(self) -> None:
        self.client.close()


def register_site_keys(public_keys: Mapping[str, Path], control: Control) -> dict[int, dict[str, str]]:
    """Makes the SuperLink (just started: its state is in memory and holds no key) admit the
    keys of public_keys (site -> public key file); returns node id -> {"site", "keySha256"}."""
    return {
        control.register(path, site): {"site": site, "keySha256": hashlib.sha256(path.read_bytes().strip()).hexdigest()}
        for site, path in public_keys.items()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_port_free(port: int, what: str) -> None:
    """Raises LaunchError naming the option when a port is taken."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise LaunchError(f"port {port} is already in use ({what}); choose another") from None


def raise_interrupt(signum, frame) -> None:
    """A SIGTERM handler that stops a foreground command (a site, a local run) as Ctrl-C
    does. In a container the command is the first process, for which SIGTERM has no
    default action."""
    raise KeyboardInterrupt
