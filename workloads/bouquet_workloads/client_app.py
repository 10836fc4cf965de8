"""The site side of the built-in task, on Flower's ClientApp API.

A site reads one data file, its own, named in its node config (`data-path`), and sends
back only weights and metrics: its training rows never leave this process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

# torch.optim's first step imports torch._dynamo (about 1.5 s here); imported with this module,
# it is paid while the site's warm worker waits for its first message (it preloads this module).
import torch._dynamo  # noqa: F401
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import wire
from .outputs import REFUSED_RUNS
from .roster import DATA_CHECK
from .strategies import AUROC_WEIGHT_KEY, EVALUATE_INCOMING, WEIGHT_KEY, with_evaluation
from .tables import DataError, Table, read_task_table, split_rows
from .task import build_model, evaluate, feature_moments, load_arrays, pick_device, site_seed, state_arrays, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)
log = logging.getLogger("bouquet_workloads.site")

# Where `bouquet site` wants a file left when the run is over (unset elsewhere).
DONE_FILE_VARIABLE = "BOUQUET_SITE_DONE_FILE"

app = ClientApp()


@dataclass
class Site:
    """One site's view of the job: its settings and its own data."""

    job: dict
    name: str
    data_path: Path
    data_format: str | None
    refusals_path: Path | None = None  # the runs of other apps this site's SuperNode refused

    @classmethod
    def from_context(cls, context: Context) -> Site:
        """The site of a message's context. The site's warm worker (bouquet_workloads.worker)
        runs every message of a run in one process: the same job and node settings give the
        same Site, its data read once."""
        return _site(
            str(context.run_config["job"]),
            str(context.node_config["site"]),
            str(context.node_config["data-path"]),
            str(context.node_config.get("data-format", "")),
            str(context.node_config.get("refusals-path", "")),
        )

    def refused_runs(self) -> int:
        """How many runs of another app than the job's this site has refused (its SuperNode
        lists them, bouquet_workloads.supernode), for the server to count on the job."""
        if self.refusals_path is None or not self.refusals_path.exists():
            return 0
        return len(json.loads(self.refusals_path.read_text() or "[]"))

    @property
    def spec(self) -> dict:
        return self.job["spec"]

    @property
    def settings(self) -> dict:
        return next(s for s in self.spec["sites"] if s["name"] == self.name)

    @cached_property
    def seed(self) -> int:
        return site_seed(self.spec["seed"], self.name)

    @cached_property
    def data(self) -> tuple[Table, Table]:
        """(training rows, validation rows) of this site's file."""
        task = self.spec["task"]
        # Without task.features the file is one Bouquet wrote from a built-in dataset:
        # every column but the label, in the order the server's model expects.
        table = read_task_table(self.data_path, task, self.data_format)
        kept, held = split_rows(len(table), task["training"]["validationFraction"], self.seed)
        return table.subset(kept), table.subset(held)

    def model(self, arrays: ArrayRecord):
        """The job's model with the weights of a message (packed, bouquet_workloads.wire). One
        model per site, built once: each message's weights replace every parameter and buffer
        it holds (a large model's random initialisation took longer than its training)."""
        model = self._model
        torch.manual_seed(self.spec["seed"])  # the same random state for the message as a model built for it
        load_arrays(model, wire.unpack({k: v.numpy() for k, v in arrays.items()}, state_arrays(model)))
        return model

    @cached_property
    def _model(self):
        return build_model(self.spec["task"], self.data[0].features.shape[1], self.spec["seed"])


@lru_cache(maxsize=4)
def _site(job: str, name: str, data_path: str, data_format: str, refusals: str) -> Site:
    return Site(json.loads(job), name, Path(data_path), data_format or None, Path(refusals) if refusals else None)


def _reply(message: Message, site: Site, metrics: dict, arrays: dict[str, np.ndarray] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, REFUSED_RUNS: site.refused_runs()})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in wire.pack(arrays).items()})
    return Message(content=content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    site = Site.from_context(context)
    asked = message.content.config_records["config"]["query"]
    if asked == DATA_CHECK:
        content = _data_check(site)
    elif asked == "run-finished":
        # `bouquet site` watches for this file, then ends the site (its Kubernetes Job completes).
        done = os.environ.get(DONE_FILE_VARIABLE)
        if done:
            Path(done).touch()
        content = RecordDict({"site": ConfigRecord({"name": site.name})})
    else:
        raise ValueError(f"unknown query {asked!r}")
    return Message(content=content, reply_to=message)


def _data_check(site: Site) -> RecordDict:
    """The site's file read and checked before it trains: the feature moments the server
    scales inputs by, or what is wrong with the file. The problem as the server gets it
    names the file, the column and the row; the value at fault stays in this site's log."""
    identity = ConfigRecord({"name": site.name})
    try:
        rows = site.data[0]
    except DataError as error:
        log.error("site %s cannot train on its data: %s", site.name, error)
        return RecordDict({"check": ConfigRecord({"problem": error.without_value()}), "site": identity})
    return RecordDict({"moments": MetricRecord(feature_moments(rows)), "site": identity})


@app.train()
def train_site(message: Message, context: Context) -> Message:
    site = Site.from_context(context)
    config = message.content.config_records["config"]
    model = site.model(message.content.array_records["arrays"])
    device = pick_device(site.settings["gpus"])
    # The weights sent are the previous round's model: asked, the site evaluates them before
    # it trains, and the server completes that round with it (one exchange per round).
    evaluation = _evaluation(site, model, device) if int(config.get(EVALUATE_INCOMING, 0)) else None
    train_rows = site.data[0]
    loss = train(
        model,
        train_rows,
        site.spec["task"]["training"],
        seed=site.seed + int(config.get("server-round", 0)),
        device=device,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    return _reply(message, site, with_evaluation({"loss": loss, WEIGHT_KEY: len(train_rows)}, evaluation), state_arrays(model.cpu()))


@app.evaluate()
def evaluate_site(message: Message, context: Context) -> Message:
    site = Site.from_context(context)
    model = site.model(message.content.array_records["arrays"])
    return _reply(message, site, _evaluation(site, model, pick_device(site.settings["gpus"])))


def _evaluation(site: Site, model, device) -> dict:
    """The model's metrics on the site's validation rows."""
    rows = site.data[1]
    metrics = evaluate(model, rows, device)
    # Every reply carries the same keys (Flower's aggregation requires it); a site whose
    # validation rows hold one class gives AUROC no weight.
    metrics[AUROC_WEIGHT_KEY] = len(rows) if "auroc" in metrics else 0
    metrics.setdefault("auroc", 0.0)
    metrics[WEIGHT_KEY] = len(rows)
    return metrics
