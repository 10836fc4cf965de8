"""A site runs only its job's app: the pin refuses any other run before its bundle is fetched
(the real SuperNode is attacked in tests/test_federation.py)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import select
import time

import pytest
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supernode import start_client_internal

from bouquet_workloads import flower
from bouquet_workloads import supernode as supernode_module
from bouquet_workloads.supernode import IDLE_SLEEP, PATCHED, REPLY_SLEEP, Pace, Pin, install


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


def test_flowers_supernode_loop_still_waits_where_the_pace_shortens_it():
    # The pace tells Flower's waits apart by their length, from flwr 1.41.0's source: another
    # version that waits elsewhere or otherwise would be paced wrongly or not at all.
    import flwr

    source = inspect.getsource(start_client_internal)
    assert flwr.__version__ == "1.41.0", f"Pace is written against flwr 1.41.0's SuperNode loop, not {flwr.__version__}'s"
    assert re.findall(r"\btime\.sleep\(([^)]*)\)", source) == [str(IDLE_SLEEP), str(REPLY_SLEEP), str(REPLY_SLEEP)]
    assert re.search(rf"if run_id is None:\s+# [^\n]*\n\s+time\.sleep\({IDLE_SLEEP}\)", source), "the idle wait follows an empty pull"
    assert "import time" in source and "from time import" not in source


def test_the_pace_pulls_soon_after_a_message_and_backs_off_to_flowers_wait_when_idle(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(supernode_module.time, "sleep", slept.append)
    pace = Pace()
    for _ in range(40):
        pace.sleep(IDLE_SLEEP)
    assert slept[0] == Pace.FIRST_PULL and slept == sorted(slept) and slept[-1] == IDLE_SLEEP
    # A message waits at most about as long as the site has been idle (plus the first pull).
    for i, wait in enumerate(slept):
        assert wait <= Pace.FIRST_PULL + sum(slept[:i]) + 1e-9, (i, wait, sum(slept[:i]))
    pace.busy()
    pace.sleep(IDLE_SLEEP)
    pace.sleep(REPLY_SLEEP)
    pace.sleep(7)  # any other wait is left as it is
    assert slept[-3:] == [Pace.FIRST_PULL, Pace.REPLY_POLL, 7]
    assert pace.monotonic() > 0  # the rest of `time`, as it is


def test_after_a_pull_the_server_held_the_next_follows_soon_without_backing_off(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(supernode_module.time, "sleep", slept.append)
    pace = Pace()
    for _ in range(5):
        pace.woke -= 2 * Pace.HELD  # the pull took that long: the server held it (Bouquet's gate)
        pace.sleep(IDLE_SLEEP)
    assert slept == [Pace.FIRST_PULL] * 5 and pace.idle == Pace.FIRST_PULL


def test_the_wait_for_a_reply_ends_when_the_worker_says_it_handed_one_back():
    pace = Pace()
    read, write = os.pipe()
    pace.replies = read
    os.write(write, b"x")
    began = time.monotonic()
    for _ in range(20):  # one wake-up ends one wait; the others fall back to REPLY_FALLBACK
        pace.sleep(REPLY_SLEEP)
    assert time.monotonic() - began < 20 * Pace.REPLY_FALLBACK + 1
    assert not select.select([read], [], [], 0)[0]
    os.close(write)  # the worker ended: its pipe is closed here, and the pace polls until the next
    pace.sleep(REPLY_SLEEP)
    assert pace.replies is None
    with pytest.raises(OSError):
        os.fstat(read)


def test_the_pace_is_reset_by_a_message_the_pin_let_through(monkeypatch):
    pace = Pace()
    pace.idle = IDLE_SLEEP
    results = iter([None, 42])
    monkeypatch.setattr(start_client_internal, PATCHED, lambda **kwargs: next(results))
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    install(Pin("a" * 64, None), pace)
    pull = getattr(start_client_internal, PATCHED)
    assert start_client_internal.time is pace
    assert pull(get_run=lambda run_id: None) is None and pace.idle == IDLE_SLEEP
    assert pull(get_run=lambda run_id: None) == 42 and pace.idle == Pace.FIRST_PULL
