"""A site runs only its job's app: the pin refuses any other run before its bundle is fetched
(the real SuperNode is attacked in tests/test_federation.py)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supernode import start_client_internal

from bouquet import flower
from bouquet_workloads.supernode import PATCHED, Pin


def run(run_id: int, fab_hash: str) -> Run:
    return dataclasses.replace(Run.create_empty(run_id=run_id), fab_hash=fab_hash)


def test_the_pin_passes_the_jobs_app_and_refuses_any_other_before_it_is_fetched(tmp_path):
    refusals = tmp_path / "refused.json"
    pin = Pin("a" * 64, refusals)
    runs = {1: run(1, "a" * 64), 2: run(2, "b" * 64)}
    asked = []

    def get_run(run_id: int) -> Run:
        asked.append(run_id)
        return runs[run_id]

    guarded = pin.guard(get_run)
    assert guarded(1) is runs[1]
    assert not refusals.exists()
    with pytest.raises(RunNotRunningException):
        guarded(2)
    with pytest.raises(RunNotRunningException):
        guarded(2)
    assert [entry["run"] for entry in json.loads(refusals.read_text())] == [2, 2]
    assert {entry["appSha256"] for entry in json.loads(refusals.read_text())} == {"b" * 64}


def test_flowers_message_intake_is_still_where_the_pin_wraps_it():
    # A Flower upgrade that moves this breaks the pin: this test says so before anything runs.
    assert "get_run" in inspect.signature(getattr(start_client_internal, PATCHED)).parameters


def test_the_app_hash_follows_the_job_alone():
    job = {"spec": {"task": {}}}
    assert flower.app_sha256(job) == flower.app_sha256({"spec": {"task": {}}})
    own = {"spec": {"app": {"serverApp": "mine.server:app", "clientApp": "mine.client:app", "config": {"k": "v"}}}}
    assert flower.app_sha256(own) != flower.app_sha256(job)
    other_component = {"spec": {"app": {**own["spec"]["app"], "clientApp": "theirs.client:app"}}}
    assert flower.app_sha256(other_component) != flower.app_sha256(own)
