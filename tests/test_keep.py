"""keep.make_copy when a Secret of the copy's name appears between the look and the make
(the records and copies against a real API server: tests/cluster/test_operator.py)."""

from __future__ import annotations

import base64
import json

from bouquet import keep, kube

JOB = {"metadata": {"name": "j", "namespace": "n", "uid": "u"}}
COPY = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "j--a-key", "namespace": "n"}, "data": {}}


class Client:
    """Applies (the record) and creates (the copy) as the API server would, the copy's
    name taken or not."""

    def __init__(self, taken: bool) -> None:
        self.taken, self.saved = taken, []

    def apply(self, body, manager):
        self.saved.append(json.loads(base64.b64decode(body["data"][keep.COPIES])))
        return body

    def create(self, obj, dry_run=False):
        if self.taken:
            raise kube.ApiError(409, {"reason": "AlreadyExists", "message": 'secrets "j--a-key" already exists'})
        return {**obj, "metadata": {**obj["metadata"], "uid": "made"}}


def test_a_copy_is_noted_as_being_made_then_with_its_uid():
    client, record = Client(taken=False), keep.Record({})
    assert keep.make_copy(client, "bouquet-system", JOB, record, COPY)
    assert client.saved == [{"j--a-key": ""}, {"j--a-key": "made"}]


def test_a_name_taken_meanwhile_is_not_noted_as_a_copy_half_made():
    """Left noted as being made, the copy would be deleted at the next reconcile: someone
    else's Secret."""
    client, record = Client(taken=True), keep.Record({})
    assert not keep.make_copy(client, "bouquet-system", JOB, record, COPY)
    assert record.copies == {}
    assert client.saved[-1] == {}
