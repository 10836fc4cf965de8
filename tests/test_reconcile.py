"""reconcile.holds: whether an apply of what is rendered would change what is live (the
reconciles that use it run against a real API server in tests/cluster/test_operator.py)."""

from __future__ import annotations

from bouquet.reconcile import holds

RENDERED = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "j-server", "labels": {"bouquet.dev/job": "j"}, "annotations": {}},
    "spec": {"ports": [{"name": "fleet", "port": 9092}], "selector": {"app": "j"}},
}


def test_what_the_api_server_adds_does_not_count():
    live = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "j-server", "uid": "u", "resourceVersion": "7", "labels": {"bouquet.dev/job": "j", "other": "x"}},
        "spec": {
            "ports": [{"name": "fleet", "port": 9092, "protocol": "TCP", "targetPort": 9092}],
            "selector": {"app": "j"},
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    }
    assert holds(live, RENDERED), "defaults, other labels, an empty map left out: as rendered"


def test_a_changed_or_missing_field_or_list_item_does():
    live = {**RENDERED, "metadata": {**RENDERED["metadata"], "uid": "u"}}
    assert holds(live, RENDERED)
    assert not holds({**live, "spec": {**live["spec"], "selector": {"app": "k"}}}, RENDERED), "a value changed"
    assert not holds({**live, "metadata": {"name": "j-server"}}, RENDERED), "a label gone"
    assert not holds({**live, "spec": {**live["spec"], "ports": []}}, RENDERED), "a list item gone"
    extra = {**live, "spec": {**live["spec"], "ports": [*live["spec"]["ports"], {"name": "more", "port": 1}]}}
    assert not holds(extra, RENDERED), "a list that is longer: applied again (an apply may well change nothing then)"
    assert not holds(None, RENDERED), "no object at all"
