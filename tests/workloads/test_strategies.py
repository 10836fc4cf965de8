import copy
import random
from fractions import Fraction

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.task_identity import TaskIdentity

from bouquet_workloads import outputs
from bouquet_workloads.strategies import (
    AUROC_WEIGHT_KEY,
    STREAMED,
    WEIGHT_KEY,
    RunningMean,
    aggregate_metrics,
    make_strategy,
    misfit,
    restore_strategy_state,
    strategy_state,
)

BASE = {"fractionTrain": 1.0, "fractionEvaluate": 1.0, "roundTimeoutSeconds": 600}


@pytest.mark.parametrize(
    ("name", "params", "cls", "attributes"),
    [
        ("FedAvg", {}, flwr_strategy.FedAvg, {}),
        ("FedProx", {"proximalMu": 0.3}, flwr_strategy.FedProx, {"proximal_mu": 0.3}),
        (
            "FedAdam",
            {"serverLearningRate": 0.2, "beta1": 0.8, "tau": 0.01},
            flwr_strategy.FedAdam,
            {"eta": 0.2, "beta_1": 0.8, "tau": 0.01},
        ),
        ("FedYogi", {}, flwr_strategy.FedYogi, {"eta": 0.01}),
        ("FedAdagrad", {}, flwr_strategy.FedAdagrad, {"eta": 0.1}),
        ("FedAvgM", {}, flwr_strategy.FedAvgM, {"server_learning_rate": 1.0, "server_momentum": 0.9}),
        ("FedMedian", {}, flwr_strategy.FedMedian, {}),
        ("FedTrimmedAvg", {"trimFraction": 0.1}, flwr_strategy.FedTrimmedAvg, {"beta": 0.1}),
        ("Krum", {"byzantineSites": 1}, flwr_strategy.Krum, {"num_malicious_nodes": 1}),
    ],
)
def test_each_strategy_is_flowers_with_the_jobs_parameters(name, params, cls, attributes):
    strategy = make_strategy({**BASE, "name": name, **params}, num_sites=4)
    assert type(strategy) is cls
    for attribute, value in attributes.items():
        assert getattr(strategy, attribute) == value


def test_minimum_sites_default_to_every_site_and_follow_the_spec():
    every = make_strategy({**BASE, "name": "FedAvg"}, num_sites=4)
    assert (every.min_train_nodes, every.min_evaluate_nodes, every.min_available_nodes) == (4, 4, 4)
    some = make_strategy({**BASE, "name": "FedAvg", "minSites": 2, "minSitesToStart": 3}, num_sites=4)
    # minSitesToStart is the roster's to enforce, before round 1; Flower's own wait for nodes
    # asks only minSites, or it would wait for ever on a site that dropped out mid-run.
    assert (some.min_train_nodes, some.min_available_nodes) == (2, 2)
    no_evaluation = make_strategy({**BASE, "name": "FedAvg", "fractionEvaluate": 0}, num_sites=4)
    assert no_evaluation.min_evaluate_nodes == 0


def reply(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_metrics_are_example_weighted_and_auroc_skips_sites_without_one():
    replies = [
        reply(loss=1.0, accuracy=0.5, auroc=0.6, **{AUROC_WEIGHT_KEY: 10, WEIGHT_KEY: 10}),
        reply(loss=0.0, accuracy=1.0, auroc=0.0, **{AUROC_WEIGHT_KEY: 0, WEIGHT_KEY: 30}),  # one class only
    ]
    result = aggregate_metrics(replies, WEIGHT_KEY)
    assert dict(result) == pytest.approx({"loss": 0.25, "accuracy": 0.875, "auroc": 0.6})


def test_no_auroc_when_no_site_has_one():
    result = aggregate_metrics([reply(loss=1.0, auroc=0.0, **{AUROC_WEIGHT_KEY: 0, WEIGHT_KEY: 5})], WEIGHT_KEY)
    assert dict(result) == {"loss": 1.0}


@pytest.fixture
def server_identity(monkeypatch):
    """Flower stamps messages with the identity of the process's task (a ServerApp's: run 1,
    the server's node 0); this test process plays it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class TwoSites:
    """What configure_train needs of Flower's Grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


START = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def train_round(strategy, round_: int, weights: dict, seed: int) -> dict:
    """One round as the server runs it: configure_train, then the sites' replies (the
    weights plus seeded noise, 10 and 30 examples) into aggregate_train. Like real sites,
    they reply in their model's key order (START's), whatever order they were sent."""
    record = ArrayRecord({k: Array(v) for k, v in weights.items()})
    messages = sorted(strategy.configure_train(round_, record, ConfigRecord(), TwoSites()), key=lambda m: m.metadata.dst_node_id)
    rng = np.random.default_rng(seed)
    replies = []
    for message, examples in zip(messages, [10, 30], strict=True):
        arrays = ArrayRecord({k: Array((weights[k] + rng.normal(size=weights[k].shape)).astype(np.float32)) for k in START})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"loss": 0.5, WEIGHT_KEY: examples})})
        replies.append(Message(content, reply_to=message))
    aggregated, _ = strategy.aggregate_train(round_, replies)
    return {k: v.numpy() for k, v in aggregated.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(
    ("name", "state_keys"),
    [
        ("FedAdam", {"m_t.w", "m_t.b", "v_t.w", "v_t.b"}),
        ("FedAvgM", {"momentum_vector.0", "momentum_vector.1"}),
    ],
)
def test_a_restored_strategy_aggregates_as_if_it_had_never_stopped(name, state_keys):
    spec = {**BASE, "name": name}
    running = make_strategy(spec, num_sites=2)
    weights = train_round(running, 1, START, seed=1)
    state = copy.deepcopy(strategy_state(running))  # as a checkpoint holds it: no shared arrays
    assert set(state) == state_keys

    resumed = make_strategy(spec, num_sites=2)
    restore_strategy_state(resumed, state)
    expected = train_round(running, 2, weights, seed=2)
    assert same(train_round(resumed, 2, weights, seed=2), expected)
    # Without the state the second round would come out otherwise: the state matters.
    assert not same(train_round(make_strategy(spec, num_sites=2), 2, weights, seed=2), expected)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(
    "name",
    [
        "FedAdam",
        "FedAvgM",
    ],
)
def test_a_strategy_resumed_from_a_checkpoint_aggregates_as_if_it_had_never_stopped(name, tmp_path):
    """What the server does on resume: the weights and the strategy state both come from the checkpoint."""
    spec = {**BASE, "name": name}
    running = make_strategy(spec, num_sites=2)
    weights = train_round(running, 1, START, seed=1)
    outputs.save_checkpoint(tmp_path, outputs.Checkpoint(1, weights, strategy_state(running)), keep=1)
    checkpoint = outputs.latest_checkpoint(tmp_path)

    resumed = make_strategy(spec, num_sites=2)
    restore_strategy_state(resumed, checkpoint.strategy_state)
    assert same(train_round(resumed, 2, checkpoint.weights, seed=2), train_round(running, 2, weights, seed=2))


def update(arrays: dict, examples) -> RecordDict:
    """A site's training reply: its arrays and its example count."""
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({WEIGHT_KEY: examples})})


def streamed(like: dict, updates: list[RecordDict]) -> dict:
    mean = RunningMean(like)
    for content in updates:
        assert misfit(like, content) is None, misfit(like, content)
        mean.add(content)
    return {k: v.numpy() for k, v in mean.mean().items()}


def test_the_running_mean_is_the_exact_mean_rounded_once_in_whatever_order_the_updates_arrive():
    """Eight sites' float32 updates spanning 40 orders of magnitude (where a float32 sum in
    another order comes out otherwise): the mean is the exact sum, rounded once to float64,
    divided by the examples and rounded to float32, bit for bit, for every order tried."""
    rng = np.random.default_rng(5)
    size = 3000
    sites = [
        ((rng.standard_normal(size) * 10.0 ** rng.integers(-20, 20, size)).astype(np.float32), int(rng.integers(1, 2**20)))
        for _ in range(8)
    ]
    like = {"float32": np.zeros(size, np.float32)}
    examples = sum(n for _, n in sites)
    exact = [sum(Fraction(float(x[i])) * n for x, n in sites) for i in range(size)]
    expected = np.array([float(s) / examples for s in exact], np.float64).astype(np.float32)
    orders = [list(range(8)), list(reversed(range(8)))] + [random.Random(seed).sample(range(8), 8) for seed in range(6)]
    for order in orders:
        got = streamed(like, [update({"float32": sites[i][0]}, sites[i][1]) for i in order])["float32"]
        assert np.array_equal(got, expected), (order, int(np.sum(got != expected)))
    # A float32 sum in site order, as Flower's aggregate makes it, is not order-free: the check can fail.
    in_order = sum((x * np.float32(n / examples) for x, n in sites), np.zeros(size, np.float32))
    backwards = sum((x * np.float32(n / examples) for x, n in reversed(sites)), np.zeros(size, np.float32))
    assert not np.array_equal(in_order, backwards)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", sorted(STREAMED))
def test_each_streamed_strategy_given_the_running_mean_aggregates_as_given_every_reply(name):
    """The server hands a streamed strategy the sites' mean as one reply of their total
    weight: FedAvg's aggregate of it is itself, and the adaptive and momentum strategies take
    their step from it as they would from every reply (to float32 rounding)."""
    spec = {**BASE, "name": name, "proximalMu": 0.1}
    weights = {"float32": np.linspace(-1, 1, 50, dtype=np.float32)}
    results = []
    for streaming in (False, True):
        strategy = make_strategy(spec, num_sites=2)
        for round_ in (1, 2):
            record = ArrayRecord({k: Array(v) for k, v in weights.items()})
            messages = sorted(strategy.configure_train(round_, record, ConfigRecord(), TwoSites()), key=lambda m: m.metadata.dst_node_id)
            rng = np.random.default_rng(round_)
            contents = [update({"float32": (weights["float32"] + rng.normal(size=50)).astype(np.float32)}, n) for n in (10, 30)]
            if streaming:
                mean = RunningMean(weights)
                for content in contents:
                    mean.add(content)
                one = RecordDict({"arrays": mean.mean(), "metrics": MetricRecord({WEIGHT_KEY: mean.examples})})
                aggregated, _ = strategy.aggregate_train(round_, [Message(one, reply_to=messages[0])])
            else:
                aggregated, _ = strategy.aggregate_train(round_, [Message(c, reply_to=m) for c, m in zip(contents, messages, strict=True)])
            weights = {k: v.numpy() for k, v in aggregated.items()}
        results.append(weights["float32"])
        weights = {"float32": np.linspace(-1, 1, 50, dtype=np.float32)}
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_an_update_that_does_not_fit_what_was_sent_is_named_and_not_added():
    like = {"float32": np.zeros(4, np.float32), "int64": np.zeros(2, np.int64)}
    fits = {"float32": np.ones(4, np.float32), "int64": np.array([3, 4])}
    mean = RunningMean(like)
    assert misfit(like, update(fits, 7)) is None
    cases = {
        "arrays ['float32'], not the ['float32', 'int64'] it was sent": update({"float32": fits["float32"]}, 7),
        "array float32 is float32[5], not the float32[4] it was sent": update({**fits, "float32": np.ones(5, np.float32)}, 7),
        "array float32 is float64[4], not the float32[4] it was sent": update({**fits, "float32": np.ones(4)}, 7),
        f"{WEIGHT_KEY} 0 in 1 metric records, not a positive number in 1": update(fits, 0),
        f"{WEIGHT_KEY} -3.0 in 1 metric records, not a positive number in 1": update(fits, -3.0),
        f"{WEIGHT_KEY} nan in 1 metric records, not a positive number in 1": update(fits, float("nan")),
        f"{WEIGHT_KEY} inf in 1 metric records, not a positive number in 1": update(fits, float("inf")),
    }
    for why, content in cases.items():
        assert misfit(like, content) == why
    two = update(fits, 7)
    two["more"] = ArrayRecord({"x": Array(np.ones(1, np.float32))})
    assert misfit(like, two) == "2 array records, not 1"
    # Integer arrays come back rounded, in their own dtype.
    mean.add(update(fits, 1))
    mean.add(update({"float32": np.zeros(4, np.float32), "int64": np.array([4, 4])}, 1))
    result = {k: v.numpy() for k, v in mean.mean().items()}
    assert result["int64"].dtype == np.int64 and result["int64"].tolist() == [4, 4]  # 3.5 rounds to even
    assert result["float32"].tolist() == [0.5] * 4
