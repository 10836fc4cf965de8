"""The server's round loop with every strategy, fast: the sites' ClientApp runs in this
process behind a stand-in for Flower's Grid. (The real thing, with Flower's processes over
TLS, is tests/test_local_run.py and tests/test_resume.py.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bouquet import flower
from bouquet.local import write_builtin_shares
from bouquet.schema import load_valid
from bouquet_workloads import client_app, outputs, server_app

STRATEGIES = {
    "FedAvg": {},
    "FedProx": {"proximalMu": 0.1},
    "FedAdam": {"serverLearningRate": 0.05},
    "FedYogi": {"serverLearningRate": 0.05},
    "FedAdagrad": {"serverLearningRate": 0.05},
    "FedAvgM": {"serverMomentum": 0.5},
    "FedMedian": {},
    "FedTrimmedAvg": {"trimFraction": 0.2},
    "Krum": {"byzantineSites": 0},
}


class InProcessGrid:
    """What the server loop needs of Flower's Grid, answering each message at once by
    calling the ClientApp with the destination site's context."""

    def __init__(self, job: dict, out: Path, files: dict[str, Path]) -> None:
        self.sites = {node: (name, path) for node, (name, path) in enumerate(files.items(), start=1)}
        self.run_config = flower.run_config(job, out)
        self.replies: dict[str, Message] = {}
        self.seen: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            name, path = self.sites[message.metadata.dst_node_id]
            context = Context(1, message.metadata.dst_node_id, {"site": name, "data-path": str(path)}, RecordDict(), self.run_config)
            self.seen.append(message)
            try:
                reply = client_app.app(message, context)
            except Exception as error:  # as Flower's site runtime reports a failed ClientApp
                reply = Message(Error(0, f"{type(error)}:<'{error}'>"), reply_to=message)
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Flower stamps messages with the identity of the process's task; a ServerApp
    process has one (run 1, task 1, the server's node 0); this test process plays it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def make_job(strategy: str, rounds: int = 2, **spec) -> dict:
    return load_valid(
        {
            "apiVersion": "bouquet.dev/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "rounds"},
            "spec": {
                "rounds": rounds,
                "strategy": {"name": strategy, **STRATEGIES[strategy]},
                "task": {"labelColumn": "diagnosis", "training": {"learningRate": 0.05, "momentum": 0.9}},
                "dataset": {"name": "breast-cancer"},
                "sites": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                **spec,
            },
        }
    )


def train(job: dict, out: Path) -> InProcessGrid:
    grid = InProcessGrid(job, out, write_builtin_shares(job, out / "data"))
    server_app.train_federated(grid, job, out)
    return grid


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_and_commits_each_round(strategy, tmp_path):
    train(make_job(strategy), tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2]
    assert all(sorted(e["sites"]) == ["a", "b", "c"] for e in history)
    model = json.loads((tmp_path / "model.json").read_text())
    assert model["strategy"] == strategy
    assert np.isfinite(model["metrics"]["loss"]) and model["metrics"]["accuracy"] > 0.5
    assert outputs.latest_checkpoint(tmp_path).round == 2


def test_fedprox_sends_its_proximal_term_to_the_sites(tmp_path):
    grid = train(make_job("FedProx", rounds=1), tmp_path)
    train_messages = [m for m in grid.seen if m.metadata.message_type == "train"]
    assert {float(m.content.config_records["config"]["proximal-mu"]) for m in train_messages} == {0.1}


def test_sites_evaluate_when_asked_and_auroc_is_weighted(tmp_path):
    job = make_job("FedAvg", rounds=1)
    assert job["spec"]["strategy"]["fractionEvaluate"] == 1
    train(job, tmp_path)
    [entry] = json.loads((tmp_path / "history.json").read_text())
    assert set(entry["siteEvaluation"]) == {"loss", "accuracy", "auroc"}
    assert entry["evaluatedOn"] == "held-out test set"  # the server's own test set comes first


@pytest.mark.parametrize("strategy", ["FedAdam", "FedAvgM"])
def test_resuming_continues_after_the_last_checkpoint_with_the_strategy_state(strategy, tmp_path):
    """Two rounds, then two more from the checkpoint, end where four uninterrupted rounds end."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_job(strategy, rounds=4), straight)
    train(make_job(strategy, rounds=2), resumed)
    grid = train(make_job(strategy, rounds=4), resumed)
    queries = [str(m.content.config_records["config"]["query"]) for m in grid.seen if m.metadata.message_type == "query"]
    assert queries == ["run-finished"] * 3  # no second feature query; the sites are told the end
    a = outputs.load_model_weights(straight)
    b = outputs.load_model_weights(resumed)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = json.loads((resumed / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2, 3, 4]


def test_a_round_with_no_usable_reply_fails_with_the_sites_reasons(tmp_path):
    job = make_job("FedAvg", rounds=1)
    grid = InProcessGrid(job, tmp_path, write_builtin_shares(job, tmp_path / "data"))
    for _name, path in grid.sites.values():
        path.write_text("nothing,useful\n1,2\n")
    with pytest.raises(server_app.RoundFailed, match="has no column"):
        server_app.train_federated(grid, job, tmp_path)
