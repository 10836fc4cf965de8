"""The CRD reads like documentation (`kubectl explain federatedjob.spec.sites`)."""

from pathlib import Path

import yaml

CRD = yaml.safe_load((Path(__file__).resolve().parents[1] / "crds" / "federatedjob.yaml").read_text())


def fields(schema: dict, path: str = ""):
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from fields(sub, f"{path}.{name}")
    if "items" in schema:
        yield from fields(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield f"{path}[*]", schema["additionalProperties"]
        yield from fields(schema["additionalProperties"], f"{path}[*]")


def test_every_field_has_a_description():
    root = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # The API server describes metadata itself, and refuses a CRD that says more of it than
    # its type (tests/cluster/test_crd_on_apiserver.py installs this CRD on a real one).
    assert [path for path, sub in fields(root) if not sub.get("description") and path not in (".metadata", ".metadata.name")] == []


def test_kubectl_shows_phase_round_sites_accuracy_and_age():
    version = CRD["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Round", "Sites", "Accuracy", "Age"]
    assert version["subresources"] == {"status": {}}
    assert CRD["spec"]["names"]["shortNames"] == ["fj"]
