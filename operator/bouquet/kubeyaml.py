"""YAML read the way kubectl reads it, so that `bouquet validate` sees the object the API
server will see.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, which resolves plain scalars as go-yaml
v2 does (YAML 1.1, with its own twists), and PyYAML's YAML 1.1 differs from it:

- `y`, `Y`, `n` and `N` are booleans for kubectl (a column named `y` would reach the server
  as `true`), as are yes/no/on/off in their three spellings;
- a number may hold underscores anywhere after its first character (`1_000`), `0o17`,
  `017` (octal) and `0x1F` are integers, `1e3` is a float and `08` the float 8, while
  PyYAML reads `1e3` and `08` as strings and `1:30` as the integer 90 (base 60);
- a date or time stays the string as written;
- a key that is not a string becomes one (`y:` is the key "true").

Only plain (unquoted, untagged) scalars are resolved; quoting a value keeps it a string.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_SCALAR_TAG = "tag:bouquet.dev,2026:kubectl-scalar"

# go-yaml v2's table of words (resolve.go).
_WORDS: dict[str, Any] = {
    **dict.fromkeys(["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"], True),
    **dict.fromkeys(["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"], False),
    **dict.fromkeys(["", "~", "null", "Null", "NULL"], None),
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
# The first characters after which go-yaml tries to resolve a plain scalar at all.
_HINTED = "+-0123456789yYnNtTfFoO~."
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    r"([Tt ][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\.[0-9]*)?(Z|[-+][0-9]{1,2}(:[0-9]{2})?)?)?"
)
# strconv.ParseInt(s, 0, 64): a sign, then a base prefix (0b, 0o, 0x, or 0 for octal) or decimal.
_GO_INT = re.compile(r"([-+]?)(0[bB][01]+|0[oO][0-7]+|0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_GO_BASES = {"b": 2, "o": 8, "x": 16}


def resolve(text: str) -> Any:
    """A plain scalar as go-yaml v2 resolves it: bool, None, int, float or the string itself."""
    if not text or text[0] not in _HINTED:
        return text if text else None
    if text in _WORDS:
        return _WORDS[text]
    if text[0] == ".":
        return float(text) if _YAML_FLOAT.fullmatch(text) else text
    if text[0] in "+-0123456789":
        if _TIMESTAMP.fullmatch(text):
            return text  # kubectl keeps a timestamp as the string written
        plain = text.replace("_", "")
        number = _go_int(plain)
        if number is not None:
            return number
        if _YAML_FLOAT.fullmatch(plain):
            return float(plain)
        if plain.startswith(("0b", "-0b")):  # go-yaml's own binary form, tried last
            digits = plain.removeprefix("-").removeprefix("0b")
            if digits and set(digits) <= {"0", "1"}:
                value = int(digits, 2)
                return -value if plain[0] == "-" else value
    return text


def _go_int(text: str) -> int | None:
    found = _GO_INT.fullmatch(text)
    if not found:
        return None
    sign, digits = found.groups()
    if len(digits) > 1 and digits[0] == "0":
        base = _GO_BASES.get(digits[1].lower(), 8)
        value = int(digits[2:] if base != 8 or digits[1] in "oO" else digits[1:], base)
    else:
        value = int(digits)
    value = -value if sign == "-" else value
    # ParseInt, then ParseUint for what is too large for an int64; anything larger is a float.
    return value if -(2**63) <= value < 2**64 else None


class KubectlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with go-yaml v2's resolution of plain scalars."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.repeated: list[str] = []  # keys given twice in one mapping


KubectlLoader.yaml_implicit_resolvers = {}
# Every plain scalar that go-yaml would try to resolve (and the empty one) goes to resolve().
KubectlLoader.add_implicit_resolver(_SCALAR_TAG, re.compile(r".*", re.DOTALL), [*_HINTED, ""])
# The merge key of YAML 1.1, which go-yaml v2 also honours.
KubectlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


def _construct_scalar(loader: KubectlLoader, node: yaml.ScalarNode) -> Any:
    value = resolve(loader.construct_scalar(node))
    if isinstance(value, float) and not math.isfinite(value):
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} is not a number that JSON can hold, and kubectl sends JSON", node.start_mark
        )
    return value


def _construct_mapping(loader: KubectlLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = _json_key(loader.construct_object(key_node, deep=True))
        if key in mapping:
            # kubectl takes the last value without a word; this says so.
            loader.repeated.append(f"line {key_node.start_mark.line + 1}: the key {key!r} is given again; kubectl takes this last value")
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


def _json_key(key: Any) -> Any:
    """A mapping key as sigs.k8s.io/yaml writes it into JSON: a string."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        return f"{key:g}"
    if key is None:
        return "null"
    return key


KubectlLoader.add_constructor(_SCALAR_TAG, _construct_scalar)
KubectlLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def load_all(text: str, warnings: list[str] | None = None) -> list[Any]:
    """Every document of a YAML stream, as kubectl would send them; what kubectl does
    without a word but a reader may not expect (a key given twice) is added to warnings."""
    loader = KubectlLoader(text)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        if warnings is not None:
            warnings.extend(loader.repeated)
        return documents
    finally:
        loader.dispose()


class KubectlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that kubectl would read as something else
    (`y`, `1_000`, `0o17`), so that what Bouquet writes reads back as it was."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        resolved = resolve(data)
        plain = isinstance(resolved, str) and resolved == data
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=None if plain else "'")


KubectlDumper.add_representer(str, KubectlDumper.represent_str)


def dump(document: Any) -> str:
    """One document as YAML that kubectl reads back as document."""
    return yaml.dump(document, Dumper=KubectlDumper, sort_keys=False)


def dump_all(documents: list[Any]) -> str:
    return yaml.dump_all(documents, Dumper=KubectlDumper, sort_keys=False)
