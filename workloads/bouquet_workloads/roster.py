"""Which of the job's sites take part, decided by the server.

Before a site first trains it answers a data check: it reads its own file and either sends
the per-feature moments the server scales inputs by, or says what is wrong with the file
(file, column, row; never a value from it). Only sites that passed are asked to train.

- The run starts once strategy.minSitesToStart sites (default: every site) have passed; a
  failed check before that stops the run before round 1, naming the site and the problem.
- A round goes ahead with at least strategy.minSites sites (default: every site); fewer,
  and the run stops rather than train a model that leaves a site out.
- A site that connects later, or connects again after a restart, is checked before it trains.
- A site's name is the one its key was registered under (`identities`: node id -> site, read
  afresh whenever an unknown node connects, so a site whose key was replaced is known again);
  a node that holds no registered key takes no part. Only a job that disables TLS (and with it
  SuperNode authentication) goes by the name a SuperNode says it has.
- Sites are taken in the order of their names, and the sites of a round are drawn with the
  job's seed, so that the same job trains the same way wherever it runs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

if TYPE_CHECKING:  # the sites import this module for DATA_CHECK, and need no server code
    from flwr.serverapp import Grid

log = logging.getLogger("bouquet_workloads.server")

DATA_CHECK = "data-check"
# How often the server looks for sites that connected, while it waits for them.
WAIT_SECONDS = 0.5
WAIT_LOG_SECONDS = 30

# (messages, timeout, gone): the replies; the nodes that went away before replying are added to gone.
Exchange = Callable[[list[Message], float, set[int]], list[Message]]


class SitesNotReady(RuntimeError):
    """Too few of the job's sites can take part: the run does not start, or stops."""


def min_sites(spec: Mapping) -> int:
    """strategy.minSites: the fewest sites a round goes ahead with (default: every site)."""
    return spec["strategy"].get("minSites", len(spec["sites"]))


def min_sites_to_start(spec: Mapping) -> int:
    """strategy.minSitesToStart: the sites that must pass their data check before round 1
    (default: minSites)."""
    return spec["strategy"].get("minSitesToStart", min_sites(spec))


def rule(spec: Mapping, field: str, value: int) -> str:
    """A minimum of the strategy as a message states it: strategy.minSites is 3 (the default: every site)."""
    default = "" if field in spec["strategy"] else (" (the default: every site)" if value == len(spec["sites"]) else " (the default)")
    return f"strategy.{field} is {value}{default}"


def resume_problem(spec: Mapping, history: list[Mapping]) -> str:
    """Why a run may not continue from rounds already trained ("" if it may): a round that
    fewer than strategy.minSites sites took part in (from an earlier spec, or an earlier
    Bouquet) would leave those sites out of the model for good. The caller says how to start
    again, which depends on where the output is kept."""
    everyone = [s["name"] for s in spec["sites"]]
    for entry in history:
        if len(entry["sites"]) < min_sites(spec):
            missing = [name for name in everyone if name not in entry["sites"]]
            return (
                f"round {entry['round']} of the saved training was trained without {', '.join(missing)} "
                f"(only {', '.join(entry['sites']) or 'no site'} took part), and {rule(spec, 'minSites', min_sites(spec))}: "
                "continuing would give a model that never learnt from them"
            )
    return ""


class Roster:
    """The connected nodes that are the job's sites, by name, and what was wrong with the rest."""

    def __init__(
        self,
        grid: Grid,
        spec: Mapping,
        exchange: Exchange,
        audit: Callable[[int, str, list[Message]], None],
        identities: Callable[[], Mapping[int, str]] | None = None,
    ) -> None:
        self.grid, self.spec = grid, spec
        self.identities = identities
        self.exchange, self.audit = exchange, audit
        self.timeout = spec["strategy"]["roundTimeoutSeconds"]
        self.sites = [s["name"] for s in spec["sites"]]
        self.names: dict[int, str] = {}  # node id -> site, for the nodes whose data check passed
        self.refused: dict[int, str] = {}  # node id -> why it takes no part

    def site(self, node: int) -> str:
        return self.names[node]

    def start(self) -> list[RecordDict]:
        """Waits for minSitesToStart sites to connect and pass their data check, checking
        each as it comes; returns the moments of those that passed. Raises SitesNotReady as
        soon as so many have failed that too few are left to pass."""
        needed = min_sites_to_start(self.spec)
        self._wait(lambda: len(self._connected()) >= needed, f"{needed} of the job's sites to connect", timeout=None)
        moments: list[RecordDict] = []

        def settled() -> bool:
            fresh = [n for n in self._connected() if n not in self.names]
            if fresh:
                moments.extend(self.check(fresh))
            return len(self.names) >= needed or len(self.sites) - len(self.refused) < needed

        self._wait(settled, f"{needed} of the job's sites to pass their data check", timeout=None)
        if len(self.names) < needed:
            raise SitesNotReady(
                f"the run cannot start: {self._why()}; {len(self.names)} of {len(self.sites)} sites passed their data check and {rule(self.spec, 'minSitesToStart', needed)}"
            )
        return moments

    def check(self, nodes: list[int]) -> list[RecordDict]:
        """Sends the data check to nodes; returns the moments of the sites that passed."""
        query = RecordDict({"config": ConfigRecord({"query": DATA_CHECK})})
        messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        gone: set[int] = set()
        replies = self.exchange(messages, self.timeout, gone)
        self.audit(0, DATA_CHECK, replies)
        answered = {r.metadata.src_node_id for r in replies}
        for node in nodes:
            if node in gone:
                # Its SuperNode went away before answering (a pod restarting; a node a server
                # before this one still counted online): no verdict on the site, which is
                # asked again once its node is back.
                log.info("node %s went away before its data check; it is asked again when it is back", node)
            elif node not in answered:
                self.refused[node] = f"a site (node {node}) did not answer the data check within {self.timeout}s"
        known = dict(self.identities()) if self.identities else {}
        claims = [self._name(r, known) for r in replies]
        moments = []
        for reply in sorted(replies, key=lambda r: str(self._name(r, known))):
            node, name = reply.metadata.src_node_id, self._name(reply, known)
            problem = (
                self._identity_problem(reply, node, known)
                or self._problem(reply, node, name)
                or (
                    # Two nodes at once saying they are the same site: neither can be told from an impostor.
                    f"nodes {', '.join(str(r.metadata.src_node_id) for r in replies if claimed_name(r) == name)} all say they are site {name}"
                    if claims.count(name) > 1
                    else ""
                )
            )
            if problem:
                self.refused[node] = problem
                log.warning("%s", problem)
                continue
            self.names[node] = name
            moments.append(reply.content)
            log.info("site %s passed its data check", name)
        return moments

    def _name(self, reply: Message, known: Mapping[int, str]) -> str | None:
        """The site a reply comes from: the owner of its node's key, or (with no keys) its claim."""
        if self.identities is None:
            return claimed_name(reply)
        return known.get(reply.metadata.src_node_id)

    def _identity_problem(self, reply: Message, node: int, known: Mapping[int, str]) -> str:
        if self.identities is None:
            return ""
        if node not in known:
            return f"node {node} holds no key of the job's sites (its key was removed or replaced)"
        claim = claimed_name(reply)
        if claim is not None and claim != known[node]:
            return f"node {node} holds site {known[node]}'s key but says it is site {claim!r}: it takes no part"
        return ""

    def _problem(self, reply: Message, node: int, name: str | None) -> str:
        if reply.has_error():
            return f"site {name or f'(node {node})'}: its data check failed: {reply.error.reason}"
        if name not in self.sites:
            return f"node {node} says it is site {name!r}, which is not a site of the job ({', '.join(self.sites)})"
        online = set(self._online())
        if any(other != node and other in online and held == name for other, held in self.names.items()):
            return f"node {node} says it is site {name}, which is connected already"
        check = reply.content.config_records.get("check")
        if check is not None and check.get("problem"):
            return f"site {name}: {check['problem']}"
        return ""

    def participants(self, round_: int) -> Grid:
        """The grid as the round's strategy sees it: only the sites that passed their check,
        in the order of their names. Checks sites that connected since; waits up to the
        round timeout for minSites of them; raises SitesNotReady if they do not come."""
        needed = min_sites(self.spec)
        nodes: list[int] = []

        def ready() -> bool:
            # One look at who is connected (a request to the SuperLink), another only after
            # checking newcomers, during which a site may have gone.
            online = self._online()
            fresh = [n for n in online if n not in self.names and n not in self.refused]
            if fresh:
                self.check(fresh)
                online = self._online()
            nodes[:] = self._taking_part(online)
            return len(nodes) >= needed

        if not ready():
            self._wait(ready, f"{needed} sites for round {round_}", timeout=self.timeout)
        if len(nodes) < needed:
            gone = sorted(set(self.sites) - {self.names[n] for n in nodes})
            raise SitesNotReady(
                f"round {round_} cannot go ahead: only {len(nodes)} sites can take part ({', '.join(self.names[n] for n in nodes) or 'none'}; "
                f"not {', '.join(gone)}{': ' + self._why() if self.refused else ''}) and {rule(self.spec, 'minSites', needed)}"
            )
        # The strategy draws the round's sites with Python's random: from the job's seed.
        random.seed(f"{self.spec['seed']}:{round_}")
        return _Participants(self.grid, nodes)

    def _taking_part(self, online: list[int]) -> list[int]:
        """The checked sites among the online nodes, in the order of their names."""
        connected = set(online)
        return sorted((n for n in self.names if n in connected), key=self.names.__getitem__)

    def _connected(self) -> list[int]:
        return [n for n in self._online() if n not in self.refused]

    def _online(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def _why(self) -> str:
        return "; ".join(dict.fromkeys(self.refused.values())) or "no site has connected"

    def _wait(self, done: Callable[[], bool], what: str, timeout: float | None) -> None:
        started = last_log = time.monotonic()
        while not done():
            now = time.monotonic()
            if timeout is not None and now - started >= timeout:
                return
            if now - last_log >= WAIT_LOG_SECONDS:
                log.info("waiting for %s (%d connected)", what, len(self._online()))
                last_log = now
            time.sleep(WAIT_SECONDS)


def claimed_name(reply: Message) -> str | None:
    """The site a reply says it comes from."""
    if reply.has_error():
        return None
    site = reply.content.config_records.get("site")
    return str(site["name"]) if site is not None and "name" in site else None


class _Participants:
    """A Grid that shows the strategy only some of the connected nodes."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
