"""How round progress reaches a FederatedJob's status on Kubernetes.

The job's server pod reports it: after each committed round it applies `status.progress`
(the last round, its metrics, the final model once written, or why training failed) to its
own FederatedJob through the status subresource. It applies under a field manager of its
own, `bouquet-server`, through a Role that grants `get` and `patch` on that one job's status
and nothing else; the operator owns every other status field and derives them from this
one and from the job's pods.

Why the server reports and the operator does not poll it: the progress is already in files
the server commits (progress.json, history.json, model.json), the operator then needs no
network path into every job's pod (a NetworkPolicy admits only the job's sites and the
metrics scraper), and a restarted operator finds the progress in the object itself.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from . import outputs

GROUP, VERSION, PLURAL = "bouquet.dev", "v1alpha1", "federatedjobs"
FIELD_MANAGER = "bouquet-server"
INTERVAL_SECONDS = 2.0
# Numbers in a history entry that are not the round's metrics.
NOT_METRICS = {"round", "durationSeconds"}
log = logging.getLogger(__name__)


def read(out: Path) -> dict:
    """The progress a server with output directory out reports (empty before round 1
    starts). Only what the files say, so a restarted server reports the same."""
    state = outputs.read_json(out / outputs.PROGRESS, {}) or {}
    history = outputs.read_json(out / outputs.HISTORY, []) or []
    model = outputs.read_json(out / outputs.MODEL_INFO, None)
    if not state and not history:
        return {}
    progress: dict = {"state": state.get("state", "Running"), "round": len(history)}
    if progress["state"] not in ("Running", "Succeeded", "Failed"):
        progress["state"] = "Running"
    if history:
        last = history[-1]
        progress["round"] = last["round"]
        progress["sites"] = len(last["sites"])
        progress["takingPart"] = sorted(last["sites"])
        # The newest round's evaluation may come with the next round (server_app.evaluates_ahead).
        scored = outputs.last_evaluated(history) or last
        progress["metrics"] = {
            k: float(v) for k, v in scored.items() if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_METRICS
        }
    refused = outputs.refused_runs(history)
    if refused:
        progress[outputs.REFUSED_RUNS] = refused
    if progress["state"] == "Failed":
        progress["message"] = state.get("message") or "training failed"
    if model and progress["state"] == "Succeeded":
        progress["model"] = {"path": f"/{outputs.MODEL}", "sizeBytes": int(model["sizeBytes"]), "sha256": model["sha256"]}
    return progress


def apply(api_client, namespace: str, name: str, progress: dict) -> None:
    """Applies progress as the job's status.progress, as the server's field manager."""
    from kubernetes import client

    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": namespace},
        "status": {"progress": {**progress, "updateTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}},
    }
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        body,
        field_manager=FIELD_MANAGER,
        force=True,
        _content_type="application/apply-patch+yaml",
    )


class Reporter:
    """Reports the progress in out to the job's status whenever it changes, from a thread of
    its own, with the pod's service account. A failed report is logged and tried again: the
    status catches up, the training never waits for it."""

    def __init__(self, out: Path, namespace: str, name: str, api_client=None) -> None:
        self.out, self.namespace, self.name = out, namespace, name
        self.api_client = api_client
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="status-reporter", daemon=True)
        self.reported: dict | None = None

    @classmethod
    def in_cluster(cls, out: Path, namespace: str, name: str) -> Reporter:
        from kubernetes import client, config

        config.load_incluster_config()
        return cls(out, namespace, name, client.ApiClient())

    def start(self) -> Reporter:
        self.thread.start()
        return self

    def report_now(self) -> None:
        progress = read(self.out)
        if progress and progress != self.reported:
            apply(self.api_client, self.namespace, self.name, progress)
            self.reported = progress

    def _loop(self) -> None:
        while not self.stopping.wait(INTERVAL_SECONDS):
            try:
                self.report_now()
            except Exception as error:  # noqa: BLE001 - any failure: log, and try again later
                log.warning("could not report progress to FederatedJob %s/%s: %s", self.namespace, self.name, error)

    def stop(self) -> None:
        """Stops the thread after one last report, so that the final state is not lost."""
        self.stopping.set()
        self.thread.join()
        try:
            self.report_now()
        except Exception as error:  # noqa: BLE001
            log.warning("could not report the final progress to FederatedJob %s/%s: %s", self.namespace, self.name, error)
