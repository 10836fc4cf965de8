"""Times `bouquet run` of an example job and prints figures: wall time from the command's
start to its exit, the rounds' median and slowest durations, the time spent outside
the rounds, and the peak memory of the whole process tree (sampled every 0.2 s).

    make bench-local            # examples/breast-cancer.yaml
    python benchmarks/local_run.py examples/sleep-quality.yaml
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "workloads")]

from bouquet.flower import descendants  # noqa: E402
from bouquet.render import METRICS_PORT  # noqa: E402


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main() -> None:
    job = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "breast-cancer.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "bouquet", "run", str(job), "--out", str(out), "--metrics-port", str(METRICS_PORT)],
            stdout=subprocess.DEVNULL,
        )
        peak = 0
        while process.poll() is None:
            peak = max(peak, rss_bytes({process.pid, *descendants(process.pid)}))
            time.sleep(0.2)
        wall = time.monotonic() - started
        if process.returncode != 0:
            sys.exit(f"bouquet run failed with exit code {process.returncode}")
        history = json.loads((out / "history.json").read_text())
        model = json.loads((out / "model.json").read_text())
    durations = [e["durationSeconds"] for e in history]
    print(f"job                     {job.name} ({len(history)} rounds)")
    print(f"wall time               {wall:.1f} s")
    print(f"outside the rounds      {wall - sum(durations):.1f} s (start-up, feature statistics, baseline, report)")
    print(f"round time, median      {statistics.median(durations):.1f} s")
    print(f"round time, slowest     {max(durations):.1f} s")
    print(f"peak memory, all procs  {peak / 2**20:.0f} MiB")
    print(f"final accuracy          {model['metrics'].get('accuracy', float('nan')):.4f}")


if __name__ == "__main__":
    main()
