"""The files a run leaves in its output directory, and how they are written.

    model.safetensors   final weights (state_dict keys, loads with strict matching)
    model.json          job, rounds, strategy, final metrics, sha256 of model.safetensors
    history.json        one entry per finished round, in order, never one twice
    progress.json       what the server is doing now (round under way, state)
    audit.jsonl         what each site's replies carried: record names, keys, shapes (no values)
    nodes.json          node id -> site and sha256 of its key, as the server registered the sites' keys
    report.png          loss and accuracy per round
    checkpoints/        round-NNNNNN.safetensors: weights, strategy state and history

Every file is written atomically (a temporary file, fsync, rename), so a reader or a
restarted server sees either the old file or the new one, never half of one. A round's
checkpoint is its commit point: it holds the history up to that round, and history.json
is rewritten from it, so resuming from the newest checkpoint can neither lose a round nor
repeat one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

log = logging.getLogger(__name__)

MODEL = "model.safetensors"
MODEL_INFO = "model.json"
HISTORY = "history.json"
PROGRESS = "progress.json"
AUDIT = "audit.jsonl"
NODES = "nodes.json"
REPORT = "report.png"
CHECKPOINTS = "checkpoints"
# In a history entry, and in a site's replies: site -> runs of other apps it has refused.
REFUSED_RUNS = "refusedRuns"
_CHECKPOINT_FORMAT = "bouquet-checkpoint/1"


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces path with data so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are for others to read (a model, metrics)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path: Path, value: object) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path: Path, default: object = None) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


@dataclass
class Checkpoint:
    """Everything needed to continue after `round`."""

    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


# Marks a history entry committed before the sites evaluated its round's model: their
# evaluation comes with the next round's exchange (server_app.evaluates_ahead).
AWAITING_SITE_EVALUATION = "awaitingSiteEvaluation"


def evaluated(entry: Mapping) -> bool:
    """Whether a history entry holds its round's evaluation (one awaiting the sites' does
    not, unless the server's own test set scored it)."""
    return not entry.get(AWAITING_SITE_EVALUATION) or "evaluatedOn" in entry


def last_evaluated(history: list[dict]) -> dict:
    """The newest entry that holds its round's evaluation ({} if none does)."""
    return next((entry for entry in reversed(history) if evaluated(entry)), {})


def _checkpoint_path(out: Path, round_: int) -> Path:
    return out / CHECKPOINTS / f"round-{round_:06d}.safetensors"


def save_checkpoint(out: Path, checkpoint: Checkpoint, keep: int) -> Path:
    """Commits a finished round: its checkpoint first, then history.json from it."""
    tensors = {f"model.{k}": np.ascontiguousarray(v) for k, v in checkpoint.weights.items()}
    tensors.update({f"strategy.{k}": np.ascontiguousarray(v) for k, v in checkpoint.strategy_state.items()})
    metadata = {
        "format": _CHECKPOINT_FORMAT,
        "round": str(checkpoint.round),
        "history": json.dumps(checkpoint.history),
        # safetensors lists tensors sorted by name; strategies pair arrays by position
        # (FedAvgM's momentum), so the checkpoint keeps the order they were saved in.
        "order": json.dumps([*checkpoint.weights, *checkpoint.strategy_state]),
    }
    path = _checkpoint_path(out, checkpoint.round)
    write_atomic(path, safetensors.numpy.save(tensors, metadata=metadata))
    write_json(out / HISTORY, checkpoint.history)
    for old in sorted((out / CHECKPOINTS).glob("round-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a Bouquet checkpoint")
        tensors = {key.partition(".")[2]: (key.partition(".")[0], f.get_tensor(key)) for key in f.keys()}
    weights, state = {}, {}
    for name in json.loads(metadata["order"]):
        group, tensor = tensors[name]
        (weights if group == "model" else state)[name] = tensor
    return Checkpoint(int(metadata["round"]), weights, state, json.loads(metadata["history"]))


def latest_checkpoint(out: Path) -> Checkpoint | None:
    """The newest checkpoint that loads; damaged ones are reported and passed over."""
    for path in sorted((out / CHECKPOINTS).glob("round-*.safetensors"), reverse=True):
        try:
            return load_checkpoint(path)
        except Exception as error:  # a damaged file can fail in many ways; try the one before
            log.warning("skipping checkpoint %s: %s", path, error)
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(out: Path, weights: Mapping[str, np.ndarray], info: Mapping) -> dict:
    """Writes the final weights, then model.json naming their sha256; returns model.json."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in weights.items()})
    write_atomic(out / MODEL, data)
    meta = {**info, "weights": MODEL, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_json(out / MODEL_INFO, meta)
    return meta


def load_model_weights(out: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(out / MODEL)


def refused_runs(history: list[Mapping]) -> dict[str, int]:
    """site -> the most runs of other apps it said it had refused, over the rounds of history
    (a site that restarts counts again from 0)."""
    refused: dict[str, int] = {}
    for entry in history:
        for site, count in entry.get(REFUSED_RUNS, {}).items():
            refused[site] = max(refused.get(site, 0), int(count))
    return dict(sorted(refused.items()))
