"""The server of stock Flower's run: FedAvg.start with the job's rounds, its sites and its
held-out test set scored after each round (as Bouquet's server does). It writes when each
round began and ended to out-file, from which the benchmark takes the round times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bouquet_workloads import datasets
from bouquet_workloads.tables import read_task_table
from bouquet_workloads.task import build_model, evaluate, feature_moments, load_arrays, set_standardization, state_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = json.loads(Path(str(context.run_config["job-file"])).read_text())
    data = Path(str(context.run_config["data-dir"]))
    out = Path(str(context.run_config["out-file"]))
    spec = job["spec"]
    task = spec["task"]
    sites = [s["name"] for s in spec["sites"]]
    features = datasets.describe(spec["dataset"]["name"])[0]
    model = build_model(task, len(features), spec["seed"])
    # The input scaling from the sites' files, as Bouquet's sites report it.
    moments = [feature_moments(read_task_table(data / f"{site}.csv", task)) for site in sites]
    count = sum(m["count"][0] for m in moments)
    set_standardization(model, count, *(np.sum([m[k] for m in moments], axis=0) for k in ("sum", "sumsq")))
    test = datasets.split(spec["dataset"], sites, spec["seed"]).test
    times: list[dict] = []

    def score(round_: int, arrays: ArrayRecord) -> MetricRecord:
        began = time.monotonic()
        if round_ > 0:
            times[-1]["ended"] = began
        load_arrays(model, {k: v.numpy() for k, v in arrays.items()})
        metrics = evaluate(model, test, torch.device("cpu"))
        times.append({"round": round_ + 1, "began": time.monotonic()})
        return MetricRecord(metrics)

    fraction_evaluate = float(spec["strategy"]["fractionEvaluate"])
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=len(sites),
        min_evaluate_nodes=len(sites) if fraction_evaluate else 0,
        min_available_nodes=len(sites),
    )
    initial = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state_arrays(model).items()})
    result = strategy.start(grid, initial, num_rounds=spec["rounds"], evaluate_fn=score)
    out.write_text(json.dumps({"rounds": times[:-1], "metrics": dict(result.evaluate_metrics_serverapp.get(spec["rounds"], {}))}))
