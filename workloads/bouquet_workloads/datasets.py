"""Built-in datasets for trying Bouquet out, and how they are split across sites.

- breast-cancer: the Wisconsin diagnostic breast cancer data (569 patients, 30 measurements
  of cell nuclei, label 1 = benign, 0 = malignant), real clinical data that ships inside
  scikit-learn, so nothing is downloaded.
- sleep-quality: a synthetic wearable-device data set (heart-rate variability, resting heart
  rate, movement, evening light exposure, skin temperature, steps), generated from the job's
  seed. It is made up: it stands in for data that cannot be published.

A split always holds out a test set first, which no site trains on, then shares the rest
among the sites, either uniformly (IID) or with each site's label mix drawn from a
Dirichlet distribution (label skew, as between hospitals that see different patients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import tables
from .tables import Table, split_rows

MIN_ROWS_PER_SITE = 10
_DIRICHLET_ATTEMPTS = 200

SLEEP_CLASSES = ["poor", "good"]
SLEEP_FEATURES = ["hrv_rmssd_ms", "resting_hr_bpm", "movement_index", "evening_light_lux", "skin_temp_delta_c", "steps_thousands"]


@dataclass(frozen=True)
class Split:
    """A built-in dataset divided into a held-out test set and one share per site."""

    features: list[str]
    label: str
    test: Table
    sites: dict[str, Table]


def describe(name: str) -> tuple[list[str], str]:
    """Feature column names and the label column name of a built-in dataset."""
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer  # slow to import: only when used

        return [n.replace(" ", "_") for n in load_breast_cancer().feature_names], "diagnosis"
    if name == "sleep-quality":
        return list(SLEEP_FEATURES), "good_sleep"
    raise ValueError(f"unknown built-in dataset {name!r}")


def model_classes(spec: Mapping) -> list[str]:
    """What each of the model's outputs means, in index order: task.classNames, else the
    built-in dataset's own names for its labels 0 and 1, else the labels 0..classes-1."""
    task = spec["task"]
    if "classNames" in task or "dataset" not in spec:
        return tables.class_names(task)
    if spec["dataset"]["name"] == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        return [str(n) for n in load_breast_cancer().target_names]
    return list(SLEEP_CLASSES)


def load(name: str, seed: int) -> Table:
    """All rows of a built-in dataset."""
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return Table(bunch.data.astype(np.float32), bunch.target.astype(np.int64))
    if name == "sleep-quality":
        return _sleep_quality(np.random.default_rng(seed))
    raise ValueError(f"unknown built-in dataset {name!r}")


def _sleep_quality(rng: np.random.Generator, rows: int = 4000) -> Table:
    """Synthetic nights: a logistic link from physiology to good sleep, plus noise."""
    hrv = np.clip(rng.normal(45, 15, rows), 8, 140)
    resting_hr = np.clip(rng.normal(62, 8, rows), 40, 100)
    movement = rng.gamma(2.0, 0.5, rows)
    light = rng.lognormal(3.0, 1.0, rows)
    skin_temp = rng.normal(0, 0.4, rows)
    steps = np.clip(rng.normal(8, 3, rows), 0, 30)
    logit = (
        0.06 * (hrv - 45)
        - 0.07 * (resting_hr - 62)
        - 1.1 * (movement - 1.0)
        - 0.6 * (np.log(light) - 3.0)
        - 0.8 * np.abs(skin_temp)
        + 0.08 * (steps - 8)
        + rng.logistic(0, 0.6, rows)
    )
    features = np.column_stack([hrv, resting_hr, movement, light, skin_temp, steps]).astype(np.float32)
    return Table(features, (logit > 0).astype(np.int64))


def split(dataset: Mapping, site_names: Sequence[str], seed: int) -> Split:
    """Holds out the test set, then shares the remaining rows among the sites."""
    features, label = describe(dataset["name"])
    table = load(dataset["name"], seed)
    train_rows, test_rows = split_rows(len(table), dataset["testFraction"], seed)
    shares = partition(
        table.labels[train_rows],
        len(site_names),
        dataset["partitioning"],
        dataset.get("alpha", 0.5),
        seed,
    )
    sites = {name: table.subset(train_rows[share]) for name, share in zip(site_names, shares, strict=True)}
    return Split(features, label, table.subset(test_rows), sites)


def partition(labels: np.ndarray, num_sites: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Row indices for each site. Every site gets at least MIN_ROWS_PER_SITE rows."""
    rng = np.random.default_rng(seed)
    if len(labels) < num_sites * MIN_ROWS_PER_SITE:
        raise ValueError(f"{len(labels)} training rows cannot give {num_sites} sites {MIN_ROWS_PER_SITE} rows each")
    if scheme == "IID":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), num_sites)]
    for _ in range(_DIRICHLET_ATTEMPTS):
        shares: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * len(rows)).astype(int)[:-1]
            for site, part in enumerate(np.split(rows, cuts)):
                shares[site].extend(part.tolist())
        if min(len(s) for s in shares) >= MIN_ROWS_PER_SITE:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ValueError(
        f"Dirichlet alpha {alpha} is too small for {num_sites} sites: some site keeps getting fewer than "
        f"{MIN_ROWS_PER_SITE} rows; raise alpha or use fewer sites"
    )
