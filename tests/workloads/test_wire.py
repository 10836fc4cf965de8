"""The built-in task's weights travel packed, one flat array per dtype: they unpack to the same
tensors, refuse another model's, and every strategy aggregates them to the same weights as
tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bouquet_workloads import wire
from bouquet_workloads.server_app import packed_strategy_state
from bouquet_workloads.strategies import WEIGHT_KEY, make_strategy, strategy_state

LAYOUT = {
    "layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "layer.bias": np.array([0.5, -0.5], dtype=np.float32),
    "steps": np.array(7, dtype=np.int64),
    "out.weight": np.ones((1, 2), dtype=np.float32),
}


def test_packed_weights_unpack_to_the_same_tensors():
    flat = wire.pack(LAYOUT)
    assert {k: v.shape for k, v in flat.items()} == {"float32": (10,), "int64": (1,)}
    back = wire.unpack(flat, LAYOUT)
    assert list(back) == list(LAYOUT)
    assert all(back[k].dtype == LAYOUT[k].dtype and np.array_equal(back[k], LAYOUT[k]) for k in LAYOUT)


@pytest.mark.parametrize(
    ("flat", "problem"),
    [
        ({"float32": np.zeros(9, np.float32), "int64": np.zeros(1, np.int64)}, "out.weight"),
        ({"float32": np.zeros(11, np.float32), "int64": np.zeros(1, np.int64)}, "11 float32 values, the model has 10"),
        ({"float32": np.zeros(10, np.float32)}, "no int64 array"),
        ({"float32": np.zeros(10, np.int32), "int64": np.zeros(1, np.int64)}, "layer.weight"),
        ({"float32": np.zeros((2, 5), np.float32), "int64": np.zeros(1, np.int64)}, "layer.weight"),
    ],
)
def test_weights_that_do_not_fit_the_model_are_refused(flat, problem):
    with pytest.raises(ValueError, match=problem):
        wire.unpack(flat, LAYOUT)


def replies(updates: list[dict[str, np.ndarray]], packed: bool) -> list[Message]:
    out = []
    for i, update in enumerate(updates):
        arrays = wire.pack(update) if packed else update
        content = RecordDict(
            {
                "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({WEIGHT_KEY: 10 + i, "loss": 1.0}),
            }
        )
        message = Message(content, dst_node_id=100 + i, message_type="train")
        out.append(Message(content, reply_to=message))
    return out


class Nodes:
    """What configure_train asks of Flower's Grid."""

    def get_node_ids(self) -> list[int]:
        return [100, 101, 102, 103, 104]


@pytest.mark.parametrize(
    "strategy", ["FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM", "FedMedian", "FedTrimmedAvg", "Krum"]
)
def test_every_strategy_aggregates_packed_weights_as_it_does_tensor_by_tensor(strategy, monkeypatch):
    # Messages are made as a ServerApp's task makes them.
    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)
    layout = {k: v for k, v in LAYOUT.items() if v.dtype == np.float32}
    spec = {"name": strategy, "fractionTrain": 1.0, "fractionEvaluate": 0.0, "proximalMu": 0.1}
    rng = np.random.default_rng(1)
    updates = [[{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in layout.items()} for _ in range(5)] for _ in range(2)]
    results = {}
    for packed in (False, True):
        chosen = make_strategy(spec, 5)
        current = dict(layout)
        for round_, round_updates in enumerate(updates, start=1):
            record = ArrayRecord(array_dict={k: Array(v) for k, v in (wire.pack(current) if packed else current).items()})
            list(chosen.configure_train(round_, record, ConfigRecord(), Nodes()))
            aggregated, _ = chosen.aggregate_train(round_, replies(round_updates, packed))
            arrays = {k: v.numpy() for k, v in aggregated.items()}
            current = wire.unpack(arrays, layout) if packed else arrays
        results[packed] = current
    for key in layout:
        np.testing.assert_allclose(results[True][key], results[False][key], rtol=1e-6, atol=1e-7)


def test_a_checkpoints_strategy_state_by_tensor_is_packed_like_the_weights():
    layout = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    state = {
        "m_t.a": np.ones((2, 2), np.float32),
        "m_t.b": np.full(3, 2, np.float32),
        "momentum_vector.0": np.ones((2, 2), np.float32),
        "momentum_vector.1": np.zeros(3, np.float32),
    }
    packed = packed_strategy_state(state, layout)
    assert sorted(packed) == ["m_t.float32", "momentum_vector.0"]
    assert packed["m_t.float32"].tolist() == [1, 1, 1, 1, 2, 2, 2]
    assert packed["momentum_vector.0"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert packed_strategy_state(packed, layout) == packed  # packed already: left as it is
    assert packed_strategy_state({}, layout) == {}
    strategy = make_strategy({"name": "FedAvg", "fractionTrain": 1.0, "fractionEvaluate": 0.0}, 3)
    assert strategy_state(strategy) == {}
