"""The Grafana dashboards' queries (charts/bouquet/files/dashboards), run against a real
Prometheus: every panel must return data from a real run."""

from __future__ import annotations

import json
import time
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "bouquet" / "files" / "dashboards"


def queries(dashboard: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard, its variables set to all."""
    document = json.loads((DASHBOARDS / f"{dashboard}.json").read_text())
    found = []
    for panel in document["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", ".*").replace("$job_name", ".*")
            found.append((panel["title"], expr))
    return found


def empty_panels(prometheus, dashboard: str, timeout: float = 20) -> list[str]:
    """The queries of the dashboard that return no data, after waiting up to timeout seconds
    for them all to (a rate needs two scrapes)."""
    deadline = time.monotonic() + timeout
    while True:
        empty = [f"{title}: {expr}" for title, expr in queries(dashboard) if not prometheus.query(expr)]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1)
