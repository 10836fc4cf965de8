"""A site of stock Flower's run: trains on its file's training rows (the same split and
settings as Bouquet's sites) and evaluates on its validation rows. Flower starts a new
process for every message."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bouquet_workloads.tables import read_task_table, split_rows
from bouquet_workloads.task import build_model, evaluate, load_arrays, site_seed, state_arrays, train

app = ClientApp()


def _site(message: Message, context: Context):
    job = json.loads(Path(str(context.run_config["job-file"])).read_text())
    spec, site = job["spec"], str(context.node_config["site"])
    table = read_task_table(Path(str(context.node_config["data-path"])), spec["task"])
    kept, held = split_rows(len(table), spec["task"]["training"]["validationFraction"], site_seed(spec["seed"], site))
    model = build_model(spec["task"], table.features.shape[1], spec["seed"])
    load_arrays(model, {k: v.numpy() for k, v in message.content["arrays"].items()})
    return spec, site, model, table.subset(kept), table.subset(held)


@app.train()
def train_site(message: Message, context: Context) -> Message:
    spec, site, model, rows, _ = _site(message, context)
    loss = train(model, rows, spec["task"]["training"], seed=site_seed(spec["seed"], site), device=torch.device("cpu"))
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in state_arrays(model).items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"loss": loss, "num-examples": len(rows)})}), reply_to=message)


@app.evaluate()
def evaluate_site(message: Message, context: Context) -> Message:
    _, _, model, _, rows = _site(message, context)
    metrics = evaluate(model, rows, torch.device("cpu"))
    metrics.pop("auroc", None)  # absent where a site's rows hold one class: every reply needs the same keys
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(rows)})}), reply_to=message)
