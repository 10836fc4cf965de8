"""Flower's object pulls wait 1 s after their first miss; bouquet_workloads.pulls shortens that
first wait. These tests hold flwr 1.41.0 to what it assumes: where the wait is set, and that
every pull on a round's path takes the default."""

from __future__ import annotations

import inspect
import time

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


def test_quicken_shortens_the_first_wait_of_every_pull_and_keeps_flowers_cap(flower_defaults):
    pulls.quicken()
    for name in pulls.PULLS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__
        assert defaults["initial_backoff"] == pulls.FIRST_BACKOFF
        assert defaults["backoff_cap"] == inflatable_utils.PULL_BACKOFF_CAP


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
