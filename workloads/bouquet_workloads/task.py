"""The built-in tabular task in plain PyTorch: models, training, testing (data files are
read and checked by tables.py).

Nothing here knows about Flower or Kubernetes, so a user's own task can replace it and the
same functions train the centralized baseline.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .tables import Table, class_names

log = logging.getLogger(__name__)


class Standardize(nn.Module):
    """Scales inputs by feature statistics held as buffers.

    The statistics travel with the weights, so a saved model carries the scaling it was
    trained with. They are set once from all sites' pooled moments (see feature_moments).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TabularModel(nn.Module):
    """Standardization followed by a multi-layer perceptron, or by one linear layer
    (multinomial logistic regression) when there are no hidden layers."""

    def __init__(self, num_features: int, num_classes: int, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        self.standardize = Standardize(num_features)
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(x))


def build_model(task: Mapping, num_features: int, seed: int) -> TabularModel:
    """The model a job's `task` describes, initialised from the job's seed."""
    torch.manual_seed(seed)
    model = task["model"]
    hidden = model["mlp"]["hiddenSizes"] if "mlp" in model else []
    return TabularModel(num_features, len(class_names(task)), hidden)


def site_seed(job_seed: int, site: str) -> int:
    """Each site shuffles and splits differently, but repeatably."""
    return (job_seed + zlib.crc32(site.encode())) % 2**32


def feature_moments(table: Table) -> dict[str, list[float]]:
    """Per-feature count, sum and sum of squares: what a site shares so that the server can
    standardize inputs without seeing a single row."""
    x = table.features.astype(np.float64)
    return {"count": [float(len(x))], "sum": x.sum(axis=0).tolist(), "sumsq": (x * x).sum(axis=0).tolist()}


def set_standardization(model: TabularModel, count: float, total: np.ndarray, total_sq: np.ndarray) -> None:
    """Sets the model's input scaling from pooled moments."""
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    std = np.sqrt(var)
    std[std < 1e-8] = 1.0  # constant features pass through unscaled
    model.standardize.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    model.standardize.std.copy_(torch.as_tensor(std, dtype=torch.float32))


def pick_device(gpus: int) -> torch.device:
    """CUDA when the site asked for a GPU and one is present; the CPU otherwise, said aloud."""
    if gpus > 0:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("the site asks for %d GPU(s) but CUDA is not available: training on the CPU", gpus)
    return torch.device("cpu")


def train(
    model: nn.Module,
    data: Table,
    training: Mapping,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> float:
    """Trains in place for the configured local epochs; returns the mean training loss.

    With proximal_mu > 0 (FedProx) the loss gains mu/2 * ||w - w_global||^2, which keeps
    the local model near the global one it started from.
    """
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(data.features)
    y = torch.as_tensor(data.labels)
    optimizer = _optimizer(model, training)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for _ in range(training["localEpochs"]):
        for rows in torch.randperm(len(y), generator=generator).split(training["batchSize"]):
            xb, yb = x[rows].to(device), y[rows].to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            seen += len(rows)
    return total / max(seen, 1)


def _optimizer(model: nn.Module, training: Mapping) -> torch.optim.Optimizer:
    params, lr, decay = model.parameters(), training["learningRate"], training["weightDecay"]
    if training["optimizer"] == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if training["optimizer"] == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=training["momentum"], weight_decay=decay)


@torch.no_grad()
def evaluate(model: nn.Module, data: Table, device: torch.device) -> dict[str, float]:
    """Loss and accuracy, plus AUROC when there are two classes and both are present."""
    model.to(device).eval()
    logits = model(torch.as_tensor(data.features).to(device)).cpu()
    labels = torch.as_tensor(data.labels)
    result = {
        "loss": float(nn.functional.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
    }
    if logits.shape[1] == 2 and len(np.unique(data.labels)) == 2:
        result["auroc"] = auroc(data.labels, logits.softmax(dim=1)[:, 1].numpy())
    return result


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, as the Mann-Whitney U statistic with tied scores given
    their average rank. (Written out because importing scikit-learn would add a second and
    its memory to every site process and to the server's.)"""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = average_rank[inverse]
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters and buffers as numpy arrays, by state_dict key."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Loads arrays into the model with strict key matching."""
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}, strict=True)
