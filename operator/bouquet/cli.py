"""The `bouquet` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import jobfile, local
from .schema import InvalidJob


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bouquet", description="Federated learning with Flower, locally or on Kubernetes.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check job files against the FederatedJob schema and its rules")
    validate.add_argument("jobs", nargs="+", type=Path, metavar="JOB.yaml")

    run = commands.add_parser("run", help="train a job on this machine: one server and one process per site")
    run.add_argument("job", type=Path, metavar="JOB.yaml")
    run.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: runs/<job name>/); a run there resumes")
    run.add_argument("--metrics-port", type=int, default=local.DEFAULT_METRICS_PORT, metavar="N", help="Prometheus metrics port (default: %(default)s)")

    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args.jobs)
    if args.command == "run":
        if not 1 <= args.metrics_port <= 65535:
            parser.error(f"--metrics-port: {args.metrics_port} is not a port number (1-65535)")
        return local.main_run(args.job, args.out, args.metrics_port)
    return 2


def _validate(paths: list[Path]) -> int:
    failed = False
    for path in paths:
        try:
            jobfile.load(path)
        except InvalidJob as error:
            failed = True
            print(f"{path}: invalid:", file=sys.stderr)
            for violation in error.violations:
                print(f"  {violation}", file=sys.stderr)
        else:
            print(f"{path}: valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
