"""The operator's metrics, named after controller-runtime's with a bouquet_ prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTROLLER = "federatedjob"
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")


class Metrics:
    """The operator's metrics, named after controller-runtime's with a bouquet_ prefix."""

    def __init__(self, phases, requests=dict, leading=lambda: True) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RequestCollector(requests))
        self.leader = Gauge("bouquet_leader", "1 while this replica holds the Lease and acts, else 0.", registry=self.registry)
        self.leader.set_function(lambda: 1.0 if leading() else 0.0)
        self.reconciles = Counter(
            "bouquet_reconcile",
            "Reconciles by controller and result (success, error, requeue).",
            ["controller", "result"],
            registry=self.registry,
        )
        self.errors = Counter("bouquet_reconcile_errors", "Reconciles that ended in an error.", ["controller"], registry=self.registry)
        self.duration = Histogram(
            "bouquet_reconcile_time_seconds",
            "How long a reconcile took.",
            ["controller"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.registry.register(_PhaseCollector(phases))
        # As client-go's workqueue metrics: how many keys wait, were queued, and how long they waited.
        self.depth = Gauge("bouquet_workqueue_depth", "Jobs waiting in the work queue.", registry=self.registry)
        self.adds = Counter("bouquet_workqueue_adds", "Jobs queued for a reconcile.", registry=self.registry)
        self.queue_duration = Histogram(
            "bouquet_workqueue_queue_duration_seconds",
            "How long a job waited in the work queue before a worker took it.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        for result in ("success", "error", "requeue"):
            self.reconciles.labels(CONTROLLER, result)
        self.errors.labels(CONTROLLER)
        self.duration.labels(CONTROLLER)


class _RequestCollector:
    """The operator's requests to the API server, by method, as its client counted them."""

    def __init__(self, requests) -> None:
        self.requests = requests

    def collect(self):
        family = CounterMetricFamily(
            "bouquet_api_requests",
            "Requests the operator made to the API server, by method, and whether a dry run (which writes nothing).",
            labels=["method", "dry_run"],
        )
        counts = {(method, False): 0 for method in ("GET", "POST", "PATCH", "DELETE")} | {("POST", True): 0} | self.requests()
        for (method, dry_run), count in sorted(counts.items()):
            family.add_metric([method, str(dry_run).lower()], count)
        yield family


class _PhaseCollector:
    def __init__(self, phases) -> None:
        self.phases = phases

    def collect(self):
        family = GaugeMetricFamily("bouquet_federatedjobs", "FederatedJobs the operator watches, by phase.", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for phase in list(self.phases().values()):
            counts[phase or "Pending"] = counts.get(phase or "Pending", 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family
