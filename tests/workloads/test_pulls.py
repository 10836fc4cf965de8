"""Flower's object pulls wait 1 s after their first miss; bouquet_workloads.pulls shortens that
first wait. These tests hold flwr 1.41.0 to what it assumes: where the wait is set, and that
every pull on a round's path takes the default."""

from __future__ import annotations

import inspect
import threading
import time
import types

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from bouquet_workloads import pulls


@pytest.fixture
def flower_defaults():
    saved = {name: dict(getattr(inflatable_utils, name).__kwdefaults__) for name in pulls.PULLS}
    yield
    for name, defaults in saved.items():
        getattr(inflatable_utils, name).__kwdefaults__.update(defaults)


def test_flowers_pulls_wait_a_second_after_their_first_miss_unless_told_otherwise():
    for name in pulls.PULLS:
        function = getattr(inflatable_utils, name)
        assert inspect.signature(function).parameters["initial_backoff"].kind is inspect.Parameter.KEYWORD_ONLY
        assert "initial_backoff: float = PULL_INITIAL_BACKOFF," in inspect.getsource(function), name
    assert inflatable_utils.PULL_INITIAL_BACKOFF == pulls.FLOWER_FIRST_BACKOFF
    # The pulls of a round's path (server's app, SuperNode, ClientApp) leave the wait to the default.
    for module in (http_grid, start_client_internal, run_clientapp):
        source = inspect.getsource(module)
        assert "pull_objects(" in source or "pull_and_inflate_object_from_tree(" in source, module.__name__
        assert "initial_backoff" not in source, module.__name__
    assert "pull_objects(" in inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)


def test_quicken_shortens_every_wait_of_every_pull_and_keeps_flowers_time_limit(flower_defaults):
    pulls.quicken()
    for name in pulls.PULLS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__
        assert defaults["initial_backoff"] == pulls.FIRST_BACKOFF
        assert defaults["backoff_cap"] == pulls.BACKOFF_CAP
        assert defaults["max_tries_per_object"] is None
        assert defaults["max_time"] == inflatable_utils.PULL_MAX_TIME == 7200


def test_an_object_that_comes_late_is_found_within_the_cap_of_its_arrival(flower_defaults, monkeypatch):
    # Flower's pace would look 0.01, 0.02 ... 1.28, 2.56 s after the misses: an object that
    # came 3 s late waited until 5.1 s. Time is played here; the waits are the pull's own.
    pulls.quicken()
    now = [0.0]
    monkeypatch.setattr(inflatable_utils, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(inflatable_utils, "random", types.SimpleNamespace(uniform=lambda low, high: 0.0))
    waits: list[float] = []

    class Clock:
        def __init__(self) -> None:
            self.stopped = False

        def is_set(self) -> bool:
            return self.stopped

        def set(self) -> None:
            self.stopped = True

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            now[0] += seconds
            return self.stopped

    monkeypatch.setattr(inflatable_utils, "threading", types.SimpleNamespace(Event=Clock, Lock=threading.Lock))

    def pull(object_id: str) -> bytes:
        if now[0] < 3.0:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"x"

    assert inflatable_utils.pull_objects(["a"], pull, max_concurrent_pulls=1) == {"a": b"x"}
    assert max(waits) == pulls.BACKOFF_CAP
    assert 3.0 <= now[0] < 3.0 + pulls.BACKOFF_CAP + 1e-9


def test_a_missing_object_is_looked_for_again_within_tens_of_milliseconds(flower_defaults):
    pulls.quicken()
    asked: list[float] = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 3:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"x"

    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"x"}
    assert asked[-1] - asked[0] < 0.2  # Flower's own wait: 1 s, then 2 s
