"""The server's round loop with every strategy, fast: the sites' ClientApp runs in this
process behind a stand-in for Flower's Grid. (The real thing, with Flower's processes over
TLS, is tests/workloads/test_local_run.py and tests/workloads/test_resume.py.)"""

from __future__ import annotations

import copy
import csv
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from bouquet.schema import load_valid
from bouquet_workloads import client_app, datasets, flower, outputs, server_app
from bouquet_workloads import roster as roster_module
from bouquet_workloads.local import write_builtin_shares
from bouquet_workloads.roster import Roster

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

    def __init__(self, job: dict, out: Path, files: dict[str, Path], nodes: list[int] | None = None, newest_first: bool = False) -> None:
        # Flower's node 1 is the SuperLink itself (SUPERLINK_NODE_ID): SuperNodes get others.
        self.sites = {node: (name, path) for node, (name, path) in zip(nodes or range(101, 101 + len(files)), files.items(), strict=True)}
        self.run_config = flower.run_config(job, out, "claims")
        self.replies: dict[str, Message] = {}
        self.seen: list[Message] = []
        self.newest_first = newest_first  # replies in another order than the messages went out
        self.fail_from: dict[str, int] = {}  # site -> the round from which its training fails
        self.stop_at: int | None = None  # the round whose training messages stop the server (SIGTERM)
        # site -> the round whose first training message finds it gone (0: its data check)
        self.away_once: dict[str, int] = {}
        self.refusals: dict[str, Path] = {}  # site -> the file its SuperNode lists refused runs in
        self.misfit: set[str] = set()  # sites whose training replies hold an array one value short
        self.pulled: list[Message] = []  # every reply the server pulled, as it holds it after the run

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages) -> list[str]:
        rounds = {int(m.content.config_records.get("config", {}).get("server-round", 0)) for m in messages}
        if self.stop_at is not None and self.stop_at in rounds:
            raise SystemExit(0)  # what Flower's signal handler does in a ServerApp told to stop
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            name, path = self.sites[message.metadata.dst_node_id]
            node_config = {
                "site": name,
                "data-path": str(path),
                **({"refusals-path": str(self.refusals[name])} if name in self.refusals else {}),
            }
            context = Context(1, message.metadata.dst_node_id, node_config, RecordDict(), self.run_config)
            self.seen.append(message)
            try:
                config = message.content.config_records.get("config", {})
                if message.metadata.message_type == "train" and int(config.get("server-round", 0)) >= self.fail_from.get(name, 10**9):
                    raise RuntimeError(f"site {name} went away")
                round_ = int(config.get("server-round", 0)) if message.metadata.message_type == "train" else 0
                if round_ == self.away_once.get(name):
                    # The site's node went offline (its pod restarted): the SuperLink answers for it.
                    del self.away_once[name]
                    reply = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
                else:
                    reply = client_app.app(message, context)
                if name in self.misfit and message.metadata.message_type == "train" and not reply.has_error():
                    arrays = reply.content["arrays"]
                    for key in arrays:
                        arrays[key] = Array(arrays[key].numpy()[:-1])
            except Exception as error:  # as Flower's site runtime reports a failed ClientApp
                reply = Message(Error(0, f"{type(error)}:<'{error}'>"), reply_to=message)
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        found = [self.replies.pop(i) for i in list(ids) if i in self.replies]
        self.pulled += found
        return found[::-1] if self.newest_first else found


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Flower stamps messages with the identity of the process's task; a ServerApp
    process has one (run 1, task 1, the server's node 0); this test process plays it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def make_job(strategy: str, rounds: int = 2, settings: dict | None = None, **spec) -> dict:
    return load_valid(
        {
            "apiVersion": "bouquet.dev/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "rounds"},
            "spec": {
                "rounds": rounds,
                "strategy": {"name": strategy, **STRATEGIES[strategy], **(settings or {})},
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
    assert queries == ["data-check"] * 3 + ["run-finished"] * 3  # each site is checked again, then told the end
    a = outputs.load_model_weights(straight)
    b = outputs.load_model_weights(resumed)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = json.loads((resumed / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2, 3, 4]


def sites_and_files(job: dict, out: Path) -> dict[str, Path]:
    return write_builtin_shares(job, out / "data")


def break_file(path: Path, row: int, column: str, value: str) -> None:
    """Puts value in one cell of a CSV file (row counted from 1 after the header)."""
    rows = list(csv.reader(path.read_text().splitlines()))
    rows[row][rows[0].index(column)] = value
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def nothing_written(out: Path) -> bool:
    return not any((out / name).exists() for name in ("model.safetensors", "model.json", "history.json", "checkpoints"))


def test_a_sites_bad_data_stops_the_run_before_round_1_naming_site_column_and_row(tmp_path):
    job = make_job("FedAvg", rounds=1)
    files = sites_and_files(job, tmp_path)
    break_file(files["b"], 7, "mean_radius", "Jane Roe")
    grid = InProcessGrid(job, tmp_path, files)
    with pytest.raises(server_app.SitesNotReady) as stopped:
        server_app.train_federated(grid, job, tmp_path)
    message = str(stopped.value)
    assert message.startswith("the run cannot start: site b: ")
    assert "column 'mean_radius', row 7: the value is not a number (the value is in the site's log)" in message
    assert "2 of 3 sites passed their data check and strategy.minSitesToStart is 3 (the default: every site)" in message
    assert "Jane Roe" not in message  # a value of a site's data never reaches the server
    assert [m.metadata.message_type for m in grid.seen] == ["query"] * 3  # nobody was asked to train
    assert nothing_written(tmp_path)


def test_a_site_whose_file_lacks_the_label_column_is_named(tmp_path):
    job = make_job("FedAvg", rounds=1)
    files = sites_and_files(job, tmp_path)
    files["c"].write_text("mean_radius,outcome\n1,0\n")
    with pytest.raises(server_app.SitesNotReady, match=r"site c: .*c\.csv: no column .*'diagnosis' \(the file has: mean_radius, outcome\)"):
        server_app.train_federated(InProcessGrid(job, tmp_path, files), job, tmp_path)
    assert nothing_written(tmp_path)


def test_min_sites_to_start_lets_the_run_go_ahead_without_a_failing_site(tmp_path):
    job = make_job("FedAvg", rounds=2, settings={"minSites": 2, "minSitesToStart": 2})
    files = sites_and_files(job, tmp_path)
    break_file(files["a"], 3, "diagnosis", "maybe")
    grid = InProcessGrid(job, tmp_path, files)
    server_app.train_federated(grid, job, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["sites"] for e in history] == [["b", "c"], ["b", "c"]]
    trained = {grid.sites[m.metadata.dst_node_id][0] for m in grid.seen if m.metadata.message_type == "train"}
    assert trained == {"b", "c"}


def test_a_site_dropping_out_mid_run_stops_it_unless_min_sites_allows(tmp_path):
    job = make_job("FedAvg", rounds=3)
    grid = InProcessGrid(job, tmp_path / "every", sites_and_files(job, tmp_path / "every"))
    grid.fail_from["b"] = 2
    with pytest.raises(
        server_app.RoundFailed,
        match=r"round 2: 2 of the 3 sites asked returned an update \(not b: .*site b went away.*\), fewer than strategy.minSites \(3\)",
    ):
        server_app.train_federated(grid, job, tmp_path / "every")
    assert [e["round"] for e in json.loads((tmp_path / "every" / "history.json").read_text())] == [1]
    assert not (tmp_path / "every" / "model.json").exists()

    job = make_job("FedAvg", rounds=3, settings={"minSites": 2})
    grid = InProcessGrid(job, tmp_path / "two", sites_and_files(job, tmp_path / "two"))
    grid.fail_from["b"] = 2
    server_app.train_federated(grid, job, tmp_path / "two")
    assert [e["sites"] for e in json.loads((tmp_path / "two" / "history.json").read_text())] == [["a", "b", "c"], ["a", "c"], ["a", "c"]]


def test_under_a_streamed_strategy_the_server_keeps_no_sites_arrays_and_under_fedmedian_all_until_the_round_ends(tmp_path):
    """Memory flat in the number of sites: under FedAvg each update is added to the running
    mean as it is pulled and its arrays let go; FedMedian needs them all at once."""
    for strategy, kept in (("FedAvg", False), ("FedMedian", True)):
        grid = train(make_job(strategy), tmp_path / strategy)
        updates = [r for r in grid.pulled if not r.has_error() and r.metadata.message_type == "train"]
        assert len(updates) == 2 * 3
        assert all(("arrays" in r.content) is kept for r in updates), strategy


@pytest.mark.parametrize("strategy", ["FedAvg", "FedMedian"])
def test_an_update_that_does_not_fit_the_model_is_left_out_naming_the_site(strategy, tmp_path):
    """A site whose update is not the shape of the weights it was sent (a bug, or worse): the
    server leaves it out, streamed or not, and names it; with minSites to spare the run goes on."""
    job = make_job(strategy, rounds=2)
    grid = InProcessGrid(job, tmp_path / "every", sites_and_files(job, tmp_path / "every"))
    grid.misfit.add("b")
    with pytest.raises(
        server_app.RoundFailed,
        match=r"round 1: 2 of the 3 sites asked returned an update \(not b: b's update does not fit: array float32 is "
        r"float32\[\d+\], not the float32\[\d+\] it was sent\), fewer than strategy.minSites \(3\)",
    ):
        server_app.train_federated(grid, job, tmp_path / "every")
    assert not (tmp_path / "every" / "model.json").exists()

    job = make_job(strategy, rounds=2, settings={"minSites": 2})
    grid = InProcessGrid(job, tmp_path / "two", sites_and_files(job, tmp_path / "two"))
    grid.misfit.add("b")
    server_app.train_federated(grid, job, tmp_path / "two")
    assert [e["sites"] for e in json.loads((tmp_path / "two" / "history.json").read_text())] == [["a", "c"], ["a", "c"]]


def test_a_site_whose_node_goes_away_mid_round_has_the_round_start_again_without_a_failure(tmp_path):
    """A site's pod restarted mid-round (a removed site's neighbours restart with the new
    spec): the SuperLink answers in the site's place; that is no failure of the round, which
    starts again from the same weights once the site is back, and is committed once."""
    job = make_job("FedAvg", rounds=3)
    grid = InProcessGrid(job, tmp_path, sites_and_files(job, tmp_path))
    grid.away_once["b"] = 2
    server_app.train_federated(grid, job, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(e["round"], e["sites"]) for e in history] == [(r, ["a", "b", "c"]) for r in (1, 2, 3)]
    trained = [m.metadata.dst_node_id for m in grid.seen if m.metadata.message_type == "train"]
    assert len(trained) == 3 * 3 + 3, "round 2 was sent out twice"
    reference = tmp_path / "reference"
    server_app.train_federated(InProcessGrid(job, reference, sites_and_files(job, reference)), job, reference)
    assert json.loads((tmp_path / "model.json").read_text())["sha256"] == json.loads((reference / "model.json").read_text())["sha256"]


def test_a_site_whose_node_goes_away_before_its_data_check_is_asked_again_not_refused(tmp_path):
    """The server restarted with its sites (a spec change), and its state still counts a
    site's old SuperNode online: the SuperLink answers the data check in its place. That is no
    verdict on the site, which is asked again and takes part in every round."""
    job = make_job("FedAvg", rounds=2)
    grid = InProcessGrid(job, tmp_path, sites_and_files(job, tmp_path))
    grid.away_once["b"] = 0
    server_app.train_federated(grid, job, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(e["round"], e["sites"]) for e in history] == [(1, ["a", "b", "c"]), (2, ["a", "b", "c"])]
    checks = [
        grid.sites[m.metadata.dst_node_id][0]
        for m in grid.seen
        if m.metadata.message_type == "query" and m.content.config_records["config"].get("query") == roster_module.DATA_CHECK
    ]
    assert sorted(checks) == ["a", "b", "b", "c"], "b's data check was sent again once its node was back"


def test_a_site_that_refused_runs_of_other_apps_says_so_and_the_round_records_it(tmp_path):
    job = make_job("FedAvg", rounds=2)
    grid = InProcessGrid(job, tmp_path, sites_and_files(job, tmp_path))
    grid.refusals = {"a": tmp_path / "a-refused.json", "b": tmp_path / "b-refused.json"}
    grid.refusals["a"].write_text(json.dumps([{"run": 7, "appSha256": "f" * 64, "at": 0}, {"run": 8, "appSha256": "e" * 64, "at": 0}]))
    server_app.train_federated(grid, job, tmp_path)  # b's file does not exist: it refused nothing
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e.get("refusedRuns") for e in history] == [{"a": 2}, {"a": 2}]
    assert outputs.refused_runs(history) == {"a": 2}


def test_a_saved_training_that_left_out_a_required_site_is_not_continued(tmp_path):
    job = make_job("FedAvg", rounds=2, settings={"minSites": 2})
    grid = InProcessGrid(job, tmp_path, sites_and_files(job, tmp_path))
    grid.fail_from["b"] = 2
    server_app.train_federated(grid, job, tmp_path)  # round 2 without b: allowed by minSites 2
    stricter = make_job("FedAvg", rounds=3)  # every site, from now on
    with pytest.raises(server_app.SitesNotReady) as refused:
        server_app.train_federated(InProcessGrid(stricter, tmp_path, sites_and_files(stricter, tmp_path)), stricter, tmp_path)
    assert str(refused.value).startswith(
        "round 2 of the saved training was trained without b (only a, c took part), and strategy.minSites is 3 (the default: every site)"
    )
    assert [e["round"] for e in json.loads((tmp_path / "history.json").read_text())] == [1, 2]


def test_a_node_is_the_site_it_claims_only_once_and_only_if_the_job_has_it(tmp_path):
    job = make_job("FedAvg", rounds=1, settings={"minSites": 2})
    files = sites_and_files(job, tmp_path)
    grid = InProcessGrid(job, tmp_path, {**files, "intruder": files["a"]}, nodes=[1, 2, 3, 4])
    grid.sites[4] = ("a", files["a"])  # a second node saying it is site a
    grid.sites[5] = ("z", files["a"])  # a node naming a site the job does not have
    server_app.train_federated(grid, job, tmp_path)
    [entry] = json.loads((tmp_path / "history.json").read_text())
    assert entry["sites"] == ["b", "c"]  # neither node that says it is a can be told from an impostor
    trained = sorted(m.metadata.dst_node_id for m in grid.seen if m.metadata.message_type == "train")
    assert trained == [2, 3]
    # Once a site holds its name, a newcomer claiming it is turned away, and the site stays.
    roster = Roster(
        grid, job["spec"], lambda messages, timeout, gone=None: server_app._exchange(grid, messages, timeout, gone), lambda *_: None
    )
    del grid.sites[4], grid.sites[5]
    roster.check([1, 2, 3])
    grid.sites[6] = ("a", files["a"])
    roster.check([6])
    assert roster.names == {1: "a", 2: "b", 3: "c"}
    assert roster.refused == {6: "node 6 says it is site a, which is connected already"}


def test_with_registered_keys_a_site_is_the_owner_of_its_key_whatever_it_says(tmp_path):
    job = make_job("FedAvg", rounds=1, settings={"minSites": 2})
    files = sites_and_files(job, tmp_path)
    grid = InProcessGrid(job, tmp_path, files, nodes=[1, 2, 3])
    grid.sites[4] = ("a", files["a"])  # says it is site a, holds no registered key
    grid.sites[3] = ("a", files["c"])  # holds site c's key, says it is site a
    (tmp_path / "nodes.json").write_text(json.dumps({str(n): {"site": s, "keySha256": "-"} for n, s in [(1, "a"), (2, "b"), (3, "c")]}))
    server_app.train_federated(grid, job, tmp_path, "keys")
    [entry] = json.loads((tmp_path / "history.json").read_text())
    assert entry["sites"] == ["a", "b"]
    trained = sorted(m.metadata.dst_node_id for m in grid.seen if m.metadata.message_type == "train")
    assert trained == [1, 2]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Succeeded"
    roster = Roster(
        grid,
        job["spec"],
        lambda messages, timeout, gone=None: server_app._exchange(grid, messages, timeout, gone),
        lambda *_: None,
        lambda: {1: "a", 2: "b", 3: "c"},
    )
    roster.check([3, 4])
    assert roster.refused == {
        3: "node 3 holds site c's key but says it is site 'a': it takes no part",
        4: "node 4 holds no key of the job's sites (its key was removed or replaced)",
    }


def test_the_same_job_gives_the_same_weights_whatever_the_node_ids_and_reply_order(tmp_path):
    job = make_job("FedAvg", rounds=2, settings={"fractionTrain": 0.67})
    first, second = tmp_path / "first", tmp_path / "second"
    server_app.train_federated(InProcessGrid(job, first, sites_and_files(job, first)), job, first)
    grid = InProcessGrid(job, second, sites_and_files(job, second), nodes=[9001, 17, 4242], newest_first=True)
    server_app.train_federated(grid, job, second)
    assert [e["sites"] for e in json.loads((first / "history.json").read_text())] == [
        e["sites"] for e in json.loads((second / "history.json").read_text())
    ]
    assert json.loads((first / "model.json").read_text())["sha256"] == json.loads((second / "model.json").read_text())["sha256"]


def stopped_as_round_goes_out(job: dict, out: Path, files: dict[str, Path], round_: int) -> Context:
    """Runs the job's ServerApp until it is told to stop (SIGTERM) as round_'s training
    messages go out; returns the run's context, for a successor to continue with."""
    context = Context(1, 0, {}, RecordDict(), flower.run_config(job, out, "claims"))
    grid = InProcessGrid(job, out, files)
    grid.stop_at = round_
    with pytest.raises(SystemExit):
        server_app.main(grid, context)
    return context


def test_a_server_told_to_stop_records_no_failure_and_its_successor_continues(tmp_path):
    """A deleted server pod's ServerApp gets SIGTERM mid-round: that is no failure of the
    training (the job's status must not read Failed), and a new server picks up."""
    job = make_job("FedAvg", rounds=3)
    files = sites_and_files(job, tmp_path)
    context = stopped_as_round_goes_out(job, tmp_path, files, 2)
    assert json.loads((tmp_path / "progress.json").read_text())["state"] == "Running"
    server_app.main(InProcessGrid(job, tmp_path, files), context)
    assert [e["round"] for e in json.loads((tmp_path / "history.json").read_text())] == [1, 2, 3]
    assert json.loads((tmp_path / "progress.json").read_text())["state"] == "Succeeded"


def test_a_failing_training_is_recorded_as_failed_with_its_reason(tmp_path):
    job = make_job("FedAvg", rounds=1)
    files = sites_and_files(job, tmp_path)
    files["a"].write_text("nothing\n1\n")
    with pytest.raises(server_app.SitesNotReady):
        server_app.main(InProcessGrid(job, tmp_path, files), Context(1, 0, {}, RecordDict(), flower.run_config(job, tmp_path, "claims")))
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "Failed" and progress["message"].startswith("the run cannot start: site a: ")


def test_with_a_site_to_spare_the_run_waits_for_the_one_still_connecting(tmp_path):
    """minSitesToStart 2 of 3: site a fails its check while c has not connected yet; the run
    starts once c has connected and passed, not at a's failure."""
    job = make_job("FedAvg", rounds=1, settings={"minSites": 2, "minSitesToStart": 2})
    files = sites_and_files(job, tmp_path)
    break_file(files["a"], 3, "diagnosis", "maybe")
    grid = InProcessGrid(job, tmp_path, files)
    late = grid.sites.pop(103)  # site c's node
    asked = []

    def get_node_ids() -> list[int]:
        asked.append(1)
        if len(asked) > 20:  # c connects a moment later
            grid.sites[103] = late
        return list(grid.sites)

    grid.get_node_ids = get_node_ids
    server_app.train_federated(grid, job, tmp_path)
    [entry] = json.loads((tmp_path / "history.json").read_text())
    assert entry["sites"] == ["b", "c"]


def own_data_job(rounds: int) -> tuple[dict, dict]:
    """A job whose sites bring their own files (the built-in shares, written out) and whose
    server holds no test set: its rounds are scored by the sites' evaluation alone."""
    job = make_job("FedAvg", rounds=rounds)
    own = copy.deepcopy(job)  # as its sites' files are here: their data settings say nothing more to the server
    own["spec"]["task"]["features"] = datasets.describe(own["spec"].pop("dataset")["name"])[0]
    return job, own


def test_one_exchange_a_round_evaluates_every_rounds_model_as_an_exchange_of_its_own_does(tmp_path, monkeypatch):
    """Site evaluation on (every site trains and evaluates): each training message also asks
    for the evaluation of the model it carries, which completes the previous round's entry, and
    the final model is evaluated alone at the end: 3 rounds in 4 exchanges, not 6. The weights
    and every round's site evaluation are those of a separate evaluation exchange per round."""
    with_dataset, job = own_data_job(rounds=3)
    assert server_app.evaluates_ahead(job["spec"])
    runs = {}
    for ahead in (True, False):
        monkeypatch.setattr(server_app, "evaluates_ahead", lambda spec, ahead=ahead: ahead)
        out = tmp_path / str(ahead)
        grid = InProcessGrid(job, out, sites_and_files(with_dataset, out))
        server_app.train_federated(grid, job, out)
        types = [m.metadata.message_type for m in grid.seen if m.metadata.message_type != "query"]
        runs[ahead] = (types, json.loads((out / "history.json").read_text()), json.loads((out / "model.json").read_text()))
    (types, history, model), (separate_types, separate_history, separate_model) = runs[True], runs[False]
    assert types == ["train"] * 9 + ["evaluate"] * 3
    assert separate_types == (["train"] * 3 + ["evaluate"] * 3) * 3
    assert model["sha256"] == separate_model["sha256"]  # evaluating first changes nothing of the training
    assert [e["round"] for e in history] == [1, 2, 3]
    for entry, separate in zip(history, separate_history, strict=True):
        assert entry["evaluatedOn"] == separate["evaluatedOn"] == "sites' validation data"
        assert set(entry["siteEvaluation"]) == {"loss", "accuracy", "auroc"}
        for key in ("loss", "accuracy", "auroc"):
            assert entry["siteEvaluation"][key] == pytest.approx(separate["siteEvaluation"][key], abs=1e-9)
            assert entry[key] == pytest.approx(separate[key], abs=1e-9)
    assert model["metrics"] == pytest.approx(separate_model["metrics"])
    # The model goes out once a round instead of twice, and the final one once more.
    once = separate_history[0]["bytesSent"] // 2
    assert [e["bytesSent"] for e in history] == [once, once, 2 * once]
    # Every reply carried the evaluation beside the training metrics; the audit lists both.
    audit = [json.loads(line) for line in (tmp_path / "True" / "audit.jsonl").read_text().splitlines()]
    asked = [e for e in audit if e["phase"] == "train" and e["round"] > 1]
    assert asked and all(e["metrics"]["metrics"]["evaluation.accuracy"] == "float" for e in asked)
    assert all(
        not any(k.startswith("evaluation.") for k in e["metrics"]["metrics"]) for e in audit if e["phase"] == "train" and e["round"] == 1
    )


def test_a_round_committed_before_its_evaluation_is_completed_by_the_resumed_run(tmp_path):
    """The server stops as round 3 goes out: round 2 was committed without the sites'
    evaluation of its model, which the resumed run's first training message asks for."""
    with_dataset, job = own_data_job(rounds=3)
    files = sites_and_files(with_dataset, tmp_path)
    context = stopped_as_round_goes_out(job, tmp_path, files, 3)
    committed = json.loads((tmp_path / "history.json").read_text())
    assert [("siteEvaluation" in e, "accuracy" in e, "awaitingSiteEvaluation" in e) for e in committed] == [
        (True, True, False),
        (False, False, True),
    ]
    assert outputs.last_evaluated(committed) == committed[0]
    server_app.main(InProcessGrid(job, tmp_path, files), context)
    history = json.loads((tmp_path / "history.json").read_text())
    straight = tmp_path / "straight"
    server_app.train_federated(InProcessGrid(job, straight, sites_and_files(with_dataset, straight)), job, straight)
    reference = json.loads((straight / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2, 3]
    assert not any("awaitingSiteEvaluation" in e for e in history)
    for entry, expected in zip(history, reference, strict=True):
        assert entry["siteEvaluation"] == pytest.approx(expected["siteEvaluation"], abs=1e-9)
    assert json.loads((tmp_path / "model.json").read_text())["sha256"] == json.loads((straight / "model.json").read_text())["sha256"]


def told_the_run_is_over(grid: InProcessGrid) -> list[str]:
    return [
        grid.sites[m.metadata.dst_node_id][0]
        for m in grid.seen
        if m.metadata.message_type == "query" and m.content.config_records["config"]["query"] == "run-finished"
    ]


def test_the_sites_hear_the_run_is_over_before_it_reads_succeeded_and_one_away_hears_when_back(tmp_path):
    """Once the job reads Succeeded the operator stops the server, and a site not told by then
    would wait for it for ever. So the sites are told first; site c, whose node is away as the
    run ends (its SuperNode starting again), is told once it is back."""
    job = make_job("FedAvg", rounds=1)
    grid = InProcessGrid(job, tmp_path, sites_and_files(job, tmp_path))
    states: list[str] = []
    away = {"looks": 0}
    push, get_node_ids = grid.push_messages, grid.get_node_ids

    def push_messages(messages):
        if any(m.metadata.message_type == "query" and m.content.config_records["config"]["query"] == "run-finished" for m in messages):
            states.append(json.loads((tmp_path / "progress.json").read_text())["state"])
        return push(messages)

    def nodes() -> list[int]:
        if not (tmp_path / "model.json").exists() or away["looks"] >= 3:
            return get_node_ids()
        away["looks"] += 1
        return [n for n in get_node_ids() if grid.sites[n][0] != "c"]

    grid.push_messages, grid.get_node_ids = push_messages, nodes
    server_app.train_federated(grid, job, tmp_path)
    assert told_the_run_is_over(grid) == ["a", "b", "c"]
    assert states == ["Running", "Running"]  # a and b first, then c: each before the run read Succeeded
    assert json.loads((tmp_path / "progress.json").read_text())["state"] == "Succeeded"


def test_a_server_stopped_after_its_last_round_writes_the_model_without_waiting_for_sites(tmp_path, monkeypatch):
    """The server stops after the last round's checkpoint and before it reports the run over
    (its pod deleted); its sites, told already, have ended. The next server writes the same
    final model from the checkpoint and reports Succeeded, with no site to wait for."""
    job = make_job("FedAvg", rounds=2)
    train(job, tmp_path)
    model = (tmp_path / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "model.json", "progress.json"):
        (tmp_path / name).unlink()
    monkeypatch.setattr(server_app, "FINISH_TIMEOUT_SECONDS", 0.5)
    grid = InProcessGrid(job, tmp_path, {})
    looks = []

    def get_node_ids() -> list[int]:
        looks.append(1)
        assert len(looks) < 100, "the server waits for sites, though every round is done"
        return []

    grid.get_node_ids = get_node_ids
    server_app.train_federated(grid, job, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == model
    assert json.loads((tmp_path / "progress.json").read_text())["state"] == "Succeeded"
    assert grid.seen == []
