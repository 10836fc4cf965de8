"""The job's server pod deleted or SIGKILLed at a random round of a real run, ten trials, and
what held:

    python benchmarks/server_faults.py [--trials 10] [--first SEED]

Each trial runs examples/breast-cancer.yaml, real Flower over TLS in real pods, on this host's
single-node cluster (scripts/cluster/up.sh --node, Bouquet's chart installed as `make cluster`
installs it; root needed). Once the job's status reports a random round of its run, its server
pod is deleted (`kubectl delete pod`: a new pod, as a drained node or an eviction makes) or its
processes are SIGKILLed (the container started again in the same pod, as the OOM killer
leaves it); odd seeds SIGKILL, even seeds delete. A trial holds when the job succeeds, the
history in its output claim has every round exactly once, and the status names the sha256 of
the model file in the claim. Printed: each trial's fault and the round it followed, how many
held, and a run's median wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
for folder in ("operator", "workloads", "tests"):
    sys.path.insert(0, str(ROOT / folder))

from support.cluster import kubectl  # noqa: E402
from support.e2e import diagnose, job_status, kill_pod, read_claim, server_pods, wait_for_round  # noqa: E402

EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"
SCRIPTS = ROOT / "scripts" / "cluster"


def trial(kubeconfig: str, seed: int) -> tuple[list[str], str, float]:
    """One run with its server killed once; returns what did not hold, what happened, and the
    run's seconds."""
    rng = random.Random(seed)
    namespace, name = f"server-fault-{seed}", "breast-cancer"
    document = yaml.safe_load(EXAMPLE.read_text())
    rounds = document["spec"]["rounds"]
    document["metadata"] = {"name": name, "namespace": namespace}
    # A round reported (the status is polled every 2 s, and a round takes a few seconds): the
    # kill lands within the next rounds, never after the last.
    kill_after = rng.randint(1, rounds - 4)
    how = "SIGKILLed" if seed % 2 else "deleted"
    kubectl(kubeconfig, "create", "namespace", namespace)
    started = time.monotonic()
    try:
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(document))
        wait_for_round(kubeconfig, namespace, name, kill_after, timeout=600)
        time.sleep(rng.uniform(0, 1.0))
        round_before = job_status(kubeconfig, namespace, name).get("progress", {}).get("round", 0)
        (pod,) = server_pods(kubeconfig, namespace, name)
        if how == "deleted":
            kubectl(kubeconfig, "delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=false")
        elif not kill_pod(kubeconfig, namespace, pod["metadata"]["name"]):
            return [f"no process of {pod['metadata']['name']} to SIGKILL"], how, time.monotonic() - started
        happened = f"{how} after round {round_before}"
        waited = kubectl(
            kubeconfig,
            "wait",
            "-n",
            namespace,
            f"federatedjob/{name}",
            "--for=condition=Succeeded",
            "--timeout=600s",
            check=False,
            timeout=620,
        )
        seconds = time.monotonic() - started
        if waited.returncode:
            return [f"did not succeed: {waited.stderr.strip()}\n{diagnose(kubeconfig, namespace)}"], happened, seconds
        model = job_status(kubeconfig, namespace, name)["model"]
        files = read_claim(kubeconfig, namespace, f"{name}-output", ["history.json", model["path"].lstrip("/")])
        found = []
        history = [entry["round"] for entry in json.loads(files["history.json"])]
        if history != list(range(1, rounds + 1)):
            found.append(f"the rounds in history.json were {history}")
        if hashlib.sha256(files[model["path"].lstrip("/")]).hexdigest() != model["sha256"]:
            found.append("the status's sha256 is not the model file's")
        if round_before >= rounds:
            found.append("the run had ended before the fault")
        return found, happened, seconds
    except AssertionError as error:
        return [str(error)], how, time.monotonic() - started
    finally:
        kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="runs (default: %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="the first trial's seed (default: %(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the single-node cluster (containerd, kubelet, iptables) needs root", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="bouquet-server-faults-"))
    state = workdir / "cluster"
    env = {**os.environ, "BOUQUET_CLAIMS_DIR": str(workdir / "claims")}
    up = subprocess.run(["bash", str(SCRIPTS / "up.sh"), "--node", str(state)], capture_output=True, text=True, env=env)
    try:
        if up.returncode:
            print(up.stderr[-5000:], file=sys.stderr)
            return 1
        installed = subprocess.run(["bash", str(SCRIPTS / "install.sh"), str(state)], capture_output=True, text=True, env=env)
        if installed.returncode:
            print(installed.stderr[-5000:], file=sys.stderr)
            return 1
        kubeconfig = str(state / "kubeconfig")
        held, seconds = 0, []
        for seed in range(args.first, args.first + args.trials):
            found, happened, took = trial(kubeconfig, seed)
            seconds.append(took)
            print(
                f"  trial {seed}: server pod {happened}, {took:.0f} s: {'; '.join(found) if found else 'every round once, the sha256 right'}",
                flush=True,
            )
            held += not found
        print(
            f"server pod deleted or SIGKILLed at a random round: {held} of {args.trials} runs completed with every round exactly once"
            f" and the model's sha256 in the status (a run: median {statistics.median(seconds):.0f} s)"
        )
        return 0 if held == args.trials else 1
    finally:
        subprocess.run(["bash", str(SCRIPTS / "down.sh"), "--delete-claims", str(state)], capture_output=True, env=env)


if __name__ == "__main__":
    sys.exit(main())
