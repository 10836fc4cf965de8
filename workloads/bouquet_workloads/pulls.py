"""Flower's object pulls, without a second's wait on the round path.

A message travels as a small header and its objects (the weights), pushed one after the other:
the server's app pushes a message's header then its objects to the SuperLink, a SuperNode
pulls the header then the objects, its ClientApp pulls them from the SuperNode, and the
replies go back the same way. A pull that comes between a header and its objects finds them
not there yet, and flwr 1.41.0 (supercore/inflatable/inflatable_utils.py, `pull_objects` and
`pull_and_inflate_object_from_tree`) then waits 1 s before it looks again, doubling to 10 s.
Every hop of a round meets this whenever the next step is quick, which is the norm once a
site's worker is warm: seconds per round for a model whose training takes milliseconds.

quicken() makes the first wait FIRST_BACKOFF instead, doubling to BACKOFF_CAP rather than
Flower's 10 s, in the process it is called in (the SuperNode, the site's worker, the server's
app). A large object (tens of MB through TLS, sixteen sites at once) takes seconds to arrive:
with Flower's cap, the pull that missed it last waited up to 10 s more after it arrived, and
seconds on average. A miss costs one small request, so looking five times a second is cheap;
and as the looks are no longer counted in Flower's hundreds (500 tries were 100 s at this
pace), a pull is bounded by Flower's time limit (PULL_MAX_TIME, 2 hours) alone, as a site's
long training is.
tests/workloads/test_pulls.py holds flwr's defaults to what this assumes.
"""

from __future__ import annotations

from flwr.supercore.inflatable import inflatable_utils

FIRST_BACKOFF = 0.01  # seconds
BACKOFF_CAP = 0.2  # seconds
FLOWER_FIRST_BACKOFF = 1  # flwr 1.41.0's PULL_INITIAL_BACKOFF
PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")


def quicken() -> None:
    """Makes every object pull of this process look again FIRST_BACKOFF after the first miss,
    and at least every BACKOFF_CAP after, for as long as Flower's time limit allows."""
    for name in PULLS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__
        defaults.update(initial_backoff=FIRST_BACKOFF, backoff_cap=BACKOFF_CAP, max_tries_per_object=None)
