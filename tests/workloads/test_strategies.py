import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from bouquet_workloads.strategies import AUROC_WEIGHT_KEY, WEIGHT_KEY, aggregate_metrics, make_strategy

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
    assert (some.min_train_nodes, some.min_available_nodes) == (2, 3)
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
