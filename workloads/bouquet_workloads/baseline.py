"""The centralized baseline: the same model trained on all sites' training rows pooled in
one place, which federated learning exists to avoid. It is the yardstick for what the
federation gives up, and is only possible where every site's data is at hand (a local run
on demo or test data)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from . import datasets
from .tables import Table, read_task_table, split_rows
from .task import build_model, evaluate, feature_moments, set_standardization, site_seed, train


def centralized(job: Mapping, site_files: Mapping[str, Path]) -> dict:
    """Trains on the files of the sites in site_files (those that took part) for as many
    epochs as a site does over the whole run (rounds x local epochs)
    and evaluates where the federated model was evaluated: the held-out test set, or the
    sites' validation rows."""
    spec = job["spec"]
    task = spec["task"]
    fit_parts, check_parts = [], []
    for site in spec["sites"]:
        if site["name"] not in site_files:  # a site the run went ahead without
            continue
        table = read_task_table(site_files[site["name"]], task, site.get("data", {}).get("format"))
        kept, held = split_rows(len(table), task["training"]["validationFraction"], site_seed(spec["seed"], site["name"]))
        fit_parts.append(table.subset(kept))
        check_parts.append(table.subset(held))
    pooled = _concat(fit_parts)
    if "dataset" in spec:
        evaluation, evaluated_on = (
            datasets.split(spec["dataset"], [s["name"] for s in spec["sites"]], spec["seed"]).test,
            "held-out test set",
        )
    else:
        evaluation, evaluated_on = _concat(check_parts), "sites' validation data"
    model = build_model(task, pooled.features.shape[1], spec["seed"])
    moments = feature_moments(pooled)
    set_standardization(model, moments["count"][0], np.asarray(moments["sum"]), np.asarray(moments["sumsq"]))
    training = {**task["training"], "localEpochs": spec["rounds"] * task["training"]["localEpochs"]}
    train(model, pooled, training, seed=spec["seed"], device=torch.device("cpu"))
    return {**evaluate(model, evaluation, torch.device("cpu")), "evaluatedOn": evaluated_on, "trainingRows": len(pooled)}


def _concat(parts: list[Table]) -> Table:
    return Table(np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]))
