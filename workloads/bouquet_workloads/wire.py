"""How the built-in task's weights travel between the server and the sites: one flat array per
dtype, not one array per tensor.

Flower moves each array of a message as objects of its own, each a request of its own through
the SuperLink (with its TLS, its signature check and its web framework): a small model's
eight tensors made about seventeen requests per message each way, most of a round's time on a
small machine. Packed, a message is a handful of objects whatever the model's layers. Every
strategy Bouquet offers aggregates element by element (FedAvg and its adaptive and momentum
kin, FedMedian, FedTrimmedAvg) or over all the elements together (Krum's distances), so the
flat arrays aggregate to the same weights. Both sides know the layout: it is the model's, which
each builds from the job.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def pack(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as one flat array per dtype (keyed by the dtype's name), in their order."""
    groups: dict[str, list[np.ndarray]] = {}
    for value in weights.values():
        value = np.asarray(value)
        groups.setdefault(value.dtype.name, []).append(value.reshape(-1))
    return {dtype: np.concatenate(parts) for dtype, parts in groups.items()}


def unpack(flat: Mapping[str, np.ndarray], layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of layout (the model's state: its keys, shapes and dtypes, in order) cut
    from flat arrays made by pack. Raises ValueError when they do not fit the layout."""
    offsets: dict[str, int] = {}
    parts: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for key, like in layout.items():
        like = np.asarray(like)
        dtype = like.dtype.name
        if dtype not in flat:
            raise ValueError(f"the weights hold no {dtype} array, which this model's {key} needs")
        start = offsets.get(dtype, 0)
        end = start + like.size
        part = parts.get(dtype)
        if part is None:
            part = np.asarray(flat[dtype])
            if part.dtype != like.dtype and part.dtype.kind == like.dtype.kind == "f":
                # A strategy that computes in float64 (FedAdam, FedYogi, FedAdagrad): the model's own dtype.
                part = part.astype(like.dtype)
            parts[dtype] = part
        if part.ndim != 1 or part.dtype != like.dtype or end > part.size:
            raise ValueError(f"the weights do not fit this model: its {key} ({like.shape}, {dtype}) is not in them")
        weights[key] = part[start:end].reshape(like.shape)
        offsets[dtype] = end
    for dtype, part in flat.items():
        if offsets.get(dtype, 0) != np.asarray(part).size:
            raise ValueError(
                f"the weights do not fit this model: {np.asarray(part).size} {dtype} values, the model has {offsets.get(dtype, 0)}"
            )
    return weights
