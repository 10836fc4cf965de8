"""The jobs' private material, kept where only the operator reads it.

A job's TLS CA, server certificate and key, and its sites' keys are made by the operator and
kept in one Secret per job, `bouquet-job-<job uid>`, in the operator's own namespace: the
job's record. The job's pods mount copies in the job's namespace (J-tls, J--<site>-key),
which the operator creates from the record and never reads, patches or lists: its RBAC in
job namespaces holds `create` and `delete` on Secrets and nothing more, so it can read no
Secret of anyone's there (a PATCH, server-side apply included, answers with the object,
which is a read).

Whether a copy is still there is asked with a dry-run create (AlreadyExists, or not),
which reveals nothing of a Secret but that its name is taken. The record says which copies
the operator made (each copy's uid once it is made), so that a Secret of that name it did
not make is refused, and a copy it made that is gone (someone deleted it: a key revoked)
is made again from new material. The record is written before a copy is made, so that no
copy ever holds material the record lacks. A copy still noted as being made (the operator
stopped between the two) may or may not exist, and the operator cannot read it to know: it is
deleted and made again from the record, with the same material.

A record lives as long as its job: the operator deletes it when the job is deleted, or at its
next start when the job went while it was away. When the chart is installed to delete the CRD
on uninstall (`crds.keep=false`), the records are also owned by the operator's ServiceAccount
(--own-service-account), so that they go with the jobs; by default the CRD, the jobs and their
records all stay, and the next install takes them up.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import kube

PREFIX = "bouquet-job-"
COPIES = "copies.json"  # name of each copy in the job's namespace -> its uid ("" while being made)
FIELD_MANAGER = "bouquet-operator"
LABEL_NAMESPACE = "bouquet.dev/job-namespace"
LABEL_NAME = "bouquet.dev/job-name"
LABEL_UID = "bouquet.dev/job-uid"


@dataclass
class Record:
    """One job's record: its material by key, and the copies made of it."""

    data: dict[str, bytes] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    exists: bool = False
    owners: list[dict] = field(default_factory=list)  # its owner references (see owner())
    stale: bool = False  # saved with other owners than these

    def snapshot(self) -> str:
        return json.dumps([{k: base64.b64encode(v).decode() for k, v in sorted(self.data.items())}, self.copies], sort_keys=True)


def record_name(job: Mapping) -> str:
    return f"{PREFIX}{job['metadata']['uid']}"


def load(client: kube.Client, namespace: str, job: Mapping, owners: list[dict] | None = None) -> Record:
    found = client.get("v1", "Secret", namespace, record_name(job))
    if found is None:
        return Record(owners=list(owners or []))
    data = {k: base64.b64decode(v) for k, v in (found.get("data") or {}).items()}
    copies = json.loads(data.pop(COPIES, b"{}"))
    owners = list(owners or [])
    return Record(data, copies, exists=True, owners=owners, stale=found["metadata"].get("ownerReferences", []) != owners)


def owner(client: kube.Client, namespace: str, account: str | None) -> list[dict]:
    """The owner references of the records: the operator's ServiceAccount, if it runs under
    one. Read each time: a record owned by an incarnation of the account that is gone would
    be garbage-collected at once."""
    if not account:
        return []
    found = client.get("v1", "ServiceAccount", namespace, account)
    if found is None:
        raise kube.ApiError(404, {"reason": "NotFound", "message": f"the operator's ServiceAccount {namespace}/{account} does not exist"})
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "name": account, "uid": found["metadata"]["uid"]}]


def save(client: kube.Client, namespace: str, job: Mapping, record: Record) -> None:
    meta = job["metadata"]
    data = {**record.data, COPIES: json.dumps(record.copies, sort_keys=True).encode()}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": record_name(job),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "bouquet-operator",
                LABEL_NAMESPACE: meta["namespace"],
                LABEL_NAME: meta["name"],
                LABEL_UID: meta["uid"],
            },
            **({"ownerReferences": record.owners} if record.owners else {}),
        },
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }
    client.apply(body, FIELD_MANAGER)  # (owner references it no longer sets are removed)
    record.exists = True
    record.stale = False


def taken(client: kube.Client, secret: Mapping) -> bool:
    """Whether a Secret of this one's name exists in its namespace: a dry-run create."""
    try:
        client.create(secret, dry_run=True)
    except kube.ApiError as error:
        if error.reason == "AlreadyExists":
            return True
        raise
    return False


def make_copy(client: kube.Client, namespace: str, job: Mapping, record: Record, secret: Mapping) -> bool:
    """Creates a copy of the record's material: noted in the record as being made first,
    then made, then noted with its uid. False, and nothing noted, if a Secret of its name was
    made by someone else since it was looked for (it is not deleted as a copy half made)."""
    name = secret["metadata"]["name"]
    record.copies[name] = ""
    save(client, namespace, job, record)
    try:
        made = client.create(secret)
    except kube.ApiError as error:
        if error.reason != "AlreadyExists":
            raise
        del record.copies[name]
        save(client, namespace, job, record)
        return False
    record.copies[name] = made["metadata"]["uid"]
    save(client, namespace, job, record)
    return True


def delete_copy(client: kube.Client, namespace: str, job: Mapping, record: Record, name: str) -> bool:
    """Deletes a copy the operator made (that incarnation only, by its uid); False if it
    made none of that name."""
    if name not in record.copies:
        return False
    uid = record.copies[name] or None
    deleted = client.delete("v1", "Secret", job["metadata"]["namespace"], name, uid=uid)
    del record.copies[name]
    save(client, namespace, job, record)
    return deleted


def forget(client: kube.Client, namespace: str, job_namespace: str, job_name: str) -> None:
    """Deletes the records of a job that is gone (the copies go with the job: they are its
    children)."""
    for record in client.list("v1", "Secret", namespace, f"{LABEL_NAMESPACE}={job_namespace},{LABEL_NAME}={job_name}"):
        client.delete("v1", "Secret", namespace, record["metadata"]["name"], uid=record["metadata"]["uid"])


def collect(client: kube.Client, namespace: str, jobs_exist) -> list[str]:
    """Deletes the records of jobs that no longer exist (deleted while the operator was not
    looking); jobs_exist(namespace, name, uid) says whether one does. Returns their names."""
    gone = []
    for record in client.list("v1", "Secret", namespace, f"{LABEL_UID}"):
        labels = record["metadata"].get("labels", {})
        if not jobs_exist(labels.get(LABEL_NAMESPACE, ""), labels.get(LABEL_NAME, ""), labels.get(LABEL_UID, "")):
            client.delete("v1", "Secret", namespace, record["metadata"]["name"], uid=record["metadata"]["uid"])
            gone.append(record["metadata"]["name"])
    return gone
