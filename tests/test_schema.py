"""Tests of bouquet.schema: defaulting and validation as the Kubernetes API server does them.

The expected messages are the API server's own (Kubernetes 1.34), checked against the real
apiextensions-apiserver code when these tests were written.
"""

import copy
import datetime
import pathlib
import re

import pytest
import yaml

from bouquet import kubeyaml, schema
from bouquet.schema import InvalidJob, Violation, apply_defaults, load_valid, validate

BREAST_CANCER = """
apiVersion: bouquet.dev/v1alpha1
kind: FederatedJob
metadata:
  name: breast-cancer
spec:
  rounds: 10
  strategy:
    name: FedAvg
  task:
    model:
      mlp:
        hiddenSizes: [64, 32]
    labelColumn: diagnosis
    classes: 2
    training:
      localEpochs: 2
      batchSize: 32
      learningRate: 0.05
  dataset:
    name: breast-cancer
    partitioning: Dirichlet
    alpha: 0.5
  sites:
    - name: hospital-a
    - name: hospital-b
    - name: hospital-c
"""

OWN_DATA = """
apiVersion: bouquet.dev/v1alpha1
kind: FederatedJob
metadata:
  name: own-data
spec:
  rounds: 3
  strategy: {name: FedProx, proximalMu: 0.1, minSites: 2}
  task:
    model: {logreg: {}}
    features: [a, b, c]
    labelColumn: y
  sites:
    - name: site-1
      data: {path: data/site-1.csv}
    - name: site-2
      data: {path: /mnt/site-2.parquet, claimName: site-2-data}
      gpus: 1
      env: [{name: FOO, value: bar}]
"""

RULES_NOT_CHECKED = (
    "<root>: Invalid value: null: some validation rules were not checked because the object was "
    "invalid; correct the existing errors to complete validation"
)

INVALID = pathlib.Path(__file__).parent / "invalid"


@pytest.fixture
def job():
    """The breast-cancer example, to change one thing in."""
    return yaml.safe_load(BREAST_CANCER)


def messages(obj):
    return [str(v) for v in validate(obj)]


# The examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [BREAST_CANCER, OWN_DATA], ids=["breast-cancer", "own-data"])
def test_the_examples_are_valid(text):
    obj = yaml.safe_load(text)
    assert validate(obj) == []
    assert validate(apply_defaults(obj)) == []
    assert load_valid(obj) == apply_defaults(obj)


def test_a_yaml_1_1_boolean_where_a_string_belongs_is_refused():
    # kubectl's YAML reads `labelColumn: y` (OWN_DATA) as true, PyYAML as "y": this is how the
    # API server would see that document.
    obj = yaml.safe_load(OWN_DATA)
    obj["spec"]["task"]["labelColumn"] = True
    assert messages(obj) == [
        'spec.task.labelColumn: Invalid value: "boolean": spec.task.labelColumn in body must be of type string: "boolean"',
        RULES_NOT_CHECKED,
    ]


# Defaults --------------------------------------------------------------------------------


def test_defaults_fill_absent_fields_and_leave_given_ones(job):
    job["spec"]["task"]["training"]["optimizer"] = "Adam"
    del job["spec"]["task"]["classes"]
    spec = apply_defaults(job)["spec"]
    assert spec["seed"] == 0
    assert "classes" not in spec["task"]  # 2 unless classNames are given: class_names() decides
    assert spec["task"]["training"] == {
        "localEpochs": 2,
        "batchSize": 32,
        "learningRate": 0.05,
        "optimizer": "Adam",
        "momentum": 0,
        "weightDecay": 0,
        "validationFraction": 0.2,
    }
    assert spec["dataset"]["testFraction"] == 0.2


def test_a_defaulted_object_gets_the_defaults_of_its_fields(job):
    del job["spec"]["strategy"]
    del job["spec"]["task"]["model"]
    del job["spec"]["task"]["training"]
    spec = apply_defaults(job)["spec"]
    assert spec["strategy"] == {"name": "FedAvg", "fractionTrain": 1, "fractionEvaluate": 1, "roundTimeoutSeconds": 600}
    assert spec["task"]["model"] == {"mlp": {"hiddenSizes": [64, 32]}}
    assert spec["task"]["training"]["optimizer"] == "SGD"
    assert spec["security"] == {"tls": {"mode": "Auto"}}
    assert spec["output"] == {"size": "1Gi", "checkpointsToKeep": 3, "reclaimPolicy": "Retain"}
    assert spec["runPolicy"] == {"suspend": False, "backoffLimit": 3}
    assert spec["server"] == {"serviceType": "ClusterIP"}


def test_array_items_get_their_defaults(job):
    job["spec"]["sites"][1]["gpus"] = 2
    sites = apply_defaults(job)["spec"]["sites"]
    assert [site["gpus"] for site in sites] == [0, 2, 0]


def test_a_null_gets_the_default_or_is_dropped(job):
    job["spec"]["seed"] = None
    job["spec"]["dataset"]["alpha"] = None
    spec = apply_defaults(job)["spec"]
    assert spec["seed"] == 0
    assert "alpha" not in spec["dataset"]


def test_apply_defaults_copies_and_changes_nothing_the_second_time(job):
    original = copy.deepcopy(job)
    once = apply_defaults(job)
    assert job == original
    assert apply_defaults(once) == once


# Types -----------------------------------------------------------------------------------


def test_wrong_type(job):
    job["spec"]["rounds"] = "string"
    assert messages(job) == [
        'spec.rounds: Invalid value: "string": spec.rounds in body must be of type integer: "string"',
        RULES_NOT_CHECKED,
    ]


def test_a_boolean_is_not_an_integer(job):
    job["spec"]["rounds"] = True
    assert messages(job)[0] == ('spec.rounds: Invalid value: "boolean": spec.rounds in body must be of type integer: "boolean"')


def test_integers_are_numbers_and_whole_floats_are_integers(job):
    # kubectl sends 3.0 as 3.
    job["spec"]["strategy"]["fractionTrain"] = 1
    job["spec"]["rounds"] = 3.0
    assert validate(job) == []
    job["spec"]["rounds"] = 2.5
    assert messages(job)[0] == ('spec.rounds: Invalid value: "number": spec.rounds in body must be of type integer: "number"')


def test_a_yaml_timestamp_is_a_string(job):
    # kubectl's YAML reads 2024-01-01 as a string, PyYAML as a date.
    job["spec"]["sites"][0]["env"] = [{"name": "SINCE", "value": datetime.date(2024, 1, 1)}]
    assert validate(job) == []


# Required, enum, bounds, lengths, patterns, sizes -----------------------------------------


def test_required(job):
    del job["spec"]["sites"]
    assert messages(job) == ["spec.sites: Required value", RULES_NOT_CHECKED]


def test_enum(job):
    job["spec"]["strategy"]["name"] = "FedFoo"
    assert messages(job)[0] == (
        'spec.strategy.name: Unsupported value: "FedFoo": supported values: "FedAvg", "FedProx", '
        '"FedAdam", "FedYogi", "FedAdagrad", "FedAvgM", "FedMedian", "FedTrimmedAvg", "Krum"'
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rounds", 0, "spec.rounds: Invalid value: 0: spec.rounds in body should be greater than or equal to 1"),
        ("rounds", 100001, "spec.rounds: Invalid value: 100001: spec.rounds in body should be less than or equal to 100000"),
        ("seed", 4294967296, "spec.seed: Invalid value: 4294967296: spec.seed in body should be less than or equal to 4294967295"),
    ],
)
def test_minimum_and_maximum(job, field, value, message):
    job["spec"][field] = value
    assert messages(job) == [message]


def test_exclusive_minimum_and_maximum(job):
    job["spec"]["strategy"].update(name="FedAvgM", fractionTrain=0, serverMomentum=1.0)
    assert messages(job) == [
        "spec.strategy.fractionTrain: Invalid value: 0: spec.strategy.fractionTrain in body should be greater than 0",
        "spec.strategy.serverMomentum: Invalid value: 1: spec.strategy.serverMomentum in body should be less than 1",
    ]


def test_an_integer_is_compared_with_the_bound_cut_to_an_integer(job):
    # The server's quirk (kube-openapi): 1 against maximum 0.5 reads "less than or equal to 0".
    job["spec"]["dataset"]["testFraction"] = 1
    assert messages(job) == [
        "spec.dataset.testFraction: Invalid value: 1: spec.dataset.testFraction in body should be less than or equal to 0"
    ]


def test_trim_fraction_may_be_zero_but_not_half(job):
    job["spec"]["strategy"] = {"name": "FedTrimmedAvg", "trimFraction": 0.0}
    assert validate(job) == []
    job["spec"]["strategy"]["trimFraction"] = 0.5
    assert messages(job) == ['spec.strategy.trimFraction: Invalid value: "number": trimFraction must be less than 0.5']


def test_string_lengths(job):
    job["spec"]["task"]["labelColumn"] = ""
    job["spec"]["sites"][1]["name"] = "a" * 64
    assert messages(job) == [
        'spec.task.labelColumn: Invalid value: "": spec.task.labelColumn in body should be at least 1 chars long',
        "spec.sites[1].name: Too long: may not be more than 63 bytes",
        RULES_NOT_CHECKED,
    ]


def test_pattern(job):
    job["spec"]["sites"][0]["name"] = "Hospital_A"
    assert messages(job) == [
        "spec.sites[0].name: Invalid value: \"Hospital_A\": spec.sites[0].name in body should match '^[a-z0-9]+(-[a-z0-9]+)*$'"
    ]


def test_a_pattern_matches_anywhere_unless_anchored(job):
    # Go's MatchString searches: output.size's pattern is anchored, so "x1Gi" fails.
    job["spec"]["output"] = {"size": "x1Gi"}
    assert [v.path for v in validate(job)] == ["spec.output.size"]


def test_list_sizes(job):
    job["spec"]["task"]["model"]["mlp"]["hiddenSizes"] = []
    assert messages(job) == [
        "spec.task.model.mlp.hiddenSizes: Invalid value: 0: spec.task.model.mlp.hiddenSizes in body should have at least 1 items"
    ]
    job["spec"]["sites"] = [{"name": f"site-{i}"} for i in range(101)]
    assert messages(job)[-2:] == ["spec.sites: Too many: 101: must have at most 100 items", RULES_NOT_CHECKED]


def test_map_values_and_size(job):
    del job["spec"]["task"]
    job["spec"]["app"] = {
        "serverApp": "mymodel.server:app",
        "clientApp": "mymodel.client:app",
        "config": {f"key{i}": "value" for i in range(101)},
    }
    assert messages(job) == ["spec.app.config: Too many: 101: must have at most 100 items", RULES_NOT_CHECKED]
    job["spec"]["app"]["config"] = {"epochs": 3}
    assert messages(job)[0] == (
        'spec.app.config.epochs: Invalid value: "integer": spec.app.config.epochs in body must be of type string: "integer"'
    )


def test_anything_goes_below_preserve_unknown_fields(job):
    job["spec"]["sites"][0]["resources"] = {"limits": {"cpu": 2, "memory": "1Gi"}, "claims": [{"name": "x"}]}
    job["spec"]["sites"][0]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    assert validate(job) == []


# Unknown fields --------------------------------------------------------------------------


def test_unknown_fields_are_named_by_their_full_path(job):
    job["spec"]["strategy"]["nmae"] = "FedAvg"
    job["spec"]["sites"][2]["gpu"] = 1
    job["metadata"]["lables"] = {"team": "ml"}
    assert messages(job) == [
        "metadata.lables: field not declared in schema",
        "spec.strategy.nmae: field not declared in schema",
        "spec.sites[2].gpu: field not declared in schema",
    ]


def test_an_unknown_field_does_not_keep_the_rules_from_running(job):
    job["spec"]["strategy"]["nmae"] = "FedProx"
    job["spec"]["sites"][2]["name"] = "hospital-a"
    assert messages(job) == [
        "spec.strategy.nmae: field not declared in schema",
        'spec.sites: Invalid value: "object": site names must be unique',
    ]


# CEL rules -------------------------------------------------------------------------------


def test_a_rule_that_fails(job):
    job["spec"]["strategy"]["name"] = "FedProx"
    assert validate(job) == [Violation("spec.strategy.proximalMu", 'Invalid value: "object": the FedProx strategy needs proximalMu')]


def test_a_rule_on_the_root_names_the_field_it_checks(job):
    job["metadata"]["name"] = "Breast-Cancer"
    violation = validate(job)[-1]
    assert violation.path == "metadata.name"
    assert str(violation).startswith('metadata.name: Invalid value: "object": a job\'s name must be a DNS label')


def test_a_rule_with_a_field_path_names_that_field(job):
    job["spec"]["sites"][0]["name"] = "hospital-" + "a" * 45
    assert messages(job) == [
        'spec.sites: Invalid value: "object": each site\'s Job is named <job name>--<site name>, which must '
        "fit in 63 characters: shorten the job or site name"
    ]


def test_a_number_is_a_double_in_rules(job):
    # momentum defaults to the integer 0; the rule compares it with 0.0.
    job["spec"]["task"]["training"]["optimizer"] = "Adam"
    assert validate(job) == []
    job["spec"]["task"]["training"]["momentum"] = 0.9
    assert messages(job) == ['spec.task.training.momentum: Invalid value: "object": momentum applies only to the SGD optimizer']


def test_a_rule_that_cannot_be_evaluated():
    node = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "self.b == 1", "message": "b must be 1"}],
    }
    assert list(schema._rule_violations({"a": 1}, node, "spec.x")) == [
        Violation("spec.x", 'Invalid value: "object": no such key: b evaluating rule: b must be 1')
    ]


def test_a_blocking_error_keeps_every_rule_from_running(job):
    job["spec"]["rounds"] = "ten"
    job["spec"]["strategy"]["name"] = "FedProx"
    assert messages(job)[-1] == RULES_NOT_CHECKED
    assert not any("proximalMu" in m for m in messages(job))


def test_other_errors_leave_the_rules_running(job):
    job["spec"]["rounds"] = 0
    job["spec"]["strategy"]["name"] = "FedProx"
    assert messages(job) == [
        "spec.rounds: Invalid value: 0: spec.rounds in body should be greater than or equal to 1",
        'spec.strategy.proximalMu: Invalid value: "object": the FedProx strategy needs proximalMu',
    ]


# Type and metadata -----------------------------------------------------------------------


def test_api_version_and_kind(job):
    job["apiVersion"] = "bouquet.dev/v1"
    del job["kind"]
    assert messages(job) == [
        'kind: Invalid value: "": must be FederatedJob',
        'apiVersion: Invalid value: "bouquet.dev/v1": must be bouquet.dev/v1alpha1',
    ]


def test_the_name_is_required(job):
    del job["metadata"]
    assert messages(job) == ["metadata.name: Required value: name or generateName is required", RULES_NOT_CHECKED]


def test_the_name_is_a_dns_subdomain_and_more(job):
    job["metadata"]["name"] = "Breast-Cancer"
    assert messages(job) == [
        'metadata.name: Invalid value: "Breast-Cancer": a lowercase RFC 1123 subdomain must consist of lower '
        "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character "
        "(e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        'metadata.name: Invalid value: "object": a job\'s name must be a DNS label of at most 52 characters that starts with '
        "a letter (it names the job's server Service)",
    ]


def test_a_generated_name_is_checked_as_the_server_generates_it(job):
    del job["metadata"]["name"]
    job["metadata"]["generateName"] = "breast-cancer-"
    assert validate(job) == []
    job["metadata"]["generateName"] = "b" * 50
    assert [v.path for v in validate(job)] == ["metadata.name", "spec.sites"]


def test_the_namespace_is_a_dns_label(job):
    job["metadata"]["namespace"] = "ml.team"
    assert messages(job) == ['metadata.namespace: Invalid value: "ml.team": must not contain dots']


def test_status_is_not_checked(job):
    # A create drops status: only the status subresource writes it.
    job["status"] = {"phase": "Bogus", "whatever": 1}
    assert validate(job) == []
    assert load_valid(job)["status"] == {"phase": "Bogus", "whatever": 1}


# The API ---------------------------------------------------------------------------------


def test_violation_str():
    assert str(Violation("spec.sites", "Required value")) == "spec.sites: Required value"
    # Every line has a path: the whole object's is written <root> (the server writes <nil>).
    assert str(Violation("", 'Invalid value: "object": bad')) == '<root>: Invalid value: "object": bad'


def test_load_valid_raises_with_every_violation(job):
    job["spec"]["rounds"] = 0
    job["spec"]["sites"][0]["gpus"] = -1
    with pytest.raises(InvalidJob) as raised:
        load_valid(job)
    assert [v.path for v in raised.value.violations] == ["spec.rounds", "spec.sites[0].gpus"]
    assert str(raised.value) == "\n".join(map(str, raised.value.violations))


@pytest.mark.parametrize("obj", [None, [], "FederatedJob", {}, {"spec": []}, {"spec": {"sites": [None, 3, "x"]}}])
def test_validate_never_raises(obj):
    assert validate(obj)


# The invalid documents in tests/invalid --------------------------------------------------

INVALID_FILES = sorted(INVALID.glob("*.yaml"))


def test_there_are_enough_invalid_documents():
    assert len(INVALID_FILES) >= 15


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_invalid_document(path):
    """Each file's first line reads `# expect: <field path> <part of the message>`, with the
    path <root> for a rule on the whole object."""
    text = path.read_text()
    expected = re.fullmatch(r"# expect: (\S+) (.+)", text.splitlines()[0])
    assert expected, f"{path.name}: no '# expect: <path> <message>' first line"
    want_path = "" if expected[1] == "<root>" else expected[1]
    violations = validate(kubeyaml.load_all(text)[0])
    assert any(v.path == want_path and expected[2] in v.message for v in violations), violations
