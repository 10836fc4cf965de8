"""One operator acts at a time: the Lease on a real API server, and two real operator
processes of which one is killed."""

from __future__ import annotations

import copy
import time

import yaml

from bouquet import leader
from support.cluster import ROOT, apply_job
from support.faults import OperatorProcess
from support.kubelet import wait_for

EXAMPLE = ROOT / "examples" / "breast-cancer.yaml"


def lease(client, namespace: str) -> dict:
    return client.get(leader.LEASE_API, "Lease", namespace, "bouquet-operator")


def test_the_lease_has_one_holder_which_another_takes_over_once_it_lapses_or_is_given_up(client, namespace):
    first = leader.Elector(client, namespace, holder="first", lease_seconds=2)
    second = leader.Elector(client, namespace, holder="second", lease_seconds=2)
    assert first.try_hold() and not second.try_hold()
    assert first.try_hold() and not second.try_hold(), "renewed, it stays the first's"
    held = lease(client, namespace)["spec"]
    assert (held["holderIdentity"], held["leaseDurationSeconds"], held["leaseTransitions"]) == ("first", 2, 0)
    time.sleep(2.5)  # the first stops renewing
    assert second.try_hold() and not first.try_hold()
    held = lease(client, namespace)["spec"]
    assert (held["holderIdentity"], held["leaseTransitions"]) == ("second", 1)
    second.release()
    assert first.try_hold(), "a Lease given up is taken at once"
    assert lease(client, namespace)["spec"]["leaseTransitions"] == 2


def test_two_electors_racing_for_a_lapsed_lease_do_not_both_win(client, namespace):
    """Each reads the Lease, then writes it conditioned on what it read: the second write
    is refused (409), however close the two are."""
    stale = leader.Elector(client, namespace, holder="gone", lease_seconds=1)
    assert stale.try_hold()
    time.sleep(1.5)
    racers = [leader.Elector(client, namespace, holder=f"racer-{i}", lease_seconds=5) for i in range(2)]
    seen = lease(client, namespace)
    reads = iter([copy.deepcopy(seen), copy.deepcopy(seen)])
    for racer in racers:  # both read the same lapsed Lease before either writes
        racer.client = _ReadsOnce(client, lambda: next(reads))
    won = [racer.try_hold() for racer in racers]
    assert won == [True, False]
    assert lease(client, namespace)["spec"]["holderIdentity"] == "racer-0"


class _ReadsOnce:
    """The client, but its next read of the Lease is the one given."""

    def __init__(self, client, read) -> None:
        self.client, self.read = client, read

    def get(self, *args):
        return self.read()

    def __getattr__(self, name):
        return getattr(self.client, name)


def operator_process(cluster: str, namespace: str, log) -> OperatorProcess:
    """`bouquet operator` in a process of its own, watching one namespace and keeping its
    Lease (and records) there."""
    return OperatorProcess(cluster, namespace, namespace, log, leader_election=True)


def test_of_two_operators_one_acts_and_the_other_takes_over_when_it_is_killed(cluster, client, namespace, tmp_path):
    log = (tmp_path / "operators.log").open("w")
    first = operator_process(cluster, namespace, log)
    second = None
    try:
        wait_for(lambda: first.leading() == 1.0, timeout=60, what="the first operator leading")
        second = operator_process(cluster, namespace, log)
        wait_for(lambda: second.leading() is not None, timeout=60, what="the second operator serving its metrics")
        time.sleep(3)
        assert (first.leading(), second.leading()) == (1.0, 0.0), "one leads, the other follows"
        job = yaml.safe_load(EXAMPLE.read_text())
        apply_job(cluster, namespace, job)
        wait_for(lambda: client.get("apps/v1", "Deployment", namespace, "breast-cancer-server"), what="the leader's children")

        first.process.kill()  # SIGKILL: no Lease given up
        killed = time.monotonic()
        wait_for(lambda: second.leading() == 1.0, timeout=30, what="the second operator leading")
        took = time.monotonic() - killed
        assert took < 15, f"the second took over {took:.1f}s after the first was killed"
        assert lease(client, namespace)["spec"]["leaseTransitions"] == 1
        # The new leader acts: a job applied now gets its children, and a deleted child is restored.
        other = yaml.safe_load(EXAMPLE.read_text())
        other["metadata"]["name"] = "after-takeover"
        apply_job(cluster, namespace, other)
        wait_for(lambda: client.get("apps/v1", "Deployment", namespace, "after-takeover-server"), what="the new leader's children")
        client.delete("v1", "ConfigMap", namespace, "breast-cancer-job")
        wait_for(lambda: client.get("v1", "ConfigMap", namespace, "breast-cancer-job"), what="the deleted child restored")
        second.stop()
        assert lease(client, namespace)["spec"]["holderIdentity"] == "", "stopped cleanly, it gives the Lease up"
    finally:
        first.stop()
        if second is not None:
            second.stop()
        log.close()
        print((tmp_path / "operators.log").read_text()[-4000:])


def test_without_the_lease_an_operator_does_not_act(cluster, client, namespace, tmp_path):
    """The Lease held by another (here: a holder that keeps renewing it), an operator only
    follows: a job gets no child."""
    holder = leader.Elector(client, namespace, holder="someone-else", lease_seconds=30)
    assert holder.try_hold()
    with (tmp_path / "operator.log").open("w") as log:
        follower = operator_process(cluster, namespace, log)
        try:
            wait_for(lambda: follower.leading() == 0.0, timeout=60, what="the operator following")
            apply_job(cluster, namespace, yaml.safe_load(EXAMPLE.read_text()))
            time.sleep(5)
            assert client.get("v1", "ConfigMap", namespace, "breast-cancer-job") is None, "a follower makes nothing"
            holder.release()
            wait_for(lambda: follower.leading() == 1.0, timeout=30, what="the operator leading once the Lease is given up")
            wait_for(lambda: client.get("v1", "ConfigMap", namespace, "breast-cancer-job"), what="its children")
        finally:
            follower.stop()
