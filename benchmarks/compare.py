"""`make bench`: Bouquet next to stock Flower 1.41 on the same jobs, in one run, and prints
the figures side by side.

Stock Flower here is its SuperLink, one SuperNode per site and a ServerApp calling
`FedAvg.start` (benchmarks/stock_flower), with the same model, the same site files, the same
training settings and the same TLS certificates as Bouquet's run of the case; its telemetry
is off, as in Bouquet. Cases:

  a  the breast-cancer example as written (3 sites, a 17 KB model, 10 rounds)
  b  16 sites x a 10 M-parameter model (40 MB), over TLS; beside it, the time TLS over
     loopback takes to move the round's bytes and the time numpy takes to sum the sites'
     updates, both measured in this run
  c  the model of b at 8 sites: the server side's peak memory at 8 sites against 16

Figures per run: the median and p95 round time; the round overhead, that is the median
round minus the round's compute (the slowest site's training alone, or all the sites'
training over the machine's cores where that is longer, measured in this process on the
same files); the bytes a round moves; the peak resident memory (RSS) summed over the
server side's processes and over all of them, sampled every 0.2 s, and the proportional
(PSS) sum of all, in which a page shared by several processes counts once.

    make bench                  # every case
    make bench CASES="a"        # some of them
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "workloads")]

from bouquet.schema import load_valid  # noqa: E402
from bouquet_workloads.flower import descendants, free_port  # noqa: E402

STOCK_APP = ROOT / "benchmarks" / "stock_flower"
EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
# Two hidden layers of 3162: 30 x 3162 + 3162 x 3162 + 3162 x 2 weights and their biases,
# 10.1 M parameters, 40 MB of float32.
LARGE_MODEL = [3162, 3162]
LARGE_ROUNDS = 3
# `make test` before the rounds were made fast: a fresh clone's run at 5d87955 (52:58).
MAKE_TEST_BEFORE = (3178, "5d87955")
MAKE_TEST_RECORD = ROOT / "runs" / "make-test.txt"
RUN_TIMEOUT = 1800


@dataclass
class Figures:
    """One run of one case."""

    rounds: list[float]
    bytes_per_round: int
    server_rss: int
    all_rss: int
    all_pss: int
    wall: float

    def median(self) -> float:
        return statistics.median(self.rounds)

    def p95(self) -> float:
        ordered = sorted(self.rounds)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class Sampler:
    """Peak memory of process trees, sampled every 0.2 s in a thread. server(pid, command)
    says whether a process is on the server's side."""

    roots: Callable[[], set[int]]
    server: Callable[[int, str], bool]
    peak_server_rss: int = 0
    peak_rss: int = 0
    peak_pss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = pss = server_rss = 0
            for pid in self._tree():
                command = _command(pid)
                sizes = _memory(pid)
                server = self.server(pid, command)
                if sizes is None or not command or not _command(pid):
                    # Gone while it was read (a site's process at the run's end): its name and
                    # parents, no longer there, would put it on the server's side.
                    continue
                rss, pss = rss + sizes[0], pss + sizes[1]
                if server:
                    server_rss += sizes[0]
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_server_rss = max(self.peak_server_rss, server_rss)

    def _tree(self) -> set[int]:
        pids = set()
        for root in self.roots():
            pids |= {root, *descendants(root)}
        return pids

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _memory(pid: int) -> tuple[int, int] | None:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        return None
    return rss, pss


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- the cases' jobs -------------------------------------------------------------------------


def example_job() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def large_job(sites: int) -> dict:
    job = example_job()
    job["metadata"]["name"] = f"bench-{sites}-sites"
    spec = job["spec"]
    spec["rounds"] = LARGE_ROUNDS
    spec["task"]["model"] = {"mlp": {"hiddenSizes": LARGE_MODEL}}
    spec["dataset"] = {"name": "breast-cancer", "partitioning": "IID", "testFraction": 0.2}
    spec["sites"] = [{"name": f"site-{i:02d}"} for i in range(1, sites + 1)]
    return job


# --- Bouquet ---------------------------------------------------------------------------------


def run_bouquet(job: dict, work: Path) -> tuple[Figures, Path]:
    """`bouquet run` of job; returns its figures and its output folder (site files, TLS)."""
    work.mkdir(parents=True)
    job_file, out = work / "job.yaml", work / "out"
    job_file.write_text(yaml.safe_dump(job))
    command = [sys.executable, "-m", "bouquet", "run", str(job_file), "--out", str(out), "--metrics-port", str(free_port())]
    with (work / "bouquet-run.log").open("w") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_bouquet_env())

        def server_side(pid: int, command: str) -> bool:
            # The run's own process holds the gate in front of the SuperLink and the server's
            # Control client: the server's side, as in the server's pod. The run's fork server
            # (bouquet_workloads.forks) and what it forked are the sites' side, but for the
            # ServerApp (a server's pod has neither the fork server nor the sites' workers).
            if _name(pid) in ("bouquet-forks", "bouquet-worker", "bouquet-central"):
                return False
            return not any(
                "-m bouquet_workloads.supernode " in _command(p) or "-m bouquet_workloads.worker " in _command(p)
                for p in {pid, *_ancestors(pid)}
            )

        sampler = Sampler(lambda: {process.pid}, server_side)
        try:
            process.wait(timeout=RUN_TIMEOUT)
        finally:
            sampler.stop()
            if process.poll() is None:
                process.terminate()
                process.wait(30)
        wall = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"bouquet run of {job['metadata']['name']} failed (exit {process.returncode}); its output is in {work}")
    history = json.loads((out / "history.json").read_text())
    figures = Figures(
        rounds=[e["durationSeconds"] for e in history],
        bytes_per_round=round(statistics.median(e["bytesSent"] + e["bytesReceived"] for e in history)),
        server_rss=sampler.peak_server_rss,
        all_rss=sampler.peak_rss,
        all_pss=sampler.peak_pss,
        wall=wall,
    )
    return figures, out


def _bouquet_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "workloads")])
    return env


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        found.append(pid)
    return found


# --- stock Flower ----------------------------------------------------------------------------


def run_stock(job: dict, bouquet_out: Path, work: Path) -> Figures:
    """Stock Flower on Bouquet's site files and TLS files of the same job."""
    work.mkdir(parents=True)
    tls, data = bouquet_out / "tls", bouquet_out / "data"
    home, job_file, out_file = work / "flwr-home", work / "job.json", work / "rounds.json"
    job_file.write_text(json.dumps(load_valid(job)))  # the job with its defaults, as Bouquet's apps get it
    port = free_port()
    home.mkdir()
    federation = {"address": f"localhost:{port}", "root-certificates": str(tls / "ca.crt")}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "bench", "bench": federation}}))
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONPATH": str(ROOT / "workloads"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    bin_ = Path(sys.executable).parent
    logs: list = []
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = (work / f"{name}.log").open("w")
        logs.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        processes.append(process)
        return process

    started = time.monotonic()
    superlink = start(
        "superlink",
        [str(bin_ / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
         "--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "tls.crt"), "--ssl-keyfile", str(tls / "tls.key")],
    )  # fmt: skip
    sampler = Sampler(lambda: {p.pid for p in processes}, lambda pid, command: pid == superlink.pid or superlink.pid in _ancestors(pid))
    try:
        _wait_for_port(port, superlink)
        for site in job["spec"]["sites"]:
            name = site["name"]
            start(
                name,
                [str(bin_ / "flower-supernode"), "--superlink", f"localhost:{port}", "--root-certificates", str(tls / "ca.crt"),
                 "--port", str(free_port()), "--node-config", f'site="{name}" data-path="{data / (name + ".csv")}"'],
            )  # fmt: skip
        config = f'job-file="{job_file}" data-dir="{data}" out-file="{out_file}"'
        submitted = subprocess.run(
            [str(bin_ / "flwr"), "run", str(STOCK_APP), "bench", "--run-config", config, "--format", "json"],
            env=env, cwd=work, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if submitted.returncode != 0:
            sys.exit(f"flwr run failed: {submitted.stdout}{submitted.stderr}")
        deadline = time.monotonic() + RUN_TIMEOUT
        while not out_file.exists():
            # The SuperLink says when the ServerApp's process ends, whether it wrote its file or not.
            ended = "Finished task" in (work / "superlink.log").read_text()
            if ended or time.monotonic() > deadline or superlink.poll() is not None:
                time.sleep(1)
                if out_file.exists():
                    break
                sys.exit(f"stock Flower's run of {job['metadata']['name']} did not finish (flwr log shows why); its logs are in {work}")
            time.sleep(0.5)
        wall = time.monotonic() - started
    finally:
        sampler.stop()
        _stop(processes)
        for log in logs:
            log.close()
    rounds = json.loads(out_file.read_text())["rounds"]
    spec = load_valid(job)["spec"]
    model_bytes = _model_bytes(job)
    evaluated = round(len(spec["sites"]) * float(spec["strategy"]["fractionEvaluate"]))
    return Figures(
        rounds=[r["ended"] - r["began"] for r in rounds],
        # Each site gets the model and sends it back; the evaluated sites get it once more.
        bytes_per_round=model_bytes * (2 * len(spec["sites"]) + evaluated),
        server_rss=sampler.peak_server_rss,
        all_rss=sampler.peak_rss,
        all_pss=sampler.peak_pss,
        wall=wall,
    )


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"stock Flower's SuperLink did not open port {port}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stops every process started and whatever they started."""
    everything = {p.pid for p in processes}
    for process in processes:
        everything |= descendants(process.pid)
    for pid in everything:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in everything):
        time.sleep(0.1)
    for pid in everything:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        process.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- bounds ----------------------------------------------------------------------------------


def _model_bytes(job: dict) -> int:
    from bouquet_workloads import datasets
    from bouquet_workloads.task import build_model

    spec = load_valid(job)["spec"]
    model = build_model(spec["task"], len(datasets.describe(spec["dataset"]["name"])[0]), spec["seed"])
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def compute_seconds(job: dict, data: Path) -> tuple[float, float]:
    """(the slowest site's training alone, all the sites' training together), each the median
    of three, on the sites' files as their processes read them."""
    import torch

    job = load_valid(job)
    from bouquet_workloads.tables import read_task_table, split_rows
    from bouquet_workloads.task import build_model, site_seed, train

    spec = job["spec"]
    times = []
    for site in spec["sites"]:
        table = read_task_table(data / f"{site['name']}.csv", spec["task"])
        kept, _ = split_rows(len(table), spec["task"]["training"]["validationFraction"], site_seed(spec["seed"], site["name"]))
        rows = table.subset(kept)
        model = build_model(spec["task"], rows.features.shape[1], spec["seed"])
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            train(model, rows, spec["task"]["training"], seed=1, device=torch.device("cpu"))
            runs.append(time.perf_counter() - began)
        times.append(statistics.median(runs))
    return max(times), sum(times)


def _receive(port_queue, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        connection, _ = server.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            while tls.recv(1 << 20):
                pass


def tls_bytes_per_second(tls: Path, total: int = 1 << 30) -> float:
    """Loopback throughput of one TLS connection between two processes (Python's ssl, the
    job's certificates), sending total bytes."""
    spawn = multiprocessing.get_context("spawn")
    ports = spawn.Queue()
    receiver = spawn.Process(target=_receive, args=(ports, str(tls / "tls.crt"), str(tls / "tls.key")))
    receiver.start()
    port = ports.get(timeout=60)
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    chunk = os.urandom(1 << 22)
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname="localhost") as connection:
        began = time.perf_counter()
        sent = 0
        while sent < total:
            connection.sendall(chunk)
            sent += len(chunk)
        connection.shutdown(socket.SHUT_WR)  # the receiver reads to the end, then ends
        receiver.join(120)
        seconds = time.perf_counter() - began
    return sent / seconds


def aggregation_seconds(model_bytes: int, sites: int) -> float:
    """Median of three weighted sums of sites float32 arrays of model_bytes each, in place (the
    memory traffic a FedAvg of that round cannot avoid)."""
    import numpy as np

    n = model_bytes // 4
    updates = [np.random.default_rng(i).random(n, dtype=np.float32) for i in range(sites)]
    total, scaled = np.zeros(n, np.float32), np.empty(n, np.float32)
    runs = []
    for _ in range(3):
        began = time.perf_counter()
        total.fill(0)
        for i, update in enumerate(updates):
            np.multiply(update, np.float32(1 + i), out=scaled)
            total += scaled
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


# --- printing --------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def print_case(title: str, bouquet: Figures, stock: Figures, compute: float) -> None:
    rows = [
        ("round time, median", _seconds(bouquet.median()), _seconds(stock.median())),
        (f"round time, p95 of {len(bouquet.rounds)}", _seconds(bouquet.p95()), _seconds(stock.p95())),
        ("round overhead, median", _seconds(bouquet.median() - compute), _seconds(stock.median() - compute)),
        ("bytes per round", f"{bouquet.bytes_per_round / 1e6:,.2f} MB", f"{stock.bytes_per_round / 1e6:,.2f} MB"),
        ("peak RSS, server side", _mib(bouquet.server_rss), _mib(stock.server_rss)),
        ("peak RSS, all processes", _mib(bouquet.all_rss), _mib(stock.all_rss)),
        ("peak PSS, all processes", _mib(bouquet.all_pss), _mib(stock.all_pss)),
        ("wall time of the run", _seconds(bouquet.wall), _seconds(stock.wall)),
    ]
    print(f"\n{title}")
    print(f"  {'':28}{'Bouquet':>14}{'stock Flower':>16}")
    for name, ours, theirs in rows:
        print(f"  {name:28}{ours:>14}{theirs:>16}")
    print(f"  compute of a round {_seconds(compute)}; stock Flower's median round is {stock.median() / bouquet.median():.1f} x Bouquet's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="abc", help="which cases to run (letters), default all")
    cases = set(parser.parse_args().cases.replace(",", "").replace(" ", ""))
    if not cases <= set("abc"):
        sys.exit(f"--cases: unknown case(s) {''.join(sorted(cases - set('abc')))}; the cases are a, b and c")
    cores = os.cpu_count() or 1
    print(f"Bouquet vs stock Flower 1.41 on this machine ({cores} cores); TLS on in every run")
    # Kept when a run fails (the message names it), removed otherwise.
    work = Path(tempfile.mkdtemp(prefix="bouquet-bench-"))
    if "a" in cases:
        job = example_job()
        ours, out = run_bouquet(job, work / "a-bouquet")
        theirs = run_stock(job, out, work / "a-stock")
        alone, together = compute_seconds(job, out / "data")
        print_case(
            f"(a) the breast-cancer example: {len(job['spec']['sites'])} sites, {_model_bytes(job) / 1e3:.0f} KB model, {job['spec']['rounds']} rounds",
            ours, theirs, max(alone, together / cores),
        )  # fmt: skip
    large: dict[int, tuple[Figures, Figures]] = {}
    for case, sites in (("b", 16), ("c", 8)):
        if case in cases or (case == "b" and "c" in cases):
            job = large_job(sites)
            ours, out = run_bouquet(job, work / f"{sites}-bouquet")
            theirs = run_stock(job, out, work / f"{sites}-stock")
            large[sites] = (ours, theirs)
            if sites == 16:
                alone, together = compute_seconds(job, out / "data")
                compute = max(alone, together / cores)
                model_bytes = _model_bytes(job)
                round_bytes = 2 * sites * model_bytes
                tls_bound = round_bytes / tls_bytes_per_second(out / "tls")
                numpy_bound = aggregation_seconds(model_bytes, sites)
                print_case(f"(b) {sites} sites x a {model_bytes / 1e6:.0f} MB model, {LARGE_ROUNDS} rounds", ours, theirs, compute)
                print(
                    f"  TLS transfer bound of the round's {round_bytes / 1e9:.2f} GB: {_seconds(tls_bound)}; Bouquet's median round is {ours.median() / tls_bound:.1f} x it"
                )
                print(f"  numpy bound of the aggregation (memory bandwidth): {_seconds(numpy_bound)}")
    if "c" in cases:
        (b16, s16), (b8, s8) = large[16], large[8]
        print("\n(c) server side's peak RSS, 8 sites vs 16 (the model of b)")
        print(f"  {'':28}{'Bouquet':>14}{'stock Flower':>16}")
        print(f"  {'8 sites':28}{_mib(b8.server_rss):>14}{_mib(s8.server_rss):>16}")
        print(f"  {'16 sites':28}{_mib(b16.server_rss):>14}{_mib(s16.server_rss):>16}")
        print(f"  {'16 over 8':28}{b16.server_rss / b8.server_rss:>14.2f}{s16.server_rss / s8.server_rss:>16.2f}")
    shutil.rmtree(work)
    print()
    before, commit = MAKE_TEST_BEFORE
    print(f"make test, before the rounds were made fast: {before // 60}:{before % 60:02d} ({commit})")
    if MAKE_TEST_RECORD.exists():
        seconds, commit, when = MAKE_TEST_RECORD.read_text().split()
        print(f"make test, its last passing run in this checkout: {int(seconds) // 60}:{int(seconds) % 60:02d} ({commit}, {when})")
    else:
        print("make test, in this checkout: no passing run recorded yet (make test records it in runs/make-test.txt)")


if __name__ == "__main__":
    main()
