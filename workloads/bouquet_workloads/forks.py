"""A local run's fork server: torch and the job's app imported once, for every process that needs them.

In `bouquet run` each site's warm worker, the ServerApp and the centralized baseline would each
import torch and the job's app for itself: about 500 MB private to each process and about 2
CPU-s each, all at the same time on a small machine. The fork server imports them once, and
those processes are forked from it: they start at once and share its memory copy-on-write.

Who may ask: `bouquet run` makes one socket pair per asker (each site's SuperNode, the server's
SuperExec, itself) and hands the fork server the other ends, each with the one kind of process
its asker may ask for (--asker KIND:FD). The sockets have no name on any filesystem or network:
no other process can reach the fork server. A request is one datagram of JSON with file
descriptors attached; the kernel adds the asker's pid, which the fork server trusts over
anything the request says. What a process runs is the fork server's own arguments (the app's
pin, the job's file and the site files of the baseline); a request gives only where the process
writes and whom it talks to, and one that is not exactly that forks nothing and is answered
with the reason.

    worker     {"kind": "worker", "runtimeApiAddress": "127.0.0.1:PORT", "refusals": PATH | null}
               with 4 fds: the worker's tasks and replies pipes (bouquet_workloads.wakes), stdout, stderr.
               It ends with its SuperNode (the asker).
    serverapp  {"kind": "serverapp", "args": [flwr-serverapp's arguments], "env": {NAME: VALUE}}
               with 2 fds: stdout, stderr. Only the variables in SERVERAPP_ENV may be set.
    baseline   {"kind": "baseline", "result": PATH} with 2 fds: stdout, stderr. The centralized
               baseline of --job on --baseline-sites, its result written to PATH as JSON.

Answers: {"pid": N} once forked, {"error": "..."} when refused, and later {"pid": N, "exit": CODE}
when the process ended. An asker has at most one process at a time. The fork server ends with
`bouquet run` (--parent-pid), and its processes with it.

    python -m bouquet_workloads.forks --app-sha256 HEX --parent-pid PID --asker KIND:FD... [--preload MODULE...]
        [--job FILE --baseline-sites JSON]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import importlib
import json
import logging
import os
import re
import selectors
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import wakes

log = logging.getLogger("bouquet_workloads.forks")

KINDS = {"worker": 4, "serverapp": 2, "baseline": 2}  # kind -> how many fds come with a request
SERVERAPP_ENV = frozenset({wakes.NOTICE_PORT_VARIABLE})  # what a ServerApp reads of its environment
# What ps shows of a forked process (its command line is the fork server's): 15 bytes at most.
NAMES = {"worker": b"bouquet-worker", "serverapp": b"flwr-serverapp", "baseline": b"bouquet-central"}
MAX_REQUEST = 64 * 1024
_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid
_LOOPBACK = re.compile(r"127\.0\.0\.1:([0-9]{1,5})")


class ForkError(RuntimeError):
    """The fork server did not start the process: refused (why), or not there any more."""


class Refused(ValueError):
    """A request the fork server does not carry out, and why."""


# --- the asker's side ------------------------------------------------------------------------


class Asker:
    """One asker's end of its socket pair with the fork server: one process at a time."""

    def __init__(self, fd: int) -> None:
        self.socket = socket.socket(fileno=fd)

    def start(self, request: Mapping, fds: Sequence[int]) -> int:
        """Asks for a process; returns its pid. Raises ForkError when the fork server refuses
        or is gone (the asker may then start the process itself)."""
        try:
            socket.send_fds(self.socket, [json.dumps(request).encode()], list(fds))
            answer = self._answer()
            while "exit" in answer:  # the end of an earlier process nobody waited for
                answer = self._answer()
        except OSError as error:
            raise ForkError(f"the fork server cannot be reached ({error})") from None
        if "error" in answer:
            raise ForkError(answer["error"])
        return int(answer["pid"])

    def wait(self) -> int:
        """Waits for the end of the process started last; returns its exit code (negative: the
        signal that ended it). Raises ForkError if the fork server ended first."""
        try:
            answer = self._answer()
        except OSError as error:
            raise ForkError(f"the fork server cannot be reached ({error})") from None
        if "exit" not in answer:
            raise ForkError(f"the fork server answered {answer!r} where an exit was due")
        return int(answer["exit"])

    def _answer(self) -> dict:
        data = self.socket.recv(MAX_REQUEST)
        if not data:
            raise ForkError("the fork server has ended")
        return json.loads(data)

    def close(self) -> None:
        self.socket.close()


def pair() -> tuple[socket.socket, socket.socket]:
    """A socket pair for one asker: (the fork server's end, the asker's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# --- the fork server -------------------------------------------------------------------------


@dataclass
class Settings:
    """What the fork server's processes run: its own arguments, never an asker's."""

    app_sha256: str
    job: Path | None = None
    baseline_sites: dict[str, str] = field(default_factory=dict)


@dataclass
class _Child:
    pid: int
    pidfd: int
    asker: socket.socket


class ForkServer:
    def __init__(self, askers: Mapping[socket.socket, str], parent_pid: int, settings: Settings) -> None:
        self.askers = dict(askers)  # socket -> the one kind it may ask for
        self.settings = settings
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}  # pidfd -> child
        self.busy: set[socket.socket] = set()
        for asker in self.askers:
            asker.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.selector.register(asker, selectors.EVENT_READ, "asker")
        self.parent = os.pidfd_open(parent_pid)
        self.selector.register(self.parent, selectors.EVENT_READ, "parent")

    def serve(self) -> None:
        """Answers requests until the parent ends; then ends its processes."""
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.data == "parent":
                        return
                    if key.data == "asker":
                        self._take(key.fileobj)
                    else:
                        self._reap(key.data)
        finally:
            for child in self.children.values():
                _kill(child.pid)

    def _take(self, asker: socket.socket) -> None:
        fds: list[int] = []
        try:
            data, ancillary, flags, _ = asker.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(8 * 4) + socket.CMSG_SPACE(_CREDENTIALS.size))
        except OSError:
            data, ancillary, flags = b"", [], 0
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
        if not data and not fds:  # the asker has ended
            self.selector.unregister(asker)
            del self.askers[asker]
            asker.close()
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise Refused(f"a request is one datagram of at most {MAX_REQUEST} bytes with at most 8 file descriptors")
            request = _parse(data, fds, self.askers[asker])
            if asker in self.busy:
                raise Refused("a process this asker asked for still runs: one at a time")
            if pid is None:
                raise Refused("the request came without the asker's credentials")
            try:
                child = os.fork()
            except OSError as error:  # no process to be had (EAGAIN, ENOMEM): the asker starts its own, or says so
                raise Refused(f"could not fork: {error}") from None
            if child == 0:
                self._become(request, fds, pid)  # never returns
            try:
                pidfd = os.pidfd_open(child)
            except OSError as error:  # (out of descriptors) a process it cannot follow is not left running
                _kill(child)
                os.waitpid(child, 0)
                raise Refused(f"could not follow the forked process: {error}") from None
            self.children[pidfd] = _Child(child, pidfd, asker)
            self.selector.register(pidfd, selectors.EVENT_READ, pidfd)
            self.busy.add(asker)
            _send(asker, {"pid": child})
            log.info("forked %s %d for pid %d", request["kind"], child, pid)
        except Refused as refusal:
            log.warning("refused a request of pid %s: %s", pid, refusal)
            _send(asker, {"error": str(refusal)})
        finally:
            for fd in fds:
                os.close(fd)

    def _reap(self, pidfd: int) -> None:
        child = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(child.pid, 0)
        self.busy.discard(child.asker)
        if child.asker in self.askers:
            _send(child.asker, {"pid": child.pid, "exit": os.waitstatus_to_exitcode(status)})

    def _become(self, request: dict, fds: list[int], asker_pid: int) -> None:
        """In the child: drops the fork server's sockets, takes the request's fds as its own,
        and runs what was asked for; exits with its code."""
        code = 1
        try:
            self.selector.close()
            for asker in self.askers:
                asker.close()
            for pidfd in [self.parent, *self.children]:
                os.close(pidfd)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            logging.getLogger().handlers.clear()  # the process sets up its own logging
            name_process(NAMES[request["kind"]])
            *kept, out, err = fds
            os.dup2(out, 1)
            os.dup2(err, 2)
            code = RUNS[request["kind"]](request, kept, asker_pid, self.settings)
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else (0 if ended.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code or 0)


def _parse(data: bytes, fds: list[int], allowed: str) -> dict:
    """The request in data, checked field by field; raises Refused naming what is wrong."""
    try:
        request = json.loads(data)
    except ValueError:
        raise Refused("a request is a JSON object") from None
    if not isinstance(request, dict):
        raise Refused("a request is a JSON object")
    kind = request.get("kind")
    if kind != allowed:
        raise Refused(f"kind {kind!r}: this asker may ask for {allowed!r} only")
    if len(fds) != KINDS[kind]:
        raise Refused(f"kind {kind!r} takes {KINDS[kind]} file descriptors, not {len(fds)}")
    expected = {"worker": {"kind", "runtimeApiAddress", "refusals"}, "serverapp": {"kind", "args", "env"}, "baseline": {"kind", "result"}}[
        kind
    ]
    if set(request) != expected:
        raise Refused(f"kind {kind!r} takes the fields {sorted(expected)}, not {sorted(request)}")
    if kind == "worker":
        found = _LOOPBACK.fullmatch(str(request["runtimeApiAddress"]))
        if not isinstance(request["runtimeApiAddress"], str) or not found or not 0 < int(found.group(1)) < 65536:
            raise Refused("runtimeApiAddress must be 127.0.0.1:PORT (the SuperNode's runtime API, on loopback)")
        if request["refusals"] is not None and not _is_path(request["refusals"]):
            raise Refused("refusals must be null or an absolute path")
    elif kind == "serverapp":
        args = request["args"]
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 32:
            raise Refused("args must be a list of at most 32 strings (flwr-serverapp's arguments)")
        env = request["env"]
        if not isinstance(env, dict) or not set(env) <= SERVERAPP_ENV or not all(isinstance(v, str) for v in env.values()):
            raise Refused(f"env may set only {sorted(SERVERAPP_ENV)}, to strings")
    elif not _is_path(request["result"]):
        raise Refused("result must be an absolute path")
    return request


def _is_path(value) -> bool:
    return isinstance(value, str) and value.startswith("/") and "\0" not in value and len(value) < 4096


def _send(asker: socket.socket, answer: dict) -> None:
    try:
        asker.send(json.dumps(answer).encode())
    except OSError:
        pass  # the asker has ended: nobody to tell


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def name_process(name: bytes) -> None:
    """Names this process (what ps -o comm and /proc/PID/comm show, 15 bytes at most)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


# --- what a forked process runs ----------------------------------------------------------------


def _run_worker(request: dict, fds: list[int], asker_pid: int, settings: Settings) -> int:
    from . import worker

    tasks, replies = fds
    argv = ["--app-sha256", settings.app_sha256, "--runtime-api-address", request["runtimeApiAddress"]]
    argv += ["--parent-pid", str(asker_pid), "--tasks-fd", str(tasks), "--replies-fd", str(replies)]
    argv += ["--refusals", request["refusals"]] if request["refusals"] else []
    sys.argv = ["bouquet_workloads.worker", *argv]  # what a traceback and a process's audit see
    return worker.main(argv)


def _run_serverapp(request: dict, fds: list[int], asker_pid: int, settings: Settings) -> int:
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    os.environ.update(request["env"])
    sys.argv = ["flwr-serverapp", *request["args"]]
    flwr_serverapp()
    return 0


def _run_baseline(request: dict, fds: list[int], asker_pid: int, settings: Settings) -> int:
    from . import baseline, outputs

    if settings.job is None:
        print("the fork server was started without --job: it has no baseline to train", file=sys.stderr)
        return 2
    sys.argv = ["bouquet_workloads.baseline", "--parent-pid", str(asker_pid)]
    job = json.loads(settings.job.read_text())
    result = baseline.centralized(job, {site: Path(path) for site, path in settings.baseline_sites.items()})
    outputs.write_json(Path(request["result"]), result)
    return 0


RUNS: dict[str, Callable[[dict, list[int], int, Settings], int]] = {
    "worker": _run_worker,
    "serverapp": _run_serverapp,
    "baseline": _run_baseline,
}


def preload(modules: Sequence[str]) -> None:
    """Imports what the forked processes will: a module that fails to import is left to fail
    in the process that needs it, where its error is reported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            log.warning("could not import %s ahead of the processes that use it: %s", module, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bouquet_workloads.forks", description=__doc__.splitlines()[0])
    parser.add_argument("--app-sha256", required=True, help="sha256 of the job's app bundle: the only app a worker runs")
    parser.add_argument("--parent-pid", type=int, required=True, help="end (and end every process forked) when this process ends")
    parser.add_argument("--asker", action="append", default=[], metavar="KIND:FD", help="a socket an asker holds the other end of")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE", help="imported before the first request")
    parser.add_argument("--job", type=Path, help="the job (JSON) whose centralized baseline a baseline process trains")
    parser.add_argument("--baseline-sites", type=json.loads, default={}, help="JSON: site -> data file the baseline trains on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    askers = {}
    for entry in args.asker:
        kind, _, fd = entry.partition(":")
        if kind not in KINDS or not fd.isdigit():
            parser.error(f"--asker {entry}: KIND:FD with KIND one of {', '.join(KINDS)}")
        askers[socket.socket(fileno=int(fd))] = kind
    try:
        server = ForkServer(askers, args.parent_pid, Settings(args.app_sha256, args.job, args.baseline_sites))
    except ProcessLookupError:
        return 0  # the parent has ended already
    preload(args.preload)
    name_process(b"bouquet-forks")
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
