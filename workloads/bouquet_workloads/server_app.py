"""The server side of the built-in task, on Flower's ServerApp API.

Bouquet drives the rounds itself rather than through Strategy.start, for three reasons:
a run resumes from its last checkpoint with the right round numbers; every round is
committed (checkpoint, history, metrics) the moment it ends; and replies are collected
as the gate says they came (bouquet_workloads.wakes), instead of Flower's fixed three-second
waits.
The strategies themselves are Flower's.

One exchange per round where the job allows it (evaluates_ahead): the message that asks the
sites to train on round r's model also asks them to evaluate it on their validation rows
first, and that evaluation completes round r-1's history entry, which was committed without
it. After the last round, the sites are asked to evaluate the final model alone. So a run of
R rounds costs R + 1 exchanges instead of 2R, and every entry still holds the sites'
evaluation of that round's model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp

from . import datasets, outputs, pulls, wakes, wire
from .outputs import REFUSED_RUNS
from .roster import Roster, SitesNotReady, claimed_name, min_sites, resume_problem
from .strategies import (
    EVALUATE_INCOMING,
    STREAMED,
    WEIGHT_KEY,
    RunningMean,
    aggregate_metrics,
    make_strategy,
    misfit,
    restore_strategy_state,
    strategy_state,
    take_evaluation,
)
from .tables import class_names
from .task import build_model, evaluate, load_arrays, set_standardization, state_arrays

log = logging.getLogger("bouquet_workloads.server")

# Replies are looked for FIRST_POLL_SECONDS after the messages go out, then each look twice as
# long after the one before, up to POLL_SECONDS apart (a small model's round is over in
# milliseconds, a large one's in minutes; each look is a request to the SuperLink).
FIRST_POLL_SECONDS, POLL_SECONDS, POLL_GROWTH = 0.005, 0.2, 2
FINISH_TIMEOUT_SECONDS = 30
FINISH_LOOK_SECONDS = 0.5  # how often a site not yet told the run is over is looked for
# Under Bouquet's server the gate hears when messages were pushed and tells when replies came
# (bouquet_workloads.wakes): then the looks above are only the fallback.
NOTICE: list[wakes.Notice] = []
SITE_EVALUATION = "siteEvaluation"
PULL_ALONE_BYTES = 4 << 20
AWAITING = outputs.AWAITING_SITE_EVALUATION

app = ServerApp()


class RoundFailed(RuntimeError):
    """A round could not be completed: too few sites returned an update."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pulls.quicken()  # the sites' replies are pulled as soon as they are there
    notice = wakes.Notice.from_environment()
    if notice is not None:
        NOTICE[:] = [notice]
    job = json.loads(str(context.run_config["job"]))
    out = Path(str(context.run_config["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_federated(grid, job, out, str(context.run_config.get("site-names", "claims")))
    except (SitesNotReady, RoundFailed) as error:  # Bouquet's own verdicts say what happened
        _progress(out, job, "Failed", message=str(error))
        raise
    except Exception as error:
        _progress(out, job, "Failed", message=f"{type(error).__name__}: {error}")
        raise
    # A SystemExit or KeyboardInterrupt is no failure of the training: the process was told to
    # stop (its pod deleted, Ctrl-C), and a server started again continues from the checkpoint.


def train_federated(grid: Grid, job: Mapping, out: Path, site_names: str = "claims") -> None:
    """Runs the job's remaining rounds, committing each, then writes the final model."""
    spec = job["spec"]
    rounds, task = spec["rounds"], spec["task"]
    features = _feature_names(spec)
    model = build_model(task, len(features), spec["seed"])
    strategy = make_strategy(spec["strategy"], len(spec["sites"]))
    checkpoint = outputs.latest_checkpoint(out)
    if checkpoint is not None:
        problem = resume_problem(spec, checkpoint.history)
        if problem:
            raise SitesNotReady(f"{problem}; start again from round 1 with an empty output folder, or lower strategy.minSites")
    if checkpoint is not None and checkpoint.round >= rounds and not checkpoint.history[-1].get(AWAITING):
        # Every round is done: a server stopped after its last checkpoint and before it said
        # so. The sites are not needed, and those already told the run is over have ended.
        log.info("all %d rounds of %s are done (its checkpoint): writing the final model", rounds, job["metadata"]["name"])
        _finish(grid, job, out, _in_model_order(checkpoint.weights, model), checkpoint.history, [s["name"] for s in spec["sites"]])
        return
    _progress(out, job, "Running", round_=checkpoint.round if checkpoint else 0, message="waiting for sites")
    roster = Roster(
        grid,
        spec,
        lambda messages, timeout, gone=None: _exchange(grid, messages, timeout, gone),
        partial(_audit, out),
        _identities(site_names, out),
    )
    moments = roster.start()
    if checkpoint is None:
        _standardize(model, moments, len(features))
        weights, history, first = state_arrays(model), [], 1
    else:
        weights, history, first = _in_model_order(checkpoint.weights, model), checkpoint.history, checkpoint.round + 1
        restore_strategy_state(strategy, packed_strategy_state(checkpoint.strategy_state, weights))
        log.info("resuming %s from the checkpoint of round %d", job["metadata"]["name"], checkpoint.round)
    test_data = datasets.split(spec["dataset"], [s["name"] for s in spec["sites"]], spec["seed"]).test if "dataset" in spec else None

    keep = spec["output"]["checkpointsToKeep"]
    for round_ in range(first, rounds + 1):
        _progress(out, job, "Running", round_=round_)
        weights, entry = _round(roster, strategy, spec, weights, round_, out, history)
        if test_data is not None:
            load_arrays(model, weights)
            entry["test"] = evaluate(model, test_data, torch.device("cpu"))
        entry.update(_headline(entry))
        history.append(entry)
        outputs.save_checkpoint(out, outputs.Checkpoint(round_, weights, strategy_state(strategy), history), keep=keep)
        log.info("round %d/%d: %s", round_, rounds, {k: entry.get(k) for k in ("loss", "accuracy", "auroc")})
    if history and history[-1].get(AWAITING):
        # The final model's evaluation at the sites, which no further round brings: the
        # last round is committed again with it.
        site_metrics, sent, _ = _evaluate_at_sites(roster, strategy, spec, weights, history[-1]["round"], out)
        _settle(history[-1], site_metrics, sent)
        outputs.save_checkpoint(out, outputs.Checkpoint(history[-1]["round"], weights, strategy_state(strategy), history), keep=keep)
    _finish(grid, job, out, weights, history, sorted(set(roster.names.values())))


def _finish(grid: Grid, job: Mapping, out: Path, weights: dict, history: list[dict], sites: list[str]) -> None:
    """Writes the final model, tells the sites the run is over, draws the report, and only
    then reports it Succeeded: from then on the operator stops this server, and a site not
    told by then would wait for it for ever."""
    spec = job["spec"]
    rounds = spec["rounds"]
    features = _feature_names(spec)
    final = history[-1] if history else {}
    outputs.save_model(
        out,
        weights,
        {
            "job": job["metadata"]["name"],
            "namespace": job["metadata"].get("namespace", ""),
            "rounds": rounds,
            "strategy": spec["strategy"]["name"],
            "metrics": {k: final[k] for k in ("loss", "accuracy", "auroc") if k in final},
            "evaluatedOn": final.get("evaluatedOn", ""),
            "features": features,
            "labelColumn": spec["task"]["labelColumn"],
            "classes": datasets.model_classes(spec),
            # What the label column holds for each class, in the same order.
            "labelValues": class_names(spec["task"]),
            "model": spec["task"]["model"],
            "createdAt": _now(),
        },
    )
    _tell_sites_the_run_is_over(grid, out, sites)  # (they stop while the report is drawn)
    from . import report  # matplotlib: imported only now, not while the sites wait for a round

    report.plot(out / outputs.REPORT, job, history, None)
    _progress(out, job, "Succeeded", round_=rounds)


def _tell_sites_the_run_is_over(grid: Grid, out: Path, sites: list[str]) -> None:
    """Tells every connected site the run is over, so that it ends (its Kubernetes Job then
    completes), and waits up to FINISH_TIMEOUT_SECONDS in all until each of sites has said it
    heard: a site whose node is away (its SuperNode starting again) is told when it is back.
    Best effort: the model is written already."""
    query = RecordDict({"config": ConfigRecord({"query": "run-finished"})})
    waiting, told = set(sites), set()
    deadline = time.monotonic() + FINISH_TIMEOUT_SECONDS
    while True:
        fresh = [node for node in grid.get_node_ids() if node not in told]
        if fresh:
            gone: set[int] = set()
            messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in fresh]
            replies = _exchange(grid, messages, max(0.0, deadline - time.monotonic()), gone)
            _audit(out, 0, "run-finished", replies)
            told.update(set(fresh) - gone)
            waiting -= {claimed_name(r) for r in replies}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(FINISH_LOOK_SECONDS)
    if waiting:
        log.warning("site %s did not hear that the run is over within %ds", ", ".join(sorted(waiting)), FINISH_TIMEOUT_SECONDS)


def evaluates_ahead(spec: Mapping) -> bool:
    """Whether the sites evaluate each round's model in the next round's training message:
    when they evaluate at all, and as many are asked to evaluate as to train (with fewer
    asked, a separate exchange asks the sample the strategy picks)."""
    strategy = spec["strategy"]
    return strategy["fractionEvaluate"] > 0 and strategy["fractionEvaluate"] == strategy["fractionTrain"]


def _round(roster: Roster, strategy, spec: Mapping, weights: dict, round_: int, out: Path, history: list[dict]) -> tuple[dict, dict]:
    """One round: the sites train on the current weights, the strategy aggregates their
    updates, and the sites evaluate the result: in the same exchange as the next round's
    training (evaluates_ahead: the entry is committed without it, and the next round or the
    run's end completes it), else in an exchange of their own. With evaluates_ahead, the
    sites evaluate the weights they are sent first, and that completes the previous round's
    entry in history. Returns the new weights and the round's history entry (without the
    server's own test)."""
    started = time.monotonic()
    timeout = spec["strategy"]["roundTimeoutSeconds"]
    ahead = evaluates_ahead(spec)
    # The weights sent are the previous round's result: its entry waits for their evaluation
    # (also when a resumed job no longer evaluates ahead).
    previous = history[-1] if history and history[-1].get(AWAITING) else None
    while True:
        grid = roster.participants(round_)
        packed = wire.pack(weights)
        record = _to_record(packed)
        config = ConfigRecord({EVALUATE_INCOMING: 1} if previous is not None else {})
        messages = list(strategy.configure_train(round_, record, config, grid))
        gone: set[int] = set()
        taken = _Taken(out, round_, "train", packed, streamed=spec["strategy"]["name"] in STREAMED)
        replies = _in_site_order(roster, _exchange(grid, messages, timeout, gone, taken))
        updates = [r for r in replies if not r.has_error() and r.metadata.src_node_id not in taken.unfit]
        if len(updates) >= min_sites(spec):
            break
        asked = {m.metadata.dst_node_id for m in messages}
        missing = sorted(roster.site(n) for n in asked - {r.metadata.src_node_id for r in updates})
        if gone and time.monotonic() - started < timeout:
            # A site that went away mid-round (its pod restarted or was moved) is not a
            # failed round: the round starts again, from the same weights, once enough
            # sites are connected (Roster.participants waits for them).
            log.warning(
                "round %d: site %s went away during the round; the round starts again once %d sites are connected",
                round_,
                ", ".join(sorted(roster.site(n) for n in gone)),
                min_sites(spec),
            )
            continue
        unfit = [f"{roster.site(n)}'s update does not fit: {why}" for n, why in sorted(taken.unfit.items())]
        why = _errors(replies, unfit) if not gone else f"{', '.join(sorted(roster.site(n) for n in gone))} went away"
        raise RoundFailed(
            f"round {round_}: {len(updates)} of the {len(messages)} sites asked returned an update (not {', '.join(missing)}: "
            f"{why}), fewer than strategy.minSites ({min_sites(spec)})"
        )
    # The evaluations ride beside the training metrics; the strategy aggregates the latter only.
    evaluations = []
    for reply in updates:
        evaluation = take_evaluation(reply.content.metric_records["metrics"])
        if evaluation is not None:
            evaluations.append(RecordDict({"metrics": MetricRecord(evaluation)}))
    if previous is not None:
        _settle(previous, aggregate_metrics(evaluations, WEIGHT_KEY) if evaluations else {}, 0)
    sent = record.count_bytes() * len(messages)
    if taken.mean is not None:
        # The strategy is handed the sites' mean as one reply of their total weight: FedAvg's
        # aggregate of it is itself (a weight of 1.0), to which the adaptive strategies apply
        # their step. The training metrics are the sites' own, aggregated as Flower would.
        mean = RecordDict({"arrays": taken.mean.mean(), "metrics": MetricRecord({WEIGHT_KEY: taken.mean.examples})})
        aggregated, _ = strategy.aggregate_train(round_, [Message(mean, reply_to=messages[0])])
        train_metrics = aggregate_metrics([r.content for r in updates], WEIGHT_KEY)
    else:
        aggregated, train_metrics = strategy.aggregate_train(round_, updates)
    if aggregated is None:
        raise RoundFailed(f"round {round_}: no site returned an update ({_errors(replies)})")
    weights = wire.unpack({k: v.numpy() for k, v in aggregated.items()}, weights)
    entry = {
        "round": round_,
        "sites": sorted(roster.site(r.metadata.src_node_id) for r in updates),
        "train": dict(train_metrics or {}),
    }
    received = taken.received
    eval_replies: list[Message] = []
    if ahead:
        entry[AWAITING] = True
    else:
        site_metrics, eval_sent, eval_replies = _evaluate_at_sites(roster, strategy, spec, weights, round_, out)
        entry[SITE_EVALUATION] = site_metrics
        sent += eval_sent
    entry.update(
        {
            "durationSeconds": round(time.monotonic() - started, 3),
            "bytesSent": sent,
            "bytesReceived": received,
            "finishedAt": _now(),
        }
    )
    refused = _refused_runs(roster, [*updates, *eval_replies])
    if refused:
        entry[REFUSED_RUNS] = refused
    return weights, entry


def _evaluate_at_sites(roster: Roster, strategy, spec: Mapping, weights: dict, round_: int, out: Path) -> tuple[dict, int, list[Message]]:
    """The sites' evaluation of weights in an exchange of its own: the aggregated metrics
    (empty when site evaluation is off), the bytes sent and the replies."""
    grid = roster.participants(round_)
    record = _to_record(wire.pack(weights))
    messages = list(strategy.configure_evaluate(round_, record, ConfigRecord(), grid))
    replies = _in_site_order(
        roster, _exchange(grid, messages, spec["strategy"]["roundTimeoutSeconds"], taken=_Taken(out, round_, "evaluate"))
    )
    return dict(strategy.aggregate_evaluate(round_, replies) or {}), record.count_bytes() * len(messages), replies


def _settle(entry: dict, site_metrics: Mapping, sent: int) -> None:
    """Completes a committed round's entry with the sites' evaluation of its model (and the
    headline from it, when the server holds no test set of its own)."""
    entry.pop(AWAITING, None)
    entry[SITE_EVALUATION] = dict(site_metrics)
    entry["bytesSent"] = entry.get("bytesSent", 0) + sent
    entry.update(_headline(entry))


def packed_strategy_state(state: Mapping[str, np.ndarray], layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A strategy's state from a checkpoint, on the weights as they travel (packed,
    bouquet_workloads.wire). A checkpoint written while they travelled one array per tensor
    holds it per tensor ("m_t.<tensor>", "momentum_vector.<i>" in the model's order): packed
    here the same way, so that such a run resumes too."""
    packed = dict(state)
    flat = wire.pack(layout)
    for attribute in ("m_t", "v_t", "momentum_vector"):
        by_index = attribute == "momentum_vector"
        old = [f"{attribute}.{k}" for k in (map(str, range(len(layout))) if by_index else layout)]
        new = [f"{attribute}.{k}" for k in (map(str, range(len(flat))) if by_index else flat)]
        if all(k in state and np.shape(state[k]) == v.shape for k, v in zip(new, flat.values(), strict=True)):
            continue  # packed already (or not this strategy's)
        if all(k in state for k in old):
            for k in old:
                del packed[k]
            values = wire.pack({name: state[k] for name, k in zip(layout, old, strict=True)})
            packed.update(zip(new, values.values(), strict=True))
    return packed


def _refused_runs(roster: Roster, replies: list[Message]) -> dict[str, int]:
    """site -> how many runs of another app it has refused so far, as its replies say (only
    sites that have refused one; a site's own app may not say)."""
    counts: dict[str, int] = {}
    for reply in replies:
        if reply.has_error() or "site" not in reply.content.config_records:
            continue
        refused = int(reply.content.config_records["site"].get(REFUSED_RUNS, 0) or 0)
        if refused:
            site = roster.site(reply.metadata.src_node_id)
            counts[site] = max(counts.get(site, 0), refused)
    return dict(sorted(counts.items()))


def _identities(site_names: str, out: Path) -> Callable[[], dict[int, str]] | None:
    """node id -> site, as the server registered the sites' keys (None: the sites are not
    authenticated, and a site's name is what it says)."""
    if site_names != "keys":
        return None
    return lambda: {int(node): entry["site"] for node, entry in (outputs.read_json(out / outputs.NODES, {}) or {}).items()}


def _in_site_order(roster: Roster, replies: list[Message]) -> list[Message]:
    """Replies in the order of the sites' names, not of their arrival: floating-point sums
    depend on the order, and the same job should give the same weights wherever it runs."""
    return sorted(replies, key=lambda r: roster.site(r.metadata.src_node_id))


def _in_model_order(weights: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
    """The checkpoint's weights in the model's state_dict order (strategies and sites pair
    arrays by position); a checkpoint of another model is refused."""
    expected = {k: tuple(v.shape) for k, v in state_arrays(model).items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        raise ValueError(
            f"the checkpoint holds another model's weights ({sorted(found.items())}), not this job's ({sorted(expected.items())})"
        )
    return {k: weights[k] for k in expected}


def _feature_names(spec: Mapping) -> list[str]:
    if "features" in spec["task"]:
        return list(spec["task"]["features"])
    return datasets.describe(spec["dataset"]["name"])[0]


def _headline(entry: Mapping) -> dict:
    """The round's loss, accuracy and AUROC: on the held-out test set when the server has
    one, else the sites' own validation rows, example-weighted."""
    if "test" in entry:
        source, name = "test", "held-out test set"
    elif entry.get(AWAITING):
        return {}  # its evaluation comes with the next exchange (evaluates_ahead)
    elif entry[SITE_EVALUATION]:
        source, name = SITE_EVALUATION, "sites' validation data"
    else:
        return {"evaluatedOn": "nothing: site evaluation is off and the server holds no test set"}
    metrics = entry[source]
    return {**{k: metrics[k] for k in ("loss", "accuracy", "auroc") if k in metrics}, "evaluatedOn": name}


def _standardize(model, moments: list[RecordDict], num_features: int) -> None:
    """Sets the model's input scaling from the sites' feature moments (counts, sums and sums
    of squares: aggregates, never rows)."""
    count, total, total_sq = 0.0, np.zeros(num_features), np.zeros(num_features)
    for content in moments:
        site = content.metric_records["moments"]
        count += float(site["count"][0])
        total += np.asarray(site["sum"], dtype=np.float64)
        total_sq += np.asarray(site["sumsq"], dtype=np.float64)
    set_standardization(model, count, total, total_sq)
    log.info("input scaling set from %d sites (%d rows)", len(moments), int(count))


def _audit(out: Path, round_: int, phase: str, replies: list[Message]) -> None:
    """Appends to audit.jsonl what each reply carried: record names, array keys, shapes and
    dtypes, metric names and lengths. Never values. It lets a site's operators check that
    nothing but weights and metrics reached the server."""
    lines = []
    for reply in replies:
        entry: dict = {"round": round_, "phase": phase, "node": reply.metadata.src_node_id}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            content = reply.content
            entry["arrays"] = {
                name: {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}
                for name, record in content.array_records.items()
            }
            entry["metrics"] = {
                name: {k: len(v) if isinstance(v, list) else type(v).__name__ for k, v in record.items()}
                for name, record in content.metric_records.items()
            }
            entry["configs"] = {name: sorted(record.keys()) for name, record in content.config_records.items()}
        lines.append(json.dumps(entry, separators=(",", ":")))
    with (out / outputs.AUDIT).open("a") as f:
        f.write("".join(line + "\n" for line in lines))


class _Taken:
    """What the server does with each site's reply the moment it arrives: writes its audit
    line; in training (like: the arrays sent), leaves out an update that does not fit them
    (unfit), and under a streamed strategy adds the update to the running mean and lets its
    arrays go."""

    def __init__(self, out: Path, round_: int, phase: str, like: Mapping[str, np.ndarray] | None = None, streamed: bool = False) -> None:
        self.out, self.round, self.phase, self.like = out, round_, phase, like
        self.mean = RunningMean(like) if like is not None and streamed else None
        self.unfit: dict[int, str] = {}  # node -> why its update was left out
        self.received = 0  # bytes of the updates taken

    def __call__(self, reply: Message) -> None:
        _audit(self.out, self.round, self.phase, [reply])
        if reply.has_error():
            return
        content = reply.content
        if self.like is not None:
            problem = misfit(self.like, content)
            if problem is not None:
                log.warning("round %d: node %s's update is left out: %s", self.round, reply.metadata.src_node_id, problem)
                self.unfit[reply.metadata.src_node_id] = problem
                return
        if "arrays" in content.array_records:
            self.received += content.array_records["arrays"].count_bytes()
        if self.mean is not None:
            self.mean.add(content)
            for name in list(content.array_records):
                del content[name]

    @property
    def alone(self) -> bool:
        """Whether each reply is pulled alone and held back at the gate: large streamed updates."""
        return self.mean is not None and self.mean.nbytes >= PULL_ALONE_BYTES


def _exchange(
    grid: Grid, messages: list[Message], timeout: float, gone: set[int] | None = None, taken: _Taken | None = None
) -> list[Message]:
    """Sends messages and collects the sites' replies that arrive within timeout seconds,
    handing each to taken as it arrives. When a site's node goes away before it replies,
    Flower's SuperLink answers in its place (an error from node SUPERLINK_NODE_ID): that is no
    reply of the site's, so it is left out, and the node is added to gone."""
    if not messages:
        return []
    # A large update is pulled alone, so that the server holds one at a time however many
    # sites have replied since it last looked (a pull inflates every reply it finds), and the
    # gate lets only a few replies into the SuperLink ahead of the server's pulls.
    alone = taken is not None and taken.alone
    # Flower returns the ids in the order of messages, "" or None for one it could not push.
    ids = list(grid.push_messages(messages))
    for notice in NOTICE:
        notice.pushed(hold=alone)
    destination = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=False) if i}
    pending = set(destination)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_SECONDS
    while pending and time.monotonic() < deadline:
        for reply in _pulled(grid, pending, alone):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
                node = destination.get(reply.metadata.reply_to_message_id)
                log.warning("node %s did not reply: %s", node, reply.error.reason)
                if gone is not None and node is not None:
                    gone.add(node)
                continue
            if taken is not None:
                taken(reply)
            if alone:
                for notice in NOTICE:
                    notice.taken()
            replies.append(reply)
        if pending:
            if not (NOTICE and NOTICE[0].wait(wait)):
                # Not woken (or no gate to say): the next look waits longer.
                if not NOTICE:
                    time.sleep(wait)
                wait = min(wait * POLL_GROWTH, POLL_SECONDS)
    if pending:
        log.warning("%d of %d sites did not reply within %ss", len(pending), len(messages), timeout)
    return replies


def _pulled(grid: Grid, pending: set[str], alone: bool) -> Iterator[Message]:
    """The replies to pending messages that are in, all in one pull or (alone) one per pull."""
    if not alone:
        yield from grid.pull_messages(pending)
        return
    for message_id in sorted(pending):
        yield from grid.pull_messages([message_id])


def _to_record(packed: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The weights as they travel, packed by bouquet_workloads.wire.pack."""
    return ArrayRecord(array_dict={k: Array(v) for k, v in packed.items()})


def _errors(replies: list[Message], unfit: list[str] = ()) -> str:
    """What went wrong at the sites, in their words (Flower wraps them as <class>:<message>)."""
    errors = [*(r.error.reason for r in replies if r.has_error()), *unfit]
    return "; ".join(errors) if errors else "no replies in time"


def _progress(out: Path, job: Mapping, state: str, round_: int | None = None, message: str = "") -> None:
    previous = outputs.read_json(out / outputs.PROGRESS, {}) or {}
    outputs.write_json(
        out / outputs.PROGRESS,
        {
            "job": job["metadata"]["name"],
            "state": state,
            "round": round_ if round_ is not None else previous.get("round", 0),
            "rounds": job["spec"]["rounds"],
            "message": message,
            "updatedAt": _now(),
        },
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
