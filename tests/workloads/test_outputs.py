import hashlib
import json
import os

import numpy as np
import pytest

from bouquet_workloads import outputs
from bouquet_workloads.task import build_model, load_arrays, state_arrays

TASK = {"model": {"mlp": {"hiddenSizes": [8]}}, "classes": 2}


def checkpoint(round_: int) -> outputs.Checkpoint:
    return outputs.Checkpoint(
        round_,
        {"w": np.full((2, 3), round_, np.float32), "b": np.arange(3, dtype=np.float32)},
        {"m_t.w": np.ones((2, 3), np.float32) * round_},
        [{"round": r, "accuracy": r / 10} for r in range(1, round_ + 1)],
    )


def test_a_checkpoint_loads_back_as_saved_and_commits_the_history(tmp_path):
    path = outputs.save_checkpoint(tmp_path, checkpoint(3), keep=5)
    for loaded in (outputs.load_checkpoint(path), outputs.latest_checkpoint(tmp_path)):
        assert loaded.round == 3
        assert loaded.weights.keys() == {"w", "b"} and np.array_equal(loaded.weights["w"], checkpoint(3).weights["w"])
        assert np.array_equal(loaded.strategy_state["m_t.w"], checkpoint(3).strategy_state["m_t.w"])
        assert loaded.history == checkpoint(3).history
    assert json.loads((tmp_path / "history.json").read_text()) == checkpoint(3).history


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for r in range(1, 6):
        outputs.save_checkpoint(tmp_path, checkpoint(r), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000004.safetensors", "round-000005.safetensors"]


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[:50], lambda data: data[:-1], lambda data: b""],
    ids=["header-cut", "last-byte-missing", "empty"],
)
def test_a_damaged_newest_checkpoint_is_passed_over(tmp_path, caplog, damage):
    outputs.save_checkpoint(tmp_path, checkpoint(1), keep=5)
    newest = outputs.save_checkpoint(tmp_path, checkpoint(2), keep=5)
    newest.write_bytes(damage(newest.read_bytes()))
    assert outputs.latest_checkpoint(tmp_path).round == 1
    assert "skipping checkpoint" in caplog.text


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert outputs.latest_checkpoint(tmp_path) is None


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "history.json"
    outputs.write_json(target, ["old"])

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_json(target, ["new"])
    assert json.loads(target.read_text()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


def test_the_final_model_matches_its_sha256_and_loads_strictly(tmp_path):
    model = build_model(TASK, num_features=4, seed=0)
    info = outputs.save_model(tmp_path, state_arrays(model), {"job": "j"})
    data = (tmp_path / "model.safetensors").read_bytes()
    assert info == json.loads((tmp_path / "model.json").read_text())
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["sizeBytes"] == len(data)
    fresh = build_model(TASK, num_features=4, seed=1)
    load_arrays(fresh, outputs.load_model_weights(tmp_path))
    assert all(np.array_equal(state_arrays(fresh)[k], v) for k, v in state_arrays(model).items())


def test_outputs_are_readable_by_others(tmp_path):
    outputs.write_json(tmp_path / "model.json", {})
    assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o644
