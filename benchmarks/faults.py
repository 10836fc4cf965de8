"""Faults at random moments of a job's life on a real control plane, ten trials of each,
and what held (tests/support/faults.py says what is checked):

    python benchmarks/faults.py [--trials 10]

1. The operator SIGKILLed at two random moments of each run (often within its first
   reconcile) and started again: runs that completed with no child made twice, no two pods
   of one site or of the server live at once and no phase out of order.
2. The leader of two operators SIGKILLed: the same, and how long the other took to lead.
3. The API server restarted at a random moment: the same.
4. A server that restarts past runPolicy.backoffLimit: the job Failed, and still Failed, its
   server at 0 and no server pod made again, two minutes later, through an operator SIGKILLed
   halfway (one trial).

The control plane (scripts/cluster) and the nodes' stand-in kubelet (tests/support/kubelet.py)
are started for the benchmark and stopped afterwards; the operators run as `bouquet operator`
processes of their own. A job's server and sites are played, not run: these are the
operator's faults (the workloads' own, a server pod killed mid-round, are the end-to-end
tests').
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in ("operator", "workloads", "tests"):
    sys.path.insert(0, str(ROOT / folder))

from bouquet import kube  # noqa: E402
from support import faults  # noqa: E402
from support.kubelet import Kubelet, wait_for  # noqa: E402

NODES = {"cpu-node": {}, "gpu-node": {"nvidia.com/gpu": "2"}}


def kubectl(kubeconfig: str, *args: str) -> None:
    binary = str(Path(kubeconfig).parent / "bin" / "kubectl")
    subprocess.run([binary, "--kubeconfig", kubeconfig, *args], check=True, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="runs of each fault (default: %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="the first trial's seed (default: %(default)s)")
    parser.add_argument(
        "--faults",
        default="killed,leader,restarted,crashloop",
        help="which series, of killed, leader, restarted, crashloop (default: %(default)s)",
    )
    parser.add_argument("--hold", type=float, default=120, help="seconds a crash-looped job is watched after Failed (default: %(default)s)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bouquet-faults-"))
    state = workdir / "cluster"
    up = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "up.sh"), str(state)], capture_output=True, text=True)
    if up.returncode:
        print(up.stderr, file=sys.stderr)
        return 1
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("export KUBECONFIG=")
    os.environ["KUBECONFIG"] = kubeconfig
    kubelet = None
    failures = 0
    try:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(ROOT / "crds" / "federatedjob.yaml"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/federatedjobs.bouquet.dev", "--timeout=60s")
        client = kube.Client.from_environment()
        kubelet = Kubelet(client, NODES).start()
        wait_for(
            lambda: all(
                not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints", []))
                for n in client.request("GET", "/api/v1/nodes")["items"]
            ),
            timeout=90,
            what="the nodes Ready",
        )
        identity = faults.server_identity(kubeconfig)

        def series(title: str, namespace: str, replicas: int, fault, moments: int) -> None:
            nonlocal failures
            if namespace not in args.faults.split(","):
                return
            kubectl(kubeconfig, "create", "namespace", namespace)
            operators = faults.Operators(kubeconfig, namespace, namespace, workdir / f"{namespace}.log", replicas=replicas)
            held, seconds, remade = 0, [], 0
            try:
                for seed in range(args.first, args.first + args.trials):
                    trial = faults.Trial(kubeconfig, client, namespace, identity, name=f"trial-{seed}", seed=seed)
                    started = time.monotonic()
                    found = trial.run(fault(operators), moments=moments, span=5.0, timeout=240) + operators.unhealthy()
                    seconds.append(time.monotonic() - started)
                    remade += len(trial.witness.remade(trial.name))
                    if found:
                        print(f"  {title}, trial {seed}: {'; '.join(found)} ({'; '.join(trial.log)})")
                        print(faults.snapshot(client, namespace, trial.name))
                        print(operators.threads())
                    else:
                        held += 1
            finally:
                operators.stop()
            failures += args.trials - held
            print(
                f"{title}: {held} of {args.trials} runs completed with every check holding (a run: median {statistics.median(seconds):.0f} s)"
            )
            if remade:
                print(f"  key copies deleted and made again from their record (being made when the operator was killed): {remade}")
            if operators.takeovers:
                print(
                    f"  takeover after the leader's SIGKILL: median {statistics.median(operators.takeovers):.1f} s, most {max(operators.takeovers):.1f} s"
                )

        series("operator SIGKILLed twice a run", "killed", 1, lambda ops: ops.kill, moments=2)
        series("leader of two operators SIGKILLed", "leader", 2, lambda ops: ops.kill, moments=1)
        series("API server restarted", "restarted", 1, lambda ops: faults.api_server_outage(kubeconfig, kubelet), moments=1)
        if "crashloop" in args.faults.split(","):
            kubectl(kubeconfig, "create", "namespace", "crashloop")
            operators = faults.Operators(kubeconfig, "crashloop", "crashloop", workdir / "crashloop.log")
            try:
                found = faults.crash_loop(kubeconfig, client, "crashloop", kubelet, operators, "crashloop", hold=args.hold)
            finally:
                operators.stop()
            failures += bool(found)
            held = f"Failed for {args.hold:.0f} s after, through an operator SIGKILLed halfway"
            print(f"a server restarting past backoffLimit: {'did not hold: ' + '; '.join(found) if found else held}")
        if kubelet.errors:
            print(f"the stand-in kubelet's errors: {kubelet.errors[:5]}")
    finally:
        if kubelet is not None:
            kubelet.stop()
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "down.sh"), str(state)], capture_output=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
