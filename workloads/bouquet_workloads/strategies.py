"""Flower strategies from a job's `strategy` section, and the state they carry between rounds."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

# Weight every site's contribution by the number of examples it trained or evaluated on.
WEIGHT_KEY = "num-examples"
# The number of examples a site's AUROC was computed over (0 when its validation rows
# hold one class only, where AUROC is undefined).
AUROC_WEIGHT_KEY = "auroc-examples"
# A training message's config key that asks the site to evaluate the weights it is sent before
# it trains on them (one exchange per round, bouquet_workloads.server_app); the reply then
# carries that evaluation in its training metric record, each key prefixed with EVALUATION
# (a record of its own would be one more object, one more request on each hop of each reply),
# and the server takes those keys out before the strategy aggregates the training metrics.
EVALUATE_INCOMING, EVALUATION = "evaluate-incoming", "evaluation."


def with_evaluation(metrics: Mapping[str, float], evaluation: Mapping[str, float] | None) -> dict[str, float]:
    """A training reply's metrics with the evaluation of the weights it was sent beside them."""
    return {**metrics, **{EVALUATION + k: v for k, v in (evaluation or {}).items()}}


def take_evaluation(metrics: MetricRecord) -> dict[str, float] | None:
    """Takes the evaluation out of a training reply's metric record (with_evaluation): what
    is left is the training metrics alone. None when the reply carried none."""
    keys = [k for k in metrics if k.startswith(EVALUATION)]
    if not keys:
        return None
    evaluation = {k.removeprefix(EVALUATION): metrics[k] for k in keys}
    for k in keys:
        del metrics[k]
    return evaluation


# Strategy attributes that change from round to round: the optimiser moments of the
# adaptive strategies and FedAvgM's momentum. A checkpoint saves them so that a resumed
# run continues exactly where it stopped.
_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def aggregate_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means of the sites' metrics; AUROC over the sites that have one."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    total = sum(float(m[weight_key]) for m in records)
    out = MetricRecord()
    for key in records[0].keys():
        if key in (weight_key, AUROC_WEIGHT_KEY, "auroc") or isinstance(records[0][key], list):
            continue
        out[key] = sum(float(m[key]) * float(m[weight_key]) for m in records) / total
    auroc_total = sum(float(m.get(AUROC_WEIGHT_KEY, 0)) for m in records)
    if auroc_total > 0:
        out["auroc"] = sum(float(m["auroc"]) * float(m[AUROC_WEIGHT_KEY]) for m in records) / auroc_total
    return out


def make_strategy(spec: Mapping, num_sites: int) -> flwr_strategy.Strategy:
    """The Flower strategy a job's `strategy` section names, with its parameters."""
    name = spec["name"]
    min_sites = spec.get("minSites", num_sites)
    common = {
        "fraction_train": spec["fractionTrain"],
        "fraction_evaluate": spec["fractionEvaluate"],
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites if spec["fractionEvaluate"] > 0 else 0,
        # Bouquet decides when the run starts (roster.py): a round needs minSites sites.
        "min_available_nodes": min_sites,
        "weighted_by_key": WEIGHT_KEY,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    adaptive = {"tau": spec.get("tau", 1e-3)}
    moments = {"beta_1": spec.get("beta1", 0.9), "beta_2": spec.get("beta2", 0.99)}
    if name == "FedAvg":
        return flwr_strategy.FedAvg(**common)
    if name == "FedProx":
        return flwr_strategy.FedProx(**common, proximal_mu=spec["proximalMu"])
    if name == "FedAdam":
        return flwr_strategy.FedAdam(**common, eta=spec.get("serverLearningRate", 0.1), **moments, **adaptive)
    if name == "FedYogi":
        return flwr_strategy.FedYogi(**common, eta=spec.get("serverLearningRate", 0.01), **moments, **adaptive)
    if name == "FedAdagrad":
        return flwr_strategy.FedAdagrad(**common, eta=spec.get("serverLearningRate", 0.1), **adaptive)
    if name == "FedAvgM":
        return flwr_strategy.FedAvgM(
            **common,
            server_learning_rate=spec.get("serverLearningRate", 1.0),
            server_momentum=spec.get("serverMomentum", 0.9),
        )
    if name == "FedMedian":
        return flwr_strategy.FedMedian(**common)
    if name == "FedTrimmedAvg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=spec.get("trimFraction", 0.2))
    if name == "Krum":
        return flwr_strategy.Krum(**common, num_malicious_nodes=spec.get("byzantineSites", 0))
    raise ValueError(f"unknown strategy {name!r}")


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, np.ndarray]:
    """The strategy's round-to-round state as flat named arrays."""
    state: dict[str, np.ndarray] = {}
    for attribute in _STATE_ATTRIBUTES:
        value = getattr(strategy, attribute, None)
        if isinstance(value, dict):
            state.update({f"{attribute}.{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            state.update({f"{attribute}.{i}": np.asarray(v) for i, v in enumerate(value)})
    return state


def restore_strategy_state(strategy: flwr_strategy.Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Puts state saved by strategy_state back into a fresh strategy."""
    for attribute in _STATE_ATTRIBUTES:
        prefix = f"{attribute}."
        items = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not items:
            continue
        if attribute == "momentum_vector":
            setattr(strategy, attribute, [items[str(i)] for i in range(len(items))])
        else:
            setattr(strategy, attribute, items)
