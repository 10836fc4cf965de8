"""The operator's speed, memory and load on the API server on a real control plane
(scripts/cluster), printed.

    python benchmarks/operator_load.py [--jobs 20] [--live 100] [--sites 10] [--rest 60]

1. Time from `kubectl apply` of a job (of --sites sites) to every one of its children created
   (the Secrets, claim, ConfigMaps, service account, Role, RoleBinding, Deployment, Service,
   NetworkPolicies and one Job per site): median and p95 over --jobs jobs applied one after
   another.
2. The operator's resident memory with --live jobs live, once every one has its children.
3. At rest (nothing changes for --rest seconds, a resync every --rest/3 s): the operator's
   requests to the API server per minute, by method, from its bouquet_api_requests_total,
   and the writes (PATCH, POST that is no dry run, DELETE) per resync.

The operator runs as `bouquet operator` in a process of its own; the control plane is
started for the benchmark and stopped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "workloads"))

from bouquet import kube  # noqa: E402
from bouquet.render import CHILD_KINDS, Settings, render  # noqa: E402

EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
TIMEOUT = 300  # seconds for a job's (or the live jobs') children to appear


def kubectl(kubeconfig: str, *args: str, input: str | None = None) -> str:
    """The cluster's own kubectl, which up.sh puts in the state folder beside the kubeconfig."""
    binary = str(Path(kubeconfig).parent / "bin" / "kubectl")
    return subprocess.run([binary, "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True, input=input).stdout


def job(name: str, sites: int) -> dict:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name, "namespace": "bench"}
    document["spec"]["sites"] = [{"name": f"site-{i}"} for i in range(sites)]
    return document


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_made(port: int) -> dict[tuple[str, str], float]:
    """The operator's bouquet_api_requests_total, by (method, dry_run)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^bouquet_api_requests_total\{dry_run="(\w+)",method="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {(method, dry_run): float(count) for dry_run, method, count in found}


def expected_count(document: dict) -> int:
    from bouquet import identity, tls
    from bouquet.schema import apply_defaults

    bundle = tls.Bundle(b"", b"", b"")
    keys = {site["name"]: identity.placeholder() for site in document["spec"]["sites"]}
    return len(render(apply_defaults(document), Settings("image", bundle, keys)))


def children_of(client: kube.Client, name: str) -> int:
    return sum(len(client.list(v, k, "bench", f"bouquet.dev/job={name}")) for v, k in CHILD_KINDS)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="jobs timed one after another (default: %(default)s)")
    parser.add_argument("--live", type=int, default=100, help="jobs live when the memory is read (default: %(default)s)")
    parser.add_argument("--sites", type=int, default=10, help="sites of each job (default: %(default)s)")
    parser.add_argument("--rest", type=float, default=60, help="seconds at rest the requests are counted over (default: %(default)s)")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="bouquet-bench-")) / "cluster"
    up = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "up.sh"), str(state)], capture_output=True, text=True)
    if up.returncode:
        print(up.stderr, file=sys.stderr)
        return 1
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("export KUBECONFIG=")
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'workloads'}"}
    operator = None
    try:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(ROOT / "crds" / "federatedjob.yaml"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/federatedjobs.bouquet.dev")
        kubectl(kubeconfig, "create", "namespace", "bench")
        # The operator's own namespace, where it keeps the jobs' records (operator/bouquet/keep.py).
        kubectl(kubeconfig, "create", "namespace", "bouquet-system")
        os.environ["KUBECONFIG"] = kubeconfig
        client = kube.Client.from_environment()
        log = open(state.parent / "operator.log", "w")  # noqa: SIM115 - open for the operator's life
        port = free_port()
        resync = max(1.0, args.rest / 3)
        command = [sys.executable, "-m", "bouquet", "operator", "--port", str(port), "--resync-seconds", str(resync)]
        operator = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        time.sleep(3)
        wanted = expected_count(job("j", args.sites))

        def wait(names: list[str]) -> None:
            """Until every job named has all its children; a clear failure, with the operator's
            log, if they do not come within TIMEOUT seconds or the operator exits."""
            deadline = time.monotonic() + TIMEOUT
            pending = set(names)
            while True:
                pending = {n for n in pending if children_of(client, n) < wanted}
                if not pending:
                    return
                if operator.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (state.parent / "operator.log").read_text()[-3000:]
                    why = f"the operator exited ({operator.returncode})" if operator.poll() is not None else f"{TIMEOUT} s passed"
                    raise SystemExit(f"{why} before {sorted(pending)[:5]} had all {wanted} children; the operator's log ends:\n{tail}")
                time.sleep(0.02 if len(pending) == 1 else 0.5)

        timings = []
        for i in range(args.jobs):
            name = f"timed-{i}"
            started = time.monotonic()
            kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(job(name, args.sites)))
            wait([name])
            timings.append(time.monotonic() - started)
        timings.sort()
        p95 = timings[min(len(timings) - 1, int(round(0.95 * len(timings))) - 1)]
        print(f"apply -> all {wanted} children created, over {args.jobs} jobs: median {statistics.median(timings):.2f} s, p95 {p95:.2f} s")

        started = time.monotonic()
        for i in range(args.jobs, args.live):
            kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(job(f"live-{i}", args.sites)))
        names = [f"timed-{i}" for i in range(args.jobs)] + [f"live-{i}" for i in range(args.jobs, args.live)]
        wait(names)
        print(f"{args.live} jobs live, every child created {time.monotonic() - started:.1f} s after the last apply started")
        time.sleep(10)  # a few reconciles of each
        print(f"operator memory (RSS) with {args.live} jobs of {args.sites} sites live: {rss_mib(operator.pid):.0f} MiB")

        def writes_in(made: dict) -> float:
            """PATCH, POST that is no dry run, DELETE: the Lease's renewals (PUT) are not a resync's."""
            return sum(n for (m, d), n in made.items() if m in ("PATCH", "POST", "DELETE") and d == "false")

        # At rest once the jobs' own changes are done (their pods made and found unschedulable:
        # the control plane has no node): a resync period with no write.
        settled_by = time.monotonic() + 600
        while time.monotonic() < settled_by:
            before = requests_made(port)
            time.sleep(resync)
            if writes_in(requests_made(port)) == writes_in(before):
                break
        before = requests_made(port)
        time.sleep(args.rest)
        after = requests_made(port)
        made = {key: after.get(key, 0) - before.get(key, 0) for key in after}
        names = {"PUT": "PUT (the Lease's renewals)", "POST": "POST"}
        per_minute = ", ".join(
            f"{names.get(m, m)}{' (dry run: is a key copy still there)' if d == 'true' else ''} {n * 60 / args.rest:.0f}"
            for (m, d), n in sorted(made.items())
        )
        print(f"at rest, requests to the API server per minute: {per_minute}")
        print(f"at rest, writes per resync (every {resync:.0f} s): {writes_in(made) / (args.rest / resync):.1f}")
    finally:
        if operator:
            operator.terminate()
            operator.wait(30)
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "down.sh"), str(state)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
