"""report.png: the loss and accuracy of each round, beside the centralized baseline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .outputs import write_atomic  # noqa: E402


def plot(path: Path, job: Mapping, history: list[dict], baseline: Mapping | None) -> None:
    rounds = [e["round"] for e in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    evaluated_on = history[-1].get("evaluatedOn", "") if history else ""
    for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
        axis.plot(rounds, [e.get(key) for e in history], marker="o", label=f"federated ({job['spec']['strategy']['name']})")
        if baseline and key in baseline:
            axis.axhline(baseline[key], linestyle="--", color="grey", label="centralized baseline")
        axis.set_xlabel("round")
        axis.set_ylabel(key)
        axis.set_title(f"{key} on the {evaluated_on}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{job['metadata']['name']}: {len(job['spec']['sites'])} sites")
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    write_atomic(path, tmp.read_bytes())
    tmp.unlink()
