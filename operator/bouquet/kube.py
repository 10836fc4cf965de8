"""A small client for the Kubernetes API: the few verbs the operator uses, on plain dicts.

Built on the official client's connection handling (kubeconfig or in-cluster credentials,
TLS, token refresh) and nothing of its generated models: the operator's objects come from
render as dicts, and go to the API server as such, server-side applied. The calls block;
the operator runs them in threads.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Mapping
from urllib.parse import quote

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

# Resource names of the kinds the operator touches, by (apiVersion, kind).
PLURALS = {
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("discovery.k8s.io/v1", "EndpointSlice"): "endpointslices",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("bouquet.dev/v1alpha1", "FederatedJob"): "federatedjobs",
    ("coordination.k8s.io/v1", "Lease"): "leases",
}


class ApiError(Exception):
    """The API server refused a request; status is its HTTP code, reason its Status reason
    (NotFound, AlreadyExists, Conflict, Invalid, ...)."""

    def __init__(self, status: int, body: Mapping) -> None:
        self.status = status
        self.reason = body.get("reason", "")
        self.body = body
        super().__init__(f"{status} {self.reason}: {body.get('message', '')}")


def path(api_version: str, kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [prefix, "namespaces", quote(namespace), PLURALS[(api_version, kind)]]
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class Client:
    def __init__(self, api_client) -> None:
        self.api = api_client
        # Requests made, by HTTP method and whether a dry run (the operator's load on the API
        # server, as a metric: a dry run writes nothing).
        self.requests: Counter[tuple[str, bool]] = Counter()
        self.counting = threading.Lock()

    @classmethod
    def from_environment(cls, pool_size: int = 16) -> Client:
        """Credentials from $KUBECONFIG or ~/.kube/config, else the pod's service account."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            # Named here: the client reads $KUBECONFIG once, when it is first imported.
            kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(client.ApiClient(configuration))

    def request(self, method: str, url: str, body=None, query: Mapping | None = None, content_type: str = "application/json"):
        with self.counting:
            self.requests[method, bool(query and query.get("dryRun"))] += 1
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.api.param_serialize(
            method,
            url,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*params, _request_timeout=30)
        response.read()
        data = json.loads(response.data) if response.data else None
        if response.status >= 400:
            raise ApiError(response.status, data if isinstance(data, dict) else {"message": str(data)})
        return data

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        """The object, or None if there is none."""
        try:
            return self.request("GET", path(api_version, kind, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, selector: str = "", fields: str = "") -> list[dict]:
        """The objects whose labels match selector and whose fields match fields (both
        Kubernetes' selector syntax; empty: all)."""
        query = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", fields)) if v}
        return self.request("GET", path(api_version, kind, namespace), query=query)["items"]

    def apply(self, obj: Mapping, manager: str, subresource: str = "") -> dict:
        """Server-side apply of obj under field manager manager, taking over any field another
        manager set (the operator is the one source of truth for what it renders)."""
        metadata = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"], subresource)
        return self.request("PATCH", url, body=obj, query={"fieldManager": manager, "force": "true"}, content_type=APPLY)

    def replace(self, obj: Mapping) -> dict:
        """Replaces obj as it stands; with metadata.resourceVersion set, only that version of
        it (409 Conflict if it changed since it was read)."""
        metadata = obj["metadata"]
        return self.request("PUT", path(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"]), body=obj)

    def create(self, obj: Mapping, dry_run: bool = False) -> dict:
        """Creates obj; with dry_run, only asks the API server whether it would (nothing is
        stored)."""
        query = {"dryRun": "All"} if dry_run else None
        return self.request("POST", path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]), body=obj, query=query)

    def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None, propagation: str = "Background"
    ) -> bool:
        """Deletes in the background (the garbage collector removes what the object owns), or
        with propagation "Foreground", the object last (it stays, marked for deletion, until
        what it owns is gone); with uid, only that incarnation of the object. False if it was
        already gone."""
        body: dict = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path(api_version, kind, namespace, name), body=body)
        except ApiError as error:
            if error.status in (404, 409):
                return False
            raise
        return True
