"""One operator acts at a time: leader election on a coordination.k8s.io Lease, as
client-go's leaderelection package does it.

Every replica watches; only the holder of the Lease reconciles. The holder renews the Lease
every RENEW_SECONDS; a replica that finds it not renewed for its leaseDurationSeconds takes
it over (an update conditioned on the resourceVersion it read, so two cannot both win). A
holder that could not renew for RENEW_DEADLINE_SECONDS, less than the lease's duration,
stops acting before anyone else may start: the process exits, and its pod starts again as
a follower. A holder that stops cleanly gives the Lease up, so that another takes over at
once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from . import kube

log = logging.getLogger("bouquet.operator")

# client-go's defaults are 15, 2 and 10 s; a shorter Lease has another replica take over
# within 14 s of a holder's end.
LEASE_SECONDS = 12  # a Lease not renewed for this long may be taken over
RENEW_SECONDS = 2.0  # how often the holder renews it, and a follower looks
RENEW_DEADLINE_SECONDS = 9.0  # a holder that could not renew for this long stops acting
LEASE_API = "coordination.k8s.io/v1"


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def identity() -> str:
    """This replica's name in the Lease: its pod's name, and a suffix of its own (a pod
    restarted under the same name is another holder)."""
    return f"{os.environ.get('HOSTNAME', 'bouquet-operator')}_{uuid.uuid4().hex[:8]}"


@dataclass
class Elector:
    client: kube.Client
    namespace: str
    name: str = "bouquet-operator"
    holder: str = field(default_factory=identity)
    lease_seconds: int = LEASE_SECONDS
    renew_seconds: float = RENEW_SECONDS
    renew_deadline: float = RENEW_DEADLINE_SECONDS
    leading: bool = False

    def try_hold(self, now: datetime | None = None) -> bool:
        """Takes the Lease, or renews it; False while another holds it (or won the race)."""
        now = now or datetime.now(UTC)
        lease = self.client.get(LEASE_API, "Lease", self.namespace, self.name)
        spec = {"holderIdentity": self.holder, "leaseDurationSeconds": self.lease_seconds, "renewTime": _micro(now)}
        if lease is None:
            body = {
                "apiVersion": LEASE_API,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            try:
                self.client.create(body)
            except kube.ApiError as error:
                if error.status == 409:  # another replica made it first
                    return False
                raise
            return True
        held = lease.get("spec", {})
        other = held.get("holderIdentity") or ""
        if other and other != self.holder:
            renewed = _parse(held["renewTime"]) if held.get("renewTime") else datetime.min.replace(tzinfo=UTC)
            if renewed + timedelta(seconds=held.get("leaseDurationSeconds", self.lease_seconds)) > now:
                return False
        taken = other != self.holder
        lease["spec"] = {
            **held,
            **spec,
            "acquireTime": _micro(now) if taken else held.get("acquireTime", _micro(now)),
            "leaseTransitions": held.get("leaseTransitions", 0) + (1 if taken else 0),  # as client-go counts them
        }
        try:
            self.client.replace(lease)  # conditioned on the resourceVersion read above
        except kube.ApiError as error:
            if error.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Gives the Lease up, if this replica holds it, so that another takes over at once."""
        lease = self.client.get(LEASE_API, "Lease", self.namespace, self.name)
        if lease is None or lease.get("spec", {}).get("holderIdentity") != self.holder:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
        try:
            self.client.replace(lease)
        except kube.ApiError as error:
            log.warning("could not give up the lease %s/%s: %s", self.namespace, self.name, error)

    async def run(self, started: Callable[[], Awaitable[None]], lost: Callable[[], None]) -> None:
        """Holds the Lease for as long as this replica runs: started() once it has it;
        lost() when it could not renew it in time (which must stop all acting)."""
        renewed = time.monotonic()
        while True:
            try:
                held = await asyncio.to_thread(self.try_hold)
            except kube.ApiError as error:
                log.warning("could not reach the lease %s/%s: %s", self.namespace, self.name, error)
                held = False
            if held:
                renewed = time.monotonic()
                if not self.leading:
                    self.leading = True
                    log.info("leading as %s (lease %s/%s)", self.holder, self.namespace, self.name)
                    await started()
            elif self.leading and time.monotonic() - renewed > self.renew_deadline:
                self.leading = False
                log.error("lost the lease %s/%s: stopping", self.namespace, self.name)
                lost()
                return
            await asyncio.sleep(self.renew_seconds)
