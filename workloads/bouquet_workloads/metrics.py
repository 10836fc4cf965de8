"""Prometheus metrics of a job, read from its output directory at every scrape.

The metrics are a function of the committed files (history.json, progress.json), not of
counters kept in some process: they survive a restarted server, agree with the history
by construction, and can be served by whichever process is long-lived (the `bouquet run`
parent locally, the server pod's entrypoint on Kubernetes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import outputs

# "job" is Prometheus's own target label, so the job's name goes in job_name (as kube-state-metrics
# does for Kubernetes Jobs).
LABELS = ["namespace", "job_name"]
# Rounds take seconds (small models) to many minutes (large models, slow sites).
DURATION_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600)


class JobCollector(Collector):
    """Collects one job's round metrics from its output directory."""

    def __init__(self, out: Path, namespace: str, job: str) -> None:
        self.out = out
        self.labels = [namespace, job]

    def collect(self) -> Iterator[Metric]:
        history = outputs.read_json(self.out / outputs.HISTORY, []) or []
        progress = outputs.read_json(self.out / outputs.PROGRESS, {}) or {}
        latest = history[-1] if history else {}

        yield self._gauge("bouquet_job_rounds", "Rounds the job runs in all.", progress.get("rounds"))
        yield self._gauge("bouquet_job_current_round", "The last round that finished.", latest.get("round", 0))
        yield self._gauge("bouquet_job_completed", "1 once the final model is written, else 0.", int(progress.get("state") == "Succeeded"))
        yield self._gauge(
            "bouquet_job_failed", "1 if the server's training stopped with an error, else 0.", int(progress.get("state") == "Failed")
        )
        # The newest round's evaluation may come with the next round (server_app.evaluates_ahead).
        scored = outputs.last_evaluated(history)
        for name, help_text in [
            ("loss", "Evaluation loss of the latest round evaluated."),
            ("accuracy", "Evaluation accuracy of the latest round evaluated."),
            ("auroc", "Evaluation AUROC of the latest round evaluated (two classes only)."),
        ]:
            if name in scored:
                yield self._gauge(f"bouquet_round_{name}", help_text, scored[name])
        if "train" in latest and "loss" in latest["train"]:
            yield self._gauge("bouquet_round_train_loss", "Sites' mean training loss in the latest round.", latest["train"]["loss"])
        yield self._gauge("bouquet_round_sites", "Sites that took part in the latest round.", len(latest.get("sites", [])))
        yield self._counter("bouquet_bytes_sent", "Model bytes the server sent to sites.", sum(e.get("bytesSent", 0) for e in history))
        yield self._counter(
            "bouquet_bytes_received", "Model bytes the server received from sites.", sum(e.get("bytesReceived", 0) for e in history)
        )
        yield self._histogram([e["durationSeconds"] for e in history if "durationSeconds" in e])
        refused = GaugeMetricFamily(
            "bouquet_site_refused_runs",
            "Runs of another app than the job's that a site refused (as its replies said; a site that restarts counts from 0).",
            labels=[*LABELS, "site"],
        )
        for site, count in outputs.refused_runs(history).items():
            refused.add_metric([*self.labels, site], float(count))
        yield refused

    def _gauge(self, name: str, help_text: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, help_text, labels=LABELS)
        if value is not None:
            family.add_metric(self.labels, float(value))
        return family

    def _counter(self, name: str, help_text: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, help_text, labels=LABELS)
        family.add_metric(self.labels, float(value))
        return family

    def _histogram(self, durations: list[float]) -> HistogramMetricFamily:
        family = HistogramMetricFamily("bouquet_round_duration_seconds", "Wall time of each round.", labels=LABELS)
        # Bounds written as prometheus_client writes them ("5.0"), so that series agree.
        buckets = [(floatToGoString(bound), sum(d <= bound for d in durations)) for bound in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        family.add_metric(self.labels, buckets, sum_value=math.fsum(durations))
        return family


def serve(out: Path, namespace: str, job: str, port: int, host: str = "127.0.0.1"):
    """Serves the job's metrics on /metrics; returns (server, thread) to shut down."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobCollector(out, namespace, job))
    return start_http_server(port, addr=host, registry=registry)
