"""`bouquet run`: a job trained for real on this machine, without a cluster.

The server (SuperLink and ServerApp) and one SuperNode per site run as local processes,
talking over TLS on loopback with a CA made for the run. Each site process is handed one
data file, its own. The parent process shows progress, serves the job's Prometheus
metrics, and on success or failure stops every process it started.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from bouquet import identity, jobfile, tls
from bouquet.schema import InvalidJob, Violation

from . import datasets, flower, forks, metrics, outputs
from .roster import min_sites_to_start, resume_problem, rule
from .server import RunFailed, Server, clock
from .tables import DataError, read_task_table, write_csv

BASELINE = "baseline.json"
HELD_OUT = "held-out.csv"
FORK_SERVER = "fork-server"  # its log: logs/fork-server.log


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
    def keys(self) -> Path:
        return self.out / "keys"

    @property
    def job(self) -> Path:
        return self.out / "job.json"


class CannotStart(RuntimeError):
    """The run would not give the model the job asks for: nothing was started or written."""


def run(job_path: Path, out: Path | None, metrics_port: int, say: Callable[[str], None] = print) -> dict:
    """Trains the job to completion and returns its model.json ({} for a job's own app,
    whose outputs are its own business). Raises InvalidJob for a bad job and CannotStart for
    a site's bad data or a run that may not resume (both before anything starts);
    flower.LaunchError or RunFailed otherwise."""
    job = jobfile.load(job_path)
    site_files = jobfile.check_local(job, job_path)
    name = job["metadata"]["name"]
    paths = Paths(out or Path("runs") / name)
    _check_same_job(paths, job)
    history = outputs.read_json(paths.out / outputs.HISTORY, []) or []
    if "task" in job["spec"]:
        _check_resumable(job, history, paths)
        refused = _check_site_data(job, site_files, say)
    else:
        refused = set()
    flower.ensure_port_free(metrics_port, "--metrics-port")

    paths.out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(paths.job, job)
    site_files.update(write_builtin_shares(job, paths.data, held_out=True))
    tls_files = _make_tls(job, paths.tls)
    site_keys = _make_site_keys(job, paths.keys) if tls_files.enabled else {}
    app_sha256 = flower.app_sha256(job)
    processes = flower.Processes(paths.logs, flower.process_env([job_path.parent.resolve()]))
    metrics_server, _ = metrics.serve(paths.out, "local", name, metrics_port)
    started = time.monotonic()
    stop_on_sigterm = signal.signal(signal.SIGTERM, flower.raise_interrupt)
    server = None
    trained = {site: path for site, path in site_files.items() if site not in refused}
    gate_log = _log_to_file("bouquet_workloads.gate", paths.logs / "gate.log")
    askers: dict[str, socket.socket] = {}  # asker -> its end of its socket with the fork server
    followed = False
    try:
        say(f"job {name}: {len(job['spec']['sites'])} sites, {job['spec']['rounds']} rounds of {job['spec']['strategy']['name']}; "
            f"output in {paths.out}, metrics on http://127.0.0.1:{metrics_port}/metrics")  # fmt: skip
        askers = _start_fork_server(job, paths, processes, app_sha256, trained)
        server = Server(
            job,
            paths.out,
            tls_files,
            processes,
            public_keys={site: public for site, (_, public) in site_keys.items()},
            forks_fd=askers["superexec"].fileno(),
        )
        server.start()
        askers.pop("superexec").close()
        for site in job["spec"]["sites"]:
            forks_end = askers.pop(f"site-{site['name']}")
            identity = flower.SiteIdentity(
                app_sha256, site_keys[site["name"]][0] if site_keys else None, paths.logs / f"site-{site['name']}-refused.json"
            )
            command = flower.supernode_command(
                server.address,
                site["name"],
                site_files[site["name"]],
                site.get("data", {}).get("format"),
                flower.free_port(),
                tls_files.ca,
                identity,
                preload=flower.client_module(job),
                forks_fd=forks_end.fileno(),
            )
            try:
                processes.start(f"site-{site['name']}", command, pass_fds=[forks_end.fileno()])
            finally:
                forks_end.close()
        server.submit()
        say(f"server up on {server.address} (TLS: {'on' if tls_files.enabled else 'off'}); {len(job['spec']['sites'])} sites started; "
            f"each checks its data, then round {len(history) + 1} begins")  # fmt: skip
        sites = [name for name in processes.running if name.startswith("site-")]
        baseline_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bouquet-baseline")
        reference: list[concurrent.futures.Future] = []

        def train_baseline() -> None:
            if "task" in job["spec"] and not reference:
                reference.append(baseline_thread.submit(_baseline, job, trained, paths, askers.pop("baseline", None)))

        def ended(verdict: str) -> None:
            # The sites were told the run is over before the ServerApp reported its end: they
            # stop while Flower ends the run, and the centralized baseline trains meanwhile.
            processes.terminate(sites)
            if verdict == "Succeeded":
                train_baseline()

        server.follow(say, started, ended=ended)
        train_baseline()
        followed = True
    finally:
        # The sites first, while the server still answers their goodbye (a SuperNode whose
        # server is gone retries it for seconds), then the gate and the Control client, whose
        # connections a SuperLink told to stop would wait for, then the server's processes
        # and, once the baseline it forked has finished, the fork server.
        processes.stop([name for name in processes.running if name.startswith("site-")])
        if server is not None:
            server.stop()
        if followed:
            concurrent.futures.wait(reference)
        processes.stop()
        for asker in askers.values():
            asker.close()
        metrics_server.shutdown()
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        gate_log()
    if "app" in job["spec"]:
        say(f"done in {clock(time.monotonic() - started)}: the job's own app finished; its output is in {paths.out}")
        return {}
    model = outputs.read_json(paths.out / outputs.MODEL_INFO)
    baseline = _compare_with_baseline(paths, reference[0].result(), model, say)
    from . import report  # matplotlib, needed only now

    report.plot(paths.out / outputs.REPORT, job, outputs.read_json(paths.out / outputs.HISTORY), baseline)
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


def _check_resumable(job: dict, history: list[dict], paths: Paths) -> None:
    problem = resume_problem(job["spec"], history)
    if problem:
        raise CannotStart(
            f"{paths.out} cannot be continued: {problem}; start again from round 1 with another --out (or remove {paths.out}), "
            "or lower strategy.minSites"
        )


def _check_site_data(job: dict, site_files: dict[str, Path], say: Callable[[str], None]) -> set[str]:
    """Checks each site's own data file as the site will, before anything starts (the
    built-in dataset's shares are Bouquet's own). Raises CannotStart, naming each site, the
    column, the row and the value at fault, unless strategy.minSitesToStart lets the run
    start without those sites; returns the sites it starts without."""
    spec = job["spec"]
    problems = {}
    for site in spec["sites"]:
        if "data" in site:
            try:
                read_task_table(site_files[site["name"]], spec["task"], site["data"].get("format"))
            except DataError as error:
                problems[site["name"]] = f"site {site['name']}: {error}"
    if not problems:
        return set()
    needed = min_sites_to_start(spec)
    passed = len(spec["sites"]) - len(problems)
    if passed < needed:
        summary = f"the run cannot start: {passed} of {len(spec['sites'])} sites have data they can train on, and {rule(spec, 'minSitesToStart', needed)}:"
        raise CannotStart("\n  ".join([summary, *problems.values()]))
    for problem in problems.values():
        say(f"warning: {problem}; the run goes ahead without this site ({rule(spec, 'minSitesToStart', needed)})")
    return set(problems)


def write_builtin_shares(job: dict, directory: Path, sites: Collection[str] | None = None, held_out: bool = False) -> dict[str, Path]:
    """Writes each data-less site's share of the built-in dataset (or those of the sites
    named) to a file of its own, <site>.csv, and with held_out the test split that no site
    trains on to held-out.csv. Labels are written as task.classNames when the job names them."""
    spec = job["spec"]
    takers = [s["name"] for s in spec["sites"] if "data" not in s and (sites is None or s["name"] in sites)]
    if not takers and not (held_out and "dataset" in spec):
        return {}
    split = datasets.split(spec["dataset"], [s["name"] for s in spec["sites"]], spec["seed"])
    names = spec["task"].get("classNames") if "task" in spec else None
    files = {}
    for site in takers:
        files[site] = directory / f"{site}.csv"
        write_csv(files[site], split.sites[site], split.features, split.label, names)
    if held_out:
        write_csv(directory / HELD_OUT, split.test, split.features, split.label, names)
    return files


def _make_tls(job: dict, directory: Path) -> flower.Tls:
    if job["spec"]["security"]["tls"]["mode"] == "Disabled":
        return flower.Tls()
    files = tls.issue(job["metadata"]["name"], ["localhost", "127.0.0.1"]).write(directory)
    return flower.Tls(files["ca.crt"], files["tls.crt"], files["tls.key"])


def _log_to_file(name: str, path: Path) -> Callable[[], None]:
    """Sends a logger of this process to a file of the run's logs instead of the terminal;
    returns what undoes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger, handler = logging.getLogger(name), logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate, level = False, logger.level
    logger.setLevel(logging.INFO)  # the file is the run's own record: what it says in passing too

    def undo() -> None:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = True
        logger.setLevel(level)

    return undo


def _make_site_keys(job: dict, directory: Path) -> dict[str, tuple[Path, Path]]:
    """A fresh key pair for each site, made for this run: site -> (private, public) files."""
    return {site["name"]: identity.make().write(directory / site["name"]) for site in job["spec"]["sites"]}


def _start_fork_server(
    job: dict, paths: Paths, processes: flower.Processes, app_sha256: str, trained: dict[str, Path]
) -> dict[str, socket.socket]:
    """Starts the run's fork server (bouquet_workloads.forks), which imports torch and the
    job's app once for the sites' workers, the ServerApp and the centralized baseline; returns
    each asker's end of its socket with it ("site-<name>", "superexec", "baseline")."""
    ends: dict[str, tuple[socket.socket, socket.socket]] = {}
    try:
        kinds = {f"site-{site['name']}": "worker" for site in job["spec"]["sites"]} | {"superexec": "serverapp"}
        if "task" in job["spec"]:
            kinds["baseline"] = "baseline"
        ends = {asker: forks.pair() for asker in kinds}
        preload = [flower.client_module(job), flower.server_module(job), "bouquet_workloads.worker", "flwr.superlink.cli.flwr_serverapp"]
        preload += ["bouquet_workloads.baseline"] if "task" in job["spec"] else []
        command = flower.forks_command(
            app_sha256,
            {ends[asker][0].fileno(): kind for asker, kind in kinds.items()},
            preload,
            paths.job if "task" in job["spec"] else None,
            trained,
        )
        processes.start(FORK_SERVER, command, pass_fds=[theirs.fileno() for theirs, _ in ends.values()])
    except BaseException:
        for pair in ends.values():
            for end in pair:
                end.close()
        raise
    for theirs, _ in ends.values():
        theirs.close()
    return {asker: ours for asker, (_, ours) in ends.items()}


def _baseline(job: dict, site_files: dict[str, Path], paths: Paths, asker: socket.socket | None) -> dict:
    """Trains the same model on the pooled training data (possible only because every
    site's data is on this machine): forked from the fork server (asker), or in this process
    when it does not start it."""
    if asker is not None:
        forked = forks.Asker(asker.detach())
        result = paths.out / ".baseline.json"
        log = (paths.logs / "baseline.log").open("ab")
        try:
            forked.start({"kind": "baseline", "result": str(result.resolve())}, [log.fileno(), log.fileno()])
            code = forked.wait()
            if code != 0:
                raise RunFailed(f"the centralized baseline failed (exit {code}; its log: {paths.logs / 'baseline.log'})")
            found = outputs.read_json(result)
            result.unlink()
            return found
        except forks.ForkError as error:
            logging.getLogger("bouquet_workloads.local").warning("the fork server did not train the baseline (%s); training it here", error)
        finally:
            log.close()
            forked.close()
    # torch, imported only now: this process holds none of its memory while the run goes on
    from . import baseline

    return baseline.centralized(job, site_files)


def _compare_with_baseline(paths: Paths, result: dict, model: dict, say: Callable[[str], None]) -> dict:
    """Prints the baseline beside the federated result and keeps it in baseline.json."""
    outputs.write_json(paths.out / BASELINE, result)
    federated = model["metrics"]
    say(f"evaluated on the {result['evaluatedOn']}:")
    for key in ("accuracy", "auroc", "loss"):
        if key in federated and key in result:
            say(f"  {key:<9} federated {federated[key]:.4f}   centralized baseline {result[key]:.4f}")
    return result
