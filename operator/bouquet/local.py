"""`bouquet run`: a job trained for real on this machine, without a cluster.

The server (SuperLink and ServerApp) and one SuperNode per site run as local processes,
talking over TLS on loopback with a CA made for the run. Each site process is handed one
data file, its own. The parent process shows progress, serves the job's Prometheus
metrics, and on success or failure stops every process it started.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bouquet_workloads import baseline, datasets, metrics, outputs, report
from bouquet_workloads.task import write_csv

from . import flower, jobfile, tls
from .schema import InvalidJob, Violation
from .server import Server, clock

BASELINE = "baseline.json"
REPORT = "report.png"


@dataclass
class Paths:
    """Where a local run keeps things, under its output directory."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def tls(self) -> Path:
        return self.out / "tls"

    @property
    def job(self) -> Path:
        return self.out / "job.json"


def run(job_path: Path, out: Path | None, metrics_port: int, say: Callable[[str], None] = print) -> dict:
    """Trains the job to completion and returns its model.json ({} for a job's own app,
    whose outputs are its own business). Raises InvalidJob for a bad
    job (before anything starts), flower.LaunchError, RunFailed or DataError otherwise."""
    job = jobfile.load(job_path)
    site_files = jobfile.check_local(job, job_path)
    name = job["metadata"]["name"]
    paths = Paths(out or Path("runs") / name)
    _check_same_job(paths, job)
    flower.ensure_port_free(metrics_port, "--metrics-port")

    paths.out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(paths.job, job)
    site_files.update(write_builtin_shares(job, paths.data))
    tls_files = _make_tls(job, paths.tls)
    processes = flower.Processes(paths.logs, flower.process_env([job_path.parent.resolve()]))
    metrics_server, _ = metrics.serve(paths.out, "local", name, metrics_port)
    started = time.monotonic()
    stop_on_sigterm = signal.signal(signal.SIGTERM, flower.raise_interrupt)
    try:
        say(f"job {name}: {len(job['spec']['sites'])} sites, {job['spec']['rounds']} rounds of {job['spec']['strategy']['name']}; "
            f"output in {paths.out}, metrics on http://127.0.0.1:{metrics_port}/metrics")  # fmt: skip
        server = Server(job, paths.out, tls_files, processes)
        server.start()
        for site in job["spec"]["sites"]:
            command = flower.supernode_command(
                server.address,
                site["name"],
                site_files[site["name"]],
                site.get("data", {}).get("format"),
                flower.free_port(),
                tls_files.ca,
            )
            processes.start(f"site-{site['name']}", command)
        server.submit()
        say(f"server up on {server.address} (TLS: {'on' if tls_files.enabled else 'off'}); {len(job['spec']['sites'])} sites started; "
            "the sites share feature statistics, then round 1 begins")  # fmt: skip
        server.follow(say, started)
    finally:
        processes.stop()
        metrics_server.shutdown()
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    if "app" in job["spec"]:
        say(f"done in {clock(time.monotonic() - started)}: the job's own app finished; its output is in {paths.out}")
        return {}
    model = outputs.read_json(paths.out / outputs.MODEL_INFO)
    reference = _compare_with_baseline(job, paths, site_files, model, say)
    report.plot(paths.out / REPORT, job, outputs.read_json(paths.out / outputs.HISTORY), reference)
    say(f"done in {clock(time.monotonic() - started)}: {paths.out / outputs.MODEL} (sha256 {model['sha256'][:16]}...)")
    return model


def _check_same_job(paths: Paths, job: dict) -> None:
    """A run resumes only the same job: a different spec in the same folder is refused
    rather than mixing two trainings' checkpoints (only `rounds` may grow)."""
    previous = outputs.read_json(paths.job)
    if previous is None:
        return
    before = {**previous["spec"], "rounds": None}
    now = {**job["spec"], "rounds": None}
    if before != now or previous["metadata"]["name"] != job["metadata"]["name"]:
        raise InvalidJob(
            [Violation("spec", f"{paths.out} holds a run of a different job spec; choose another --out or remove that folder")]
        )


def write_builtin_shares(job: dict, directory: Path, only: str | None = None) -> dict[str, Path]:
    """Writes each data-less site's share of the built-in dataset (or only the named
    site's) to a file of its own, <site>.csv."""
    spec = job["spec"]
    takers = [s["name"] for s in spec["sites"] if "data" not in s and only in (None, s["name"])]
    if not takers:
        return {}
    split = datasets.split(spec["dataset"], [s["name"] for s in spec["sites"]], spec["seed"])
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for site in takers:
        files[site] = directory / f"{site}.csv"
        write_csv(files[site], split.sites[site], split.features, split.label)
    return files


def _make_tls(job: dict, directory: Path) -> flower.Tls:
    if job["spec"]["security"]["tls"]["mode"] == "Disabled":
        return flower.Tls()
    files = tls.issue(job["metadata"]["name"], ["localhost", "127.0.0.1"]).write(directory)
    return flower.Tls(files["ca.crt"], files["tls.crt"], files["tls.key"])


def _compare_with_baseline(job: dict, paths: Paths, site_files: dict[str, Path], model: dict, say: Callable[[str], None]) -> dict:
    """Trains the same model on the pooled training data (possible only because every
    site's data is on this machine), prints it beside the federated result and keeps it
    in baseline.json."""
    result = baseline.centralized(job, site_files)
    outputs.write_json(paths.out / BASELINE, result)
    federated = model["metrics"]
    say(f"evaluated on the {result['evaluatedOn']}:")
    for key in ("accuracy", "auroc", "loss"):
        if key in federated and key in result:
            say(f"  {key:<9} federated {federated[key]:.4f}   centralized baseline {result[key]:.4f}")
    return result
