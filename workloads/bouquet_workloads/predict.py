"""Predictions from a job's final model: `load(folder)` for Python, `bouquet predict` for the
shell. The folder is a run's output (runs/<job>/, or a copy of the job's claim) holding
model.safetensors and model.json; the model is rebuilt from model.json alone.

    from bouquet_workloads import predict
    model = predict.load(Path("runs/breast-cancer"))
    probabilities = model.probabilities(features)   # rows x classes, columns as model.classes
    labels = model.predict(features)                # class names
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch

from . import outputs
from .tables import Table, column_names, read_table
from .task import TabularModel, build_model, evaluate, load_arrays


class ModelError(ValueError):
    """A model folder that cannot be used: missing, damaged, or of another model."""


@dataclass(frozen=True)
class Model:
    """A trained model and what model.json says of it."""

    info: dict
    network: TabularModel

    @property
    def features(self) -> list[str]:
        """The input columns, in the order the model takes them."""
        return list(self.info["features"])

    @property
    def classes(self) -> list[str]:
        """What each output means, in index order."""
        return list(self.info["classes"])

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Each row's probability of each class (rows x classes)."""
        self.network.eval()
        return self.network(torch.as_tensor(np.asarray(features, dtype=np.float32))).softmax(dim=1).numpy()

    def predict(self, features: np.ndarray) -> list[str]:
        """Each row's most likely class, by name."""
        return [self.classes[i] for i in self.probabilities(features).argmax(axis=1)]

    def read(self, path: Path, file_format: str | None = None) -> Table:
        """A data file's rows with the model's features, and their labels when the file has
        the label column (else every label is -1). DataError names what is wrong with it."""
        label = self.info["labelColumn"]
        labelled = label in column_names(path, file_format)
        # model.json's labelValues say what the label column holds for each class.
        return read_table(path, self.features, label if labelled else None, self.info["labelValues"], True, file_format)

    def score(self, table: Table) -> dict[str, float]:
        """Loss, accuracy (and AUROC for two classes) on labelled rows, as the server scores them."""
        return evaluate(self.network, table, torch.device("cpu"))


def load(folder: Path) -> Model:
    """The model in a run's output folder; its weights must match model.json's sha256."""
    info = outputs.read_json(folder / outputs.MODEL_INFO)
    if info is None:
        raise ModelError(f"{folder} holds no {outputs.MODEL_INFO}: point at a finished run's output folder")
    weights_file = folder / outputs.MODEL
    try:
        data = weights_file.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{folder} holds no {outputs.MODEL}") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ModelError(f"{weights_file} does not match the sha256 in {folder / outputs.MODEL_INFO}: it is damaged or from another run")
    task = {"model": info["model"], "classNames": info["classes"]}
    network = build_model(task, len(info["features"]), seed=0)
    load_arrays(network, safetensors.numpy.load(data))
    return Model(info, network)
