"""Times `bouquet run` of an example job and prints figures: wall time from the command's
start to its exit, the rounds' median and slowest durations, the time spent outside
the rounds, and the peak memory of the whole process tree (sampled every 0.2 s), twice: as the
sum of each process's resident set (RSS: a page of a shared library, torch's among them, is
counted once in every process that maps it) and as the sum of their proportional set sizes
(PSS: a shared page is split among the processes sharing it, so the sum is the memory the run
holds).

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

from bouquet.render import METRICS_PORT  # noqa: E402
from bouquet_workloads.flower import descendants  # noqa: E402


def memory_bytes(pids: set[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) of pids, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def main() -> None:
    job = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "breast-cancer.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "bouquet", "run", str(job), "--out", str(out), "--metrics-port", str(METRICS_PORT)],
            stdout=subprocess.DEVNULL,
        )
        peak_rss = peak_pss = 0
        while process.poll() is None:
            rss, pss = memory_bytes({process.pid, *descendants(process.pid)})
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
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
    print(f"peak memory, all procs  {peak_pss / 2**20:.0f} MiB PSS ({peak_rss / 2**20:.0f} MiB summed RSS)")
    print(f"final accuracy          {model['metrics'].get('accuracy', float('nan')):.4f}")


if __name__ == "__main__":
    main()
