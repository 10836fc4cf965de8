"""The `bouquet` command."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
from pathlib import Path

from . import identity, jobfile, kubeyaml, tls
from .render import DEFAULT_IMAGE, METRICS_PORT, Settings, makes_site_keys, names
from .render import render as render_job
from .schema import InvalidJob

# What trains (torch, Flower) is imported by the commands that train, not by validate,
# render or the operator: the operator's memory stays that of a small controller.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bouquet", description="Federated learning with Flower, locally or on Kubernetes.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check job files against the FederatedJob schema and its rules")
    validate.add_argument("jobs", nargs="+", type=Path, metavar="JOB.yaml")

    run = commands.add_parser("run", help="train a job on this machine: one server and one process per site")
    run.add_argument("job", type=Path, metavar="JOB.yaml")
    run.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: runs/<job name>/); a run there resumes")
    run.add_argument("--metrics-port", type=int, default=METRICS_PORT, metavar="N", help="Prometheus metrics port (default: %(default)s)")

    server = commands.add_parser("server", help="run a job's server in the foreground (the server pod's entrypoint)")
    server.add_argument("job", type=Path, metavar="JOB.yaml")
    server.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory; a server restarted on it resumes")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 in a pod)")
    server.add_argument("--port", type=int, default=9092, help="port the sites dial (default: %(default)s)")
    server.add_argument(
        "--metrics-port", type=int, default=METRICS_PORT, metavar="N", help="Prometheus metrics port (default: %(default)s)"
    )
    server.add_argument(
        "--tls-dir", type=Path, metavar="DIR", help="folder with ca.crt, tls.crt and tls.key (required unless the job disables TLS)"
    )
    server.add_argument(
        "--site-keys",
        type=Path,
        metavar="DIR",
        help="folder with each site's public key as <site>.pub: only these sites may join (needs TLS)",
    )
    server.add_argument(
        "--report-status",
        action="store_true",
        help="in a pod: report each round to the FederatedJob's status.progress with the pod's service account",
    )

    site = commands.add_parser("site", help="run one site of a job in the foreground (a site pod's entrypoint)")
    site.add_argument("job", type=Path, metavar="JOB.yaml")
    site.add_argument("--site", required=True, help="the site's name in the job")
    site.add_argument("--server", required=True, metavar="HOST:PORT", help="the job's server")
    site.add_argument("--data", type=Path, help="the site's data file (default: the job's spec.sites[].data.path)")
    site.add_argument("--ca", type=Path, metavar="FILE", help="the job's CA certificate (required unless the job disables TLS)")
    site.add_argument("--key", type=Path, metavar="FILE", help="the site's private key, for a server that authenticates its sites")
    site.add_argument("--runtime-port", type=int, default=9094, help="local port of the site's app runtime (default: %(default)s)")

    share = commands.add_parser("share", help="write one site's share of the built-in dataset (a site pod's init step)")
    share.add_argument("job", type=Path, metavar="JOB.yaml")
    which = share.add_mutually_exclusive_group(required=True)
    which.add_argument("--site", help="the site whose share to write, as <site>.csv")
    which.add_argument("--held-out", action="store_true", help="write the test split that no site trains on, as held-out.csv")
    share.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the file to")

    predict = commands.add_parser("predict", help="predict the class of each row of a data file with a job's final model")
    predict.add_argument("job", type=Path, metavar="JOB.yaml")
    predict.add_argument("data", type=Path, metavar="DATA.csv", help="rows with the job's feature columns (CSV or Parquet)")
    predict.add_argument("--model", type=Path, required=True, metavar="DIR", help="the run's output folder (model.safetensors, model.json)")

    operator = commands.add_parser("operator", help="run the FederatedJob operator against the cluster of $KUBECONFIG (or in a pod)")
    operator.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="watch only this namespace (repeatable; default: all namespaces)"
    )
    operator.add_argument("--image", default=DEFAULT_IMAGE, help="the workloads image for jobs that name none (default: %(default)s)")
    operator.add_argument("--port", type=int, default=8080, help="port of /metrics and /healthz; 0 for none (default: %(default)s)")
    operator.add_argument("--resync-seconds", type=float, default=60.0, metavar="S", help="look at every job at least this often")
    operator.add_argument("--workers", type=int, default=4, help="jobs reconciled at once (default: %(default)s)")
    operator.add_argument(
        "--metrics-scrapers",
        type=_peers,
        default=(),
        metavar="JSON",
        help="the NetworkPolicy peers (a JSON list) whose pods may scrape each job server's metrics, e.g. "
        '\'[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]\' (default: none)',
    )
    operator.add_argument(
        "--own-namespace",
        default="bouquet-system",
        metavar="NS",
        help="the operator's own namespace, where it keeps each job's private keys, readable by it alone (default: %(default)s)",
    )
    operator.add_argument(
        "--own-service-account",
        metavar="NAME",
        help="the operator's ServiceAccount in its own namespace: the jobs' records are owned by it, and go when it does "
        "(for installs whose uninstall deletes the jobs; without it, a record goes when its job does)",
    )
    operator.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="act without holding the Lease bouquet-operator in the own namespace (only for a single replica)",
    )
    operator.add_argument(
        "--dns-service",
        default="kube-system/kube-dns",
        metavar="NS/NAME",
        help="the cluster DNS Service, whose endpoints job pods may reach (default: %(default)s)",
    )
    render = commands.add_parser("render", help="print the Kubernetes objects the operator creates for a job")
    render.add_argument("job", type=Path, metavar="JOB.yaml")
    render.add_argument("--image", default=DEFAULT_IMAGE, help="the workloads image (default: %(default)s)")
    render.add_argument("--namespace", default="default", help="namespace of the job, unless its file names one (default: %(default)s)")

    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args.jobs)
    if args.command == "run":
        if not 1 <= args.metrics_port <= 65535:
            parser.error(f"--metrics-port: {args.metrics_port} is not a port number (1-65535)")
        return _run(args.job, args.out, args.metrics_port)
    if args.command == "operator":
        return _operator(args)
    try:
        job = jobfile.load(args.job)
    except InvalidJob as error:
        _print_invalid(args.job, error)
        return 1
    if args.command == "render":
        job["metadata"].setdefault("namespace", args.namespace)
        auto_tls = job["spec"]["security"]["tls"]["mode"] == "Auto"
        site_keys = {s["name"]: identity.placeholder() for s in job["spec"]["sites"]} if makes_site_keys(job) else None
        children = render_job(job, Settings(args.image, tls.placeholder() if auto_tls else None, site_keys))
        if auto_tls and job["spec"]["mode"] != "SitesOnly":
            print(
                f"# The Secret {names(job)['tls']} holds placeholders: the operator makes the job's CA and the server's key in the cluster."
            )
        if site_keys:
            print("# The sites' key Secrets and the ConfigMap of their public keys hold placeholders: the operator makes each site's key.")
        print(kubeyaml.dump_all(children), end="")
        return 0
    if args.command == "predict":
        return _predict(job, args.model, args.data)
    if args.command == "share":
        takers = [s["name"] for s in job["spec"]["sites"] if "data" not in s]
        if args.held_out and "dataset" not in job["spec"]:
            parser.error("--held-out: the job has no spec.dataset to hold a test split out of")
        if args.site is not None and args.site not in takers:
            parser.error(
                f"--site: {args.site!r} is not a site of the job that takes a share of spec.dataset ({', '.join(takers) or 'none'})"
            )
        from bouquet_workloads import local

        local.write_builtin_shares(job, args.out, [args.site] if args.site else [], held_out=args.held_out)
        return 0
    tls_on = job["spec"]["security"]["tls"]["mode"] != "Disabled"
    from bouquet_workloads import flower

    if args.command == "server":
        from bouquet_workloads.server import serve

        if tls_on and args.tls_dir is None:
            parser.error("--tls-dir is required: the job's spec.security.tls.mode is not Disabled")
        server_tls = flower.Tls(args.tls_dir / "ca.crt", args.tls_dir / "tls.crt", args.tls_dir / "tls.key") if tls_on else flower.Tls()
        public_keys = _site_keys(parser, job, args.site_keys) if tls_on and args.site_keys else None
        if tls_on and public_keys is None:
            print(
                "warning: sites are not authenticated (no --site-keys): any SuperNode holding the job's CA may join as any site",
                file=sys.stderr,
            )
        try:
            serve(
                job,
                args.out,
                server_tls,
                args.port,
                args.host,
                args.metrics_port,
                report_status=args.report_status,
                public_keys=public_keys,
            )
        except flower.LaunchError as error:
            return _failed(error)
        except KeyboardInterrupt:
            return 130
        return 0
    site_names = [s["name"] for s in job["spec"]["sites"]]
    if args.site not in site_names:
        parser.error(f"--site: {args.site!r} is not a site of the job ({', '.join(site_names)})")
    if tls_on and args.ca is None:
        parser.error("--ca is required: the job's spec.security.tls.mode is not Disabled")
    settings = job["spec"]["sites"][site_names.index(args.site)]
    data = args.data or (Path(settings["data"]["path"]) if "data" in settings else None)
    if data is None:
        parser.error(f"--data is required: site {args.site!r} takes a share of the built-in dataset, which `bouquet run` writes out")
    from bouquet_workloads.site import run_site

    return run_site(job, args.site, args.server, data, args.ca if tls_on else None, args.runtime_port, args.key if tls_on else None)


def _site_keys(parser: argparse.ArgumentParser, job: dict, folder: Path) -> dict[str, Path]:
    """site -> public key file, for the sites of the job that have one in folder; a key that
    is not a site's public key stops the server before it starts."""
    from .identity import public_key_problem

    keys = {}
    for site in job["spec"]["sites"]:
        path = folder / f"{site['name']}.pub"
        if not path.exists():
            print(f"warning: --site-keys: no key for site {site['name']} ({path}); it cannot join until one is added", file=sys.stderr)
            continue
        problem = public_key_problem(path.read_text(errors="replace"))
        if problem:
            parser.error(f"--site-keys: {path} is {problem}")
        keys[site["name"]] = path
    return keys


def _validate(paths: list[Path]) -> int:
    failed = False
    for path in paths:
        warnings: list[str] = []
        try:
            jobfile.load(path, warnings)
        except InvalidJob as error:
            failed = True
            _print_invalid(path, error)
        else:
            print(f"{path}: valid")
        for warning in warnings:
            print(f"{path}: warning: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _run(job: Path, out: Path | None, metrics_port: int) -> int:
    from bouquet_workloads import flower, local

    try:
        local.run(job, out, metrics_port)
        return 0
    except InvalidJob as error:
        _print_invalid(job, error)
        return 1
    except local.CannotStart as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except flower.LaunchError as error:
        return _failed(error)
    except KeyboardInterrupt:
        print("stopped: every process of the run was stopped; run the same command again to resume", file=sys.stderr)
        return 130


def _predict(job: dict, folder: Path, data: Path) -> int:
    """Writes one CSV line per row to standard output (row, predicted class, each class's
    probability); with a label column, the accuracy on standard error."""
    import csv

    from bouquet_workloads import predict
    from bouquet_workloads.tables import DataError

    try:
        model = predict.load(folder)
        if model.info["job"] != job["metadata"]["name"]:
            raise predict.ModelError(f"{folder} holds the model of job {model.info['job']!r}, not {job['metadata']['name']!r}")
        table = model.read(data)
    except (predict.ModelError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    probabilities = model.probabilities(table.features)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["row", "prediction", *(f"p_{name}" for name in model.classes)])
    for row, p in enumerate(probabilities, start=1):
        writer.writerow([row, model.classes[int(p.argmax())], *(f"{v:.6f}" for v in p)])
    if (table.labels >= 0).all():
        scores = model.score(table)
        trained = model.info["metrics"].get("accuracy")
        reference = f" (model.json: {trained:.4f} on the {model.info['evaluatedOn']})" if trained is not None else ""
        print(f"accuracy {scores['accuracy']:.4f} on {len(table)} rows{reference}", file=sys.stderr)
    return 0


def _failed(error) -> int:
    """A run that failed: the end of the log that tells more first, the cause on the last line."""
    if error.log:
        print(f"{error.log}\n", file=sys.stderr)
    print(f"error: {error}", file=sys.stderr)
    return 1


def _print_invalid(path: Path, error: InvalidJob) -> None:
    print(f"{path}: invalid:", file=sys.stderr)
    for violation in error.violations:
        print(f"  {violation}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())


def _peers(text: str) -> tuple[dict, ...]:
    peers = json.loads(text)
    if not isinstance(peers, list) or not all(isinstance(p, dict) and p for p in peers):
        raise argparse.ArgumentTypeError("a JSON list of NetworkPolicy peers (objects with podSelector, namespaceSelector or ipBlock)")
    return tuple(peers)


def _operator(args) -> int:
    import kopf

    from . import controller

    controller.configured = controller.Config(
        image=args.image,
        metrics_scrapers=args.metrics_scrapers,
        dns_service=args.dns_service,
        own_namespace=args.own_namespace,
        own_account=args.own_service_account,
        resync_seconds=args.resync_seconds,
        namespaces=tuple(args.namespace),
        workers=args.workers,
        port=args.port,
        leader_election=args.leader_election,
    )
    logging.getLogger().handlers.clear()  # kopf's format only (an imported module may have set one)
    kopf.configure(verbose=False)
    # `kill -USR1` writes where every thread stands to the log: a reconcile or a watch that
    # hangs shows itself (the threads block in requests; a debugger may not be there).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, standalone=True)
    return 0
