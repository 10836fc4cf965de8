"""Flower strategies from a job's `strategy` section, and the state they carry between rounds."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
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


# The strategies whose aggregate is the example-weighted mean of the sites' updates (FedAvg's),
# to which the adaptive and momentum ones then apply a server step of their own. Under them the
# server adds each site's update to a RunningMean as it arrives and lets its arrays go, so the
# server's memory does not grow with the number of sites. FedMedian, FedTrimmedAvg and Krum
# need every update at once: the server keeps every reply until the round's last is in.
STREAMED = frozenset({"FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"})

_CHUNK = 1 << 18  # elements summed at a time: the scratch arrays stay a few MB whatever the model


def misfit(like: Mapping[str, np.ndarray], content: RecordDict) -> str | None:
    """Why a training reply's content is no update of the arrays sent (like), None when it is
    one: one array record holding those arrays, of the same shapes and dtypes, and a
    positive, finite example count."""
    records = content.array_records
    if len(records) != 1:
        return f"{len(records)} array records, not 1"
    arrays = next(iter(records.values()))
    if set(arrays) != set(like):
        return f"arrays {sorted(arrays)}, not the {sorted(like)} it was sent"
    for key, value in like.items():
        shape, dtype, array = np.shape(value), np.asarray(value).dtype, arrays[key]
        if tuple(array.shape) != tuple(shape) or array.dtype != dtype.name:
            return f"array {key} is {array.dtype}{list(array.shape)}, not the {dtype.name}{list(shape)} it was sent"
    metrics = content.metric_records
    examples = next(iter(metrics.values())).get(WEIGHT_KEY) if len(metrics) == 1 else None
    if isinstance(examples, bool) or not isinstance(examples, int | float) or not math.isfinite(examples) or examples <= 0:
        return f"{WEIGHT_KEY} {examples!r} in {len(metrics)} metric records, not a positive number in 1"
    return None


class RunningMean:
    """The example-weighted mean of the sites' updates, added one reply at a time as each
    arrives, and the same to the last bit whatever order they arrive in.

    A float32 value times a site's example count (an integer below 2**29) is exact in float64:
    24 significant bits and at most 29 more. The products are summed as the unevaluated pair
    hi + lo, each addition by Knuth's TwoSum, which loses nothing: hi + lo is the exact sum
    but for lo's own roundings, some 2**-100 of it. The mean rounds that sum once, at the end,
    so neither the order of the replies nor the split between hi and lo (which do depend on
    it) shows in the weights. Memory: two float64 arrays the size of the model, whatever the
    number of sites."""

    def __init__(self, like: Mapping[str, np.ndarray]) -> None:
        """like: the arrays sent (their keys, shapes and dtypes are what a reply must hold)."""
        self.like = {k: (np.shape(v), np.asarray(v).dtype) for k, v in like.items()}
        self.hi = {k: np.zeros(math.prod(shape), np.float64) for k, (shape, _) in self.like.items()}
        self.lo = {k: np.zeros(math.prod(shape), np.float64) for k, (shape, _) in self.like.items()}
        self.examples = 0.0
        self.nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.like.values())  # of an update
        self._scratch = (np.empty(_CHUNK), np.empty(_CHUNK), np.empty(_CHUNK))

    def add(self, content: RecordDict) -> None:
        """Adds a reply's arrays, weighted by its example count (check it with misfit first)."""
        examples = float(next(iter(content.metric_records.values()))[WEIGHT_KEY])
        arrays = next(iter(content.array_records.values()))
        for key in self.like:
            flat = arrays[key].numpy().reshape(-1)
            hi, lo = self.hi[key], self.lo[key]
            for start in range(0, flat.size, _CHUNK):
                end = min(start + _CHUNK, flat.size)
                t, s, b = (a[: end - start] for a in self._scratch)
                h, low = hi[start:end], lo[start:end]
                np.multiply(flat[start:end], examples, out=t, dtype=np.float64)  # exact: computed in float64
                # TwoSum: s = h + t, and h + t - s exactly, added to low.
                np.add(h, t, out=s)
                np.subtract(s, h, out=b)  # the part of t that went into s
                np.subtract(t, b, out=t)  # t's part left out
                np.subtract(s, b, out=b)
                np.subtract(h, b, out=b)  # h's part left out
                np.add(b, t, out=b)
                np.add(low, b, out=low)
                np.copyto(h, s)
        self.examples += examples

    def mean(self) -> ArrayRecord:
        """The mean so far, in the dtypes sent (integer arrays rounded), as an ArrayRecord.
        It uses up the sums: call it once, when the last reply is in."""
        out = {}
        for key, (shape, dtype) in self.like.items():
            total = np.add(self.hi[key], self.lo[key], out=self.hi[key])  # the exact sum, rounded once
            total /= self.examples
            if dtype.kind != "f":
                np.rint(total, out=total)
            out[key] = Array(total.astype(dtype).reshape(shape))
            self.hi[key] = self.lo[key] = np.empty(0)
        return ArrayRecord(array_dict=out)


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
