import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bouquet_workloads.tables import Table
from bouquet_workloads.task import (
    auroc,
    build_model,
    evaluate,
    feature_moments,
    load_arrays,
    pick_device,
    set_standardization,
    state_arrays,
    train,
)

TASK = {
    "model": {"mlp": {"hiddenSizes": [8, 4]}},
    "classes": 2,
    "training": {"localEpochs": 30, "batchSize": 16, "learningRate": 0.1, "optimizer": "SGD", "momentum": 0.9, "weightDecay": 0.0},
}


def separable(rows=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)).astype(np.float32) * [1, 100, 0.01]
    y = (x[:, 0] + x[:, 1] / 100 > 0).astype(np.int64)
    return Table(x.astype(np.float32), y)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + labels * 0.3, 1)  # rounding makes many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_models_have_the_configured_layers():
    mlp = build_model(TASK, num_features=5, seed=0)
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {
        "standardize.mean": (5,),
        "standardize.std": (5,),
        "layers.0.weight": (8, 5),
        "layers.0.bias": (8,),
        "layers.2.weight": (4, 8),
        "layers.2.bias": (4,),
        "layers.4.weight": (2, 4),
        "layers.4.bias": (2,),
    }
    logreg = build_model({**TASK, "model": {"logreg": {}}, "classes": 3}, num_features=5, seed=0)
    assert [k for k in logreg.state_dict() if k.startswith("layers")] == ["layers.0.weight", "layers.0.bias"]
    assert logreg.state_dict()["layers.0.weight"].shape == (3, 5)


def test_same_seed_same_initial_weights():
    a, b = build_model(TASK, 5, seed=3), build_model(TASK, 5, seed=3)
    c = build_model(TASK, 5, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["layers.0.weight"], c.state_dict()["layers.0.weight"])


def test_training_with_standardization_learns_badly_scaled_features():
    data = separable()
    model = standardized_model(data)
    before = evaluate(model, data, torch.device("cpu"))["accuracy"]
    train(model, data, TASK["training"], seed=0, device=torch.device("cpu"))
    after = evaluate(model, data, torch.device("cpu"))
    assert after["accuracy"] > 0.95 > before
    assert set(after) == {"loss", "accuracy", "auroc"}


def standardized_model(data, seed=0):
    model = build_model(TASK, data.features.shape[1], seed=seed)
    moments = feature_moments(data)
    set_standardization(model, moments["count"][0], np.array(moments["sum"]), np.array(moments["sumsq"]))
    return model


def test_proximal_term_keeps_weights_near_the_start():
    data = separable()
    plain, prox = standardized_model(data), standardized_model(data)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    train(plain, data, TASK["training"], seed=0, device=torch.device("cpu"))
    train(prox, data, TASK["training"], seed=0, device=torch.device("cpu"), proximal_mu=1.0)

    def drift(model):
        return sum(float(((model.state_dict()[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(prox) < drift(plain) / 2


def test_weights_round_trip_with_strict_keys():
    model = build_model(TASK, 3, seed=0)
    arrays = state_arrays(model)
    other = build_model(TASK, 3, seed=1)
    load_arrays(other, arrays)
    assert all(np.array_equal(state_arrays(other)[k], arrays[k]) for k in arrays)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_arrays(other, {k: v for k, v in arrays.items() if k != "layers.0.bias"})


def test_a_site_asking_for_a_gpu_without_cuda_trains_on_the_cpu_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(1).type == "cpu"
    assert "asks for 1 GPU(s) but CUDA is not available" in caplog.text
    caplog.clear()
    assert pick_device(0).type == "cpu"
    assert caplog.text == ""


def test_a_site_asking_for_a_gpu_with_cuda_uses_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(1).type == "cuda"
