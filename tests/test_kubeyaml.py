"""Job files are read as kubectl reads them (go-yaml v2 through sigs.k8s.io/yaml), and what
Bouquet writes reads back the same through kubectl."""

from __future__ import annotations

import pytest
import yaml

from bouquet import kubeyaml


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("y", True), ("Y", True), ("yes", True), ("On", True), ("TRUE", True),
        ("n", False), ("N", False), ("no", False), ("off", False), ("False", False),
        ("~", None), ("null", None), ("", None),
        ("0", 0), ("-1", -1), ("+7", 7), ("1_000", 1000), ("1_", 1), ("0x1F", 31), ("0o17", 15), ("017", 15), ("0b101", 5),
        ("18446744073709551615", 18446744073709551615),
        ("08", 8.0), ("1e3", 1000.0), ("1.5", 1.5), (".5", 0.5), ("-2.", -2.0), ("1_0.5", 10.5),
        ("18446744073709551616", 1.8446744073709552e19),
        ("1:30", "1:30"), ("2024-01-02", "2024-01-02"), ("2024-01-02T10:00:00Z", "2024-01-02T10:00:00Z"),
        ("1.2.3", "1.2.3"), ("0xG", "0xG"), ("_1", "_1"), ("yes please", "yes please"), ("outcome", "outcome"), ("y_true", "y_true"),
    ],
)  # fmt: skip
def test_plain_scalars_resolve_as_go_yaml_v2_does(text, value):
    loaded = kubeyaml.load_all(f"key: {text}\n")[0]["key"]
    assert loaded == value and type(loaded) is type(value)


def test_quoted_and_tagged_scalars_stay_strings():
    assert kubeyaml.load_all("a: 'y'\nb: \"1_000\"\nc: !!str no\n")[0] == {"a": "y", "b": "1_000", "c": "no"}


def test_keys_become_strings_as_in_json():
    assert kubeyaml.load_all("y: 1\n1: a\nno: b\n")[0] == {"true": 1, "1": "a", "false": "b"}


def test_merge_keys_and_nesting_work():
    assert kubeyaml.load_all("base: &b {x: 1}\nnext:\n  <<: *b\n  y: [n, 2]\n")[0] == {
        "base": {"x": 1},
        "next": {"x": 1, "true": [False, 2]},
    }


def test_a_repeated_key_takes_the_last_value_as_kubectl_does_and_says_so():
    warnings: list[str] = []
    assert kubeyaml.load_all("a: 1\nb: {c: 1, c: 2}\na: 3\n", warnings) == [{"a": 3, "b": {"c": 2}}]
    assert warnings == [
        "line 2: the key 'c' is given again; kubectl takes this last value",
        "line 3: the key 'a' is given again; kubectl takes this last value",
    ]


@pytest.mark.parametrize("text", [".nan", ".inf", "-.Inf"])
def test_values_json_cannot_hold_are_refused(text):
    with pytest.raises(yaml.YAMLError, match="not a number that JSON can hold"):
        kubeyaml.load_all(f"a: {text}\n")


def test_pyyaml_alone_would_read_these_differently():
    """Why kubeyaml exists: each of these is one thing to PyYAML and another to kubectl."""
    for text in ("y", "n", "1e3", "08", "1:30"):
        assert yaml.safe_load(f"a: {text}\n")["a"] != kubeyaml.load_all(f"a: {text}\n")[0]["a"]


@pytest.mark.parametrize("text", ["y", "N", "on", "1_000", "0o17", "08", "1e3", ".5", "2024-01-02", "", "~", "plain", "1:30", "y_true"])
def test_strings_written_by_bouquet_read_back_as_strings(text):
    document = {"labelColumn": text, "list": [text], text or "empty": "key"}
    assert kubeyaml.load_all(kubeyaml.dump(document))[0] == document


def test_plain_strings_are_written_plain():
    assert kubeyaml.dump({"labelColumn": "outcome", "n": 1, "f": 0.5, "b": True}) == "labelColumn: outcome\n'n': 1\nf: 0.5\nb: true\n"
