"""Flower's object pulls, without a second's wait on the round path.

A message travels as a small header and its objects (the weights), pushed one after the other:
the server's app pushes a message's header then its objects to the SuperLink, a SuperNode
pulls the header then the objects, its ClientApp pulls them from the SuperNode, and the
replies go back the same way. A pull that comes between a header and its objects finds them
not there yet, and flwr 1.41.0 (supercore/inflatable/inflatable_utils.py, `pull_objects` and
`pull_and_inflate_object_from_tree`) then waits 1 s before it looks again, doubling to 10 s.
Every hop of a round meets this whenever the next step is quick, which is the norm once a
site's worker is warm: seconds per round for a model whose training takes milliseconds.

quicken() makes the first wait FIRST_BACKOFF instead, doubling as before to Flower's cap, in
the process it is called in (the SuperNode, the site's worker, the server's app).
tests/workloads/test_pulls.py holds flwr's defaults to what this assumes.
"""

from __future__ import annotations

from flwr.supercore.inflatable import inflatable_utils

FIRST_BACKOFF = 0.01  # seconds
FLOWER_FIRST_BACKOFF = 1  # flwr 1.41.0's PULL_INITIAL_BACKOFF
PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")


def quicken() -> None:
    """Makes every object pull of this process look again FIRST_BACKOFF after the first miss."""
    for name in PULLS:
        getattr(inflatable_utils, name).__kwdefaults__["initial_backoff"] = FIRST_BACKOFF
