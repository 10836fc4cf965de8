"""Reading a FederatedJob file: YAML as kubectl reads it (kubeyaml.py), then the CRD's rules
and defaults (schema.py), then,
for a local run, the checks that need this machine (the sites' data files exist, the
built-in dataset's columns match the task)."""

from __future__ import annotations

from pathlib import Path

import yaml

from . import kubeyaml
from .schema import InvalidJob, Violation, load_valid


def read(path: Path, warnings: list[str] | None = None) -> dict:
    """Parses a job file holding exactly one YAML document (what kubectl would read without a
    word but a reader may not expect goes to warnings)."""
    try:
        documents = [d for d in kubeyaml.load_all(path.read_text(), warnings) if d is not None]
    except FileNotFoundError:
        raise InvalidJob([Violation("", f"{path}: no such file")]) from None
    except yaml.YAMLError as error:
        raise InvalidJob([Violation("", f"{path} is not valid YAML: {error}")]) from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise InvalidJob([Violation("", f"{path} must hold one FederatedJob (found {len(documents)} YAML documents)")])
    return documents[0]


def load(path: Path, warnings: list[str] | None = None) -> dict:
    """The job in the file with its defaults applied; InvalidJob lists every violation."""
    return load_valid(read(path, warnings))


def check_local(job: dict, job_path: Path) -> dict[str, Path]:
    """Checks what a run on this machine needs; returns each site's data file (absolute)
    for the sites that have their own. Raises InvalidJob naming the fields at fault."""
    from bouquet_workloads import datasets  # numpy and pyarrow, which validate and render do without

    spec = job["spec"]
    violations: list[Violation] = []
    files: dict[str, Path] = {}
    for i, site in enumerate(spec["sites"]):
        if "data" not in site:
            continue
        path = Path(site["data"]["path"])
        if not path.is_absolute():
            path = (job_path.parent / path).resolve()
        if not path.is_file():
            violations.append(Violation(f"spec.sites[{i}].data.path", f"Not found: {str(path)!r}: the site's data file does not exist"))
        files[site["name"]] = path
    task = spec.get("task")
    if task is not None and "dataset" in spec:
        features, label = datasets.describe(spec["dataset"]["name"])
        if task["labelColumn"] != label:
            violations.append(
                Violation(
                    "spec.task.labelColumn",
                    f"Invalid value: {task['labelColumn']!r}: the {spec['dataset']['name']} dataset's label column is {label!r}",
                )
            )
        unknown = [f for f in task.get("features", []) if f not in features]
        if unknown:
            violations.append(
                Violation(
                    "spec.task.features",
                    f"Invalid value: {unknown[0]!r}: not a column of the {spec['dataset']['name']} dataset ({', '.join(features)})",
                )
            )
    if spec["security"]["tls"]["mode"] == "Secret":
        violations.append(
            Violation(
                "spec.security.tls.mode", 'Unsupported value: "Secret": a local run makes its own certificates; use Auto (or Disabled)'
            )
        )
    if violations:
        raise InvalidJob(violations)
    return files
