"""Validation and defaulting of FederatedJob objects, done as the Kubernetes API server does them.

The CRD (federatedjob.crd.yaml) is the only source of the rules: this module walks its OpenAPI
schema and evaluates its CEL rules, so that `bouquet validate` and the API server accept and
refuse the same objects. For a create, the server:

1. drops fields the schema does not declare (kubectl's default, strict field validation,
   refuses the object instead: reported here as "field not declared in schema");
2. replaces nulls by their field's default or drops them, then applies defaults (apply_defaults);
3. drops status, which only the status subresource may write;
4. checks the schema and the metadata, then the CEL rules, but the rules only when no schema
   check failed with a "blocking" error (wrong type, required field missing, value not in an
   enum, string or list too long): then it says so instead.

Messages are the server's, word for word as Kubernetes 1.34 puts them, except that a violation
of the whole object is printed at the path "<root>" where the server prints "<nil>". (1.35 and later leave
"object" out of a failed rule's message; 1.31 and earlier say "may not be longer than" for
"may not be more than ... bytes".)
"""

from __future__ import annotations

import copy
import datetime
import decimal
import functools
import importlib.resources
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy
import re2
import yaml
from celpy import celtypes


@dataclass(frozen=True)
class Violation:
    """One reason the API server would refuse an object: where, and the server's message."""

    path: str
    message: str

    def __str__(self) -> str:
        # The server prints a violation of the whole object at the path "<nil>".
        return f"{self.path or '<root>'}: {self.message}"


class InvalidJob(Exception):
    """A FederatedJob that the API server would refuse; str() lists every violation, one a line."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("\n".join(map(str, violations)))
        self.violations = list(violations)


def validate(obj: dict) -> list[Violation]:
    """Every reason the API server would refuse to create obj.

    In the server's order: kind and apiVersion, the name, the schema's checks in document
    order, then the CEL rules in document order. Defaults are applied first, as the server
    does, so obj may be the document as written (applying them twice changes nothing). Never
    raises for a bad object.
    """
    return _violations(apply_defaults(obj))


def apply_defaults(obj: dict) -> dict:
    """A deep copy of obj with the schema's defaults applied, as the API server applies them.

    An absent field gets its default, and the fields inside a default get theirs in turn. A
    null gets the field's default too, or is dropped when there is none (nothing is nullable).
    """
    result = copy.deepcopy(obj)
    _default(result, _validation_root())
    return result


def load_valid(obj: dict) -> dict:
    """obj with its defaults applied; raises InvalidJob if the API server would refuse it."""
    job = apply_defaults(obj)
    violations = _violations(job)
    if violations:
        raise InvalidJob(violations)
    return job


# The CRD ---------------------------------------------------------------------------------

# The schema keywords this module implements. A CRD that uses another one is refused, since
# this module would silently accept what the API server refuses. (status is not checked:
# the server drops it from a create.)
_KEYWORDS = frozenset(
    {
        "type",
        "description",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "default",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "maxProperties",
        "x-kubernetes-validations",
        "x-kubernetes-preserve-unknown-fields",
    }
)

# ObjectMeta as the server decodes it: these fields and no others.
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        **dict.fromkeys(
            [
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "ownerReferences",
                "finalizers",
                "managedFields",
                "selfLink",
            ],
            {"x-kubernetes-preserve-unknown-fields": True},
        ),
    },
}

# What the server shows CEL rules of metadata: only the name.
_CEL_OBJECT_META = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}},
}


@functools.cache
def _crd() -> dict:
    text = (importlib.resources.files("bouquet") / "federatedjob.crd.yaml").read_text("utf-8")
    crd = yaml.safe_load(text)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    _check_supported(_with_property(schema, "status", None), "openAPIV3Schema")
    return crd


def _schema() -> dict:
    return _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _type_meta() -> dict[str, str]:
    crd = _crd()
    version = crd["spec"]["versions"][0]["name"]
    return {"kind": crd["spec"]["names"]["kind"], "apiVersion": f"{crd['spec']['group']}/{version}"}


@functools.cache
def _validation_root() -> dict:
    """The root schema as the server checks it: with the fields of ObjectMeta, without status."""
    return _with_property(_with_property(_schema(), "metadata", _OBJECT_META), "status", None)


@functools.cache
def _cel_root() -> dict:
    return _with_property(_validation_root(), "metadata", _CEL_OBJECT_META)


def _with_property(schema: dict, name: str, sub: dict | None) -> dict:
    """schema with the property name replaced by sub, or removed if sub is None."""
    properties = {k: v for k, v in schema["properties"].items() if k != name}
    if sub is not None:
        properties[name] = sub
    return {**schema, "properties": properties}


def _check_supported(schema: dict, where: str) -> None:
    """Raise if the CRD uses what this module does not implement; compile every CEL rule."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{where}: bouquet.schema does not implement {sorted(unknown)}")
    for rule in schema.get("x-kubernetes-validations", ()):
        if set(rule) - {"rule", "message", "fieldPath"}:
            raise ValueError(f"{where}: bouquet.schema implements only rule, message and fieldPath in {rule}")
        if "fieldPath" in rule and not _declared(schema, rule["fieldPath"]):
            raise ValueError(f"{where}: fieldPath {rule['fieldPath']} is not a simple path (.a.b) to a declared field")
        _program(rule["rule"])
    for name, sub in schema.get("properties", {}).items():
        _check_supported(sub, f"{where}.properties.{name}")
    for key in ("items", "additionalProperties"):
        if key in schema:
            _check_supported(schema[key], f"{where}.{key}")


def _declared(schema: dict, field_path: str) -> bool:
    """Whether a rule's fieldPath (.a.b) names a field the schema declares, as the server
    requires of a CRD."""
    if not re2.fullmatch(r"(\.[A-Za-z_][A-Za-z0-9_]*)+", field_path):
        return False
    for name in field_path[1:].split("."):
        if name not in schema.get("properties", {}):
            return False
        schema = schema["properties"][name]
    return True


def _field_schema(schema: dict, name: str) -> dict | None:
    """The schema of the field name of an object, or None if the field is not declared."""
    properties = schema.get("properties", {})
    return properties[name] if name in properties else schema.get("additionalProperties")


# Defaulting ------------------------------------------------------------------------------


def _default(value: Any, schema: dict) -> None:
    """Default value in place, as the server's structural defaulting does."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if value.get(name) is None and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name in list(value):
            sub = _field_schema(schema, name)
            if sub is None:
                continue
            if value[name] is None:
                del value[name]
            else:
                _default(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            if item is None and "default" in schema["items"]:
                value[i] = copy.deepcopy(schema["items"]["default"])
            _default(value[i], schema["items"])


# Validation ------------------------------------------------------------------------------

# A violation, and whether it keeps the server from evaluating the CEL rules.
_Error = tuple[Violation, bool]

_RULES_NOT_CHECKED = Violation(
    "",
    (
        "Invalid value: null: some validation rules were not checked because the object was "
        "invalid; correct the existing errors to complete validation"
    ),
)


def _violations(obj: Any) -> list[Violation]:
    if not isinstance(obj, dict):
        kind = _quote(_json_type(obj))
        return [Violation("", f"Invalid value: {kind}: must be of type object: {kind}")]
    obj = _with_generated_name({k: v for k, v in obj.items() if k != "status"})
    errors = [
        *_type_meta_errors(obj),
        *_metadata_errors(obj.get("metadata")),
        *_node_errors(obj, _validation_root(), ""),
    ]
    violations = [violation for violation, _ in errors]
    if any(blocking for _, blocking in errors):
        return [*violations, _RULES_NOT_CHECKED]
    return [*violations, *_rule_violations(obj, _cel_root(), "")]


def _with_generated_name(obj: dict) -> dict:
    """obj named as the server names it before validating: generateName (cut to 58
    characters) and 5 random characters."""
    meta = obj.get("metadata")
    prefix = meta.get("generateName") if isinstance(meta, dict) else None
    if not prefix or not isinstance(prefix, str) or meta.get("name"):
        return obj
    return {**obj, "metadata": {**meta, "name": prefix[:58] + "xxxxx"}}


def _type_meta_errors(obj: dict) -> Iterator[_Error]:
    # (A request with another kind or version does not even reach the FederatedJob validation;
    # the server's validation checks them all the same, in these words.)
    for field, expected in _type_meta().items():
        value = obj.get(field, "")
        if isinstance(value, str) and value != expected:
            yield _invalid(field, value, f"must be {expected}")


def _node_errors(value: Any, schema: dict, path: str) -> Iterator[_Error]:
    """The schema checks of one value and all below it, as kube-openapi makes them.

    Like kube-openapi, a value of the wrong type still gets the checks of the type it has (so
    the fields of an object where a string belongs are unknown fields) and the enum check.
    """
    expected, actual = schema.get("type"), _json_type(value)
    if expected and not (actual == expected or (expected, actual) == ("number", "integer")):
        detail = f"{path} in body must be of type {expected}: {_quote(actual)}"
        yield _blocking(path, f"Invalid value: {_quote(actual)}: {detail}")
    if actual == "string":
        yield from _string_errors(_text(value), schema, path)
    elif actual in ("integer", "number"):
        yield from _number_errors(_json_number(value), schema, path)
    elif actual == "array":
        yield from _array_errors(value, schema, path)
    elif actual == "object":
        yield from _object_errors(value, schema, path)
    if "enum" in schema and _text(value) not in schema["enum"]:
        allowed = ", ".join(_quote(str(v)) for v in schema["enum"])
        shown = _go_value(_without_fields(value))
        yield _blocking(path, f"Unsupported value: {shown}: supported values: {allowed}")


def _without_fields(value: Any) -> Any:
    """value as the server shows it in an enum error: it has dropped the (undeclared) fields of
    any object found where a scalar belongs."""
    if isinstance(value, dict):
        return {}
    return [_without_fields(item) for item in value] if isinstance(value, list) else value


def _json_type(value: Any) -> str:
    """The JSON type that kubectl would send for a value loaded from YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if isinstance(_json_number(value), int) else "number"
    if isinstance(value, (str, datetime.date)):
        # kubectl's YAML reads a timestamp as a string.
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _json_number(value: int | float) -> int | float:
    """The number as the server decodes it from kubectl: an integer if it is whole (kubectl
    sends 1.0 as 1) and fits in 64 bits, else a float."""
    if isinstance(value, float) and not value.is_integer():
        return value
    return int(value) if -(2**63) <= value < 2**63 else float(value)


def _text(value: Any) -> Any:
    """A YAML timestamp as the string kubectl would send; any other value as it is."""
    return value.isoformat() if isinstance(value, datetime.date) else value


def _string_errors(text: str, schema: dict, path: str) -> Iterator[_Error]:
    # kube-openapi stops at the first check that a string fails.
    if "maxLength" in schema and len(text) > schema["maxLength"]:
        limit = schema["maxLength"]
        yield _blocking(path, f"Too long: may not be more than {limit} {_plural(limit, 'byte')}")
    elif "minLength" in schema and len(text) < schema["minLength"]:
        detail = f"{path} in body should be at least {schema['minLength']} chars long"
        yield _invalid(path, text, detail)
    elif "pattern" in schema and not _regex(schema["pattern"]).search(text):
        # Go's MatchString, like search(), matches anywhere: the pattern's anchors decide.
        yield _invalid(path, text, f"{path} in body should match '{schema['pattern']}'")


@functools.cache
def _regex(pattern: str) -> Any:
    return re2.compile(pattern)


def _number_errors(number: int | float, schema: dict, path: str) -> Iterator[_Error]:
    for key, relation, exclusive_key, beyond in (
        ("maximum", "less than", "exclusiveMaximum", lambda n, b: n > b),
        ("minimum", "greater than", "exclusiveMinimum", lambda n, b: n < b),
    ):
        if key not in schema:
            continue
        # kube-openapi compares an integer with the bound truncated to an integer.
        bound = math.trunc(schema[key]) if isinstance(number, int) else float(schema[key])
        exclusive = schema.get(exclusive_key, False)
        if beyond(number, bound) or (exclusive and number == bound):
            wording = relation if exclusive else f"{relation} or equal to"
            shown = _go_float(bound) if isinstance(bound, float) else str(bound)
            detail = f"{path} in body should be {wording} {shown}"
            yield _invalid(path, number, detail)


def _array_errors(items: list, schema: dict, path: str) -> Iterator[_Error]:
    # Below x-kubernetes-preserve-unknown-fields, a list the schema does not describe is kept whole.
    keep = {"x-kubernetes-preserve-unknown-fields": True} if _preserves(schema) else {}
    for i, item in enumerate(items):
        yield from _node_errors(item, schema.get("items", keep), f"{path}[{i}]")
    if len(items) < schema.get("minItems", 0):
        detail = f"{path} in body should have at least {schema['minItems']} items"
        yield _invalid(path, len(items), detail)
    if "maxItems" in schema and len(items) > schema["maxItems"]:
        yield _too_many(path, len(items), schema["maxItems"])


def _object_errors(fields: dict, schema: dict, path: str) -> Iterator[_Error]:
    if "maxProperties" in schema and len(fields) > schema["maxProperties"]:
        yield _too_many(path, len(fields), schema["maxProperties"])
    for name, value in fields.items():
        sub = _field_schema(schema, name)
        if sub is not None:
            yield from _node_errors(value, sub, _join(path, name))
        elif not _preserves(schema):
            # Not blocking: the server would drop the field and validate the rest.
            yield Violation(_join(path, name), "field not declared in schema"), False
    for name in schema.get("required", ()):
        if name not in fields:
            yield _blocking(_join(path, name), "Required value")


# Metadata: the name is a DNS subdomain, the namespace a DNS label.
_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = _DNS_LABEL + "(\\." + _DNS_LABEL + ")*"
_NOT_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    f"for validation is '{_DNS_SUBDOMAIN}')"
)
_NOT_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    f"used for validation is '{_DNS_LABEL}')"
)


def _metadata_errors(meta: Any) -> Iterator[_Error]:
    meta = meta if isinstance(meta, dict) else {}
    prefix, name, namespace = (meta.get(k, "") for k in ("generateName", "name", "namespace"))
    if prefix and isinstance(prefix, str):
        # As a prefix, it may end in "-" (the server checks it with its last two characters as "a").
        masked = prefix[:-2] + "a" if len(prefix) > 1 and prefix.endswith("-") else prefix
        for message in _dns_errors(masked, 253, _DNS_SUBDOMAIN, [_NOT_SUBDOMAIN]):
            yield _invalid("metadata.generateName", prefix, message)
    if name == "":
        yield _blocking("metadata.name", "Required value: name or generateName is required")
    elif isinstance(name, str):
        for message in _dns_errors(name, 253, _DNS_SUBDOMAIN, [_NOT_SUBDOMAIN]):
            yield _invalid("metadata.name", name, message)
    if namespace and isinstance(namespace, str):
        dots = ["must not contain dots"] if re2.fullmatch(_DNS_SUBDOMAIN, namespace) else []
        for message in _dns_errors(namespace, 63, _DNS_LABEL, dots or [_NOT_LABEL]):
            yield _invalid("metadata.namespace", namespace, message)


def _dns_errors(name: str, limit: int, pattern: str, mismatch: list[str]) -> list[str]:
    too_long = [f"must be no more than {limit} characters"] if len(name.encode()) > limit else []
    return too_long + ([] if re2.fullmatch(pattern, name) else mismatch)


# The errors, worded by the server's field.Error.


def _invalid(path: str, value: Any, detail: str) -> _Error:
    return Violation(path, f"Invalid value: {_go_value(value)}: {detail}"), False


def _blocking(path: str, message: str) -> _Error:
    return Violation(path, message), True


def _too_many(path: str, count: int, limit: int) -> _Error:
    return _blocking(path, f"Too many: {count}: must have at most {limit} {_plural(limit, 'item')}")


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _preserves(schema: dict) -> bool:
    return schema.get("x-kubernetes-preserve-unknown-fields", False)


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


def _go_value(value: Any) -> str:
    """A value as the server's field.Error prints it: %q for a string, %v for a number or a
    bool, JSON for anything else."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        number = _json_number(value)
        return _go_float(number) if isinstance(number, float) else str(number)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def _quote(text: str) -> str:
    """Go's %q of a string."""

    def escape(char: str) -> str:
        if char in _GO_ESCAPES:
            return _GO_ESCAPES[char]
        if char.isprintable():
            return char
        code = ord(char)
        if code < 0x80:
            return f"\\x{code:02x}"
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return '"' + "".join(map(escape, text)) + '"'


def _go_float(number: float) -> str:
    """Go's %v of a float64: its shortest digits, as an exponent below 1e-4 or from 1e6 on."""
    if not math.isfinite(number):
        return "NaN" if math.isnan(number) else f"{number:+}".replace("inf", "Inf")
    if number == 0:
        return "0"
    _, digits, exponent = decimal.Decimal(repr(abs(number))).normalize().as_tuple()
    mantissa = "".join(map(str, digits))
    point = len(mantissa) + exponent  # where the decimal point falls in the mantissa
    sign = "-" if number < 0 else ""
    if not -4 <= point - 1 < 6:
        fraction = f".{mantissa[1:]}" if len(mantissa) > 1 else ""
        return f"{sign}{mantissa[0]}{fraction}e{point - 1:+03d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{mantissa}"
    whole, fraction = mantissa[:point].ljust(point, "0"), mantissa[point:]
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


# CEL rules -------------------------------------------------------------------------------


def _rule_violations(value: Any, schema: dict, path: str) -> Iterator[Violation]:
    """The CEL rules of value and all below it: a node's own rules first, as the server does."""
    rules = schema.get("x-kubernetes-validations", ())
    if rules:
        this = _to_cel(value, schema)
        for rule in rules:
            yield from _rule_violation(rule, this, schema.get("type", ""), path)
    if isinstance(value, dict):
        for name, child in value.items():
            sub = _field_schema(schema, name)
            if sub is not None:
                yield from _rule_violations(child, sub, _join(path, name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _rule_violations(item, schema.get("items", {}), f"{path}[{i}]")


def _rule_violation(rule: dict, this: Any, node_type: str, path: str) -> Iterator[Violation]:
    message, text = rule.get("message", "").strip(), rule["rule"].strip()
    # A rule's fieldPath names the field at fault below the node the rule sits on.
    for name in rule.get("fieldPath", "").split(".")[1:]:
        path = _join(path, name)
    value = f"Invalid value: {_quote(node_type)}"
    try:
        result = _program(rule["rule"]).evaluate({"self": this})
    except celpy.CELEvalError as error:
        yield Violation(path, f"{value}: {_cel_error(error)} evaluating rule: {message or text}")
        return
    if not (isinstance(result, celtypes.BoolType) and result):
        yield Violation(path, f"{value}: {message or 'failed rule: ' + text}")


def _cel_error(error: celpy.CELEvalError) -> str:
    text = str(error.args[0]) if error.args else str(error)
    # cel-python's words for a missing field; the server's (cel-go's) are "no such key: x".
    missing = "no such member in mapping: "
    return "no such key: " + text[len(missing) :].strip("'") if text.startswith(missing) else text


@functools.cache
def _program(rule: str) -> Any:
    environment = _cel_environment()
    return environment.program(environment.compile(rule))


@functools.cache
def _cel_environment() -> celpy.Environment:
    return celpy.Environment()


def _to_cel(value: Any, schema: dict) -> Any:
    """The CEL value of a value, typed by its schema as the server types it.

    A number is a double even when written as 0, so that a rule like `self.momentum == 0.0`
    holds; an object shows only its declared fields.
    """
    kind = schema.get("type")
    if kind == "object":
        return celtypes.MapType(
            {
                celtypes.StringType(str(name)): _to_cel(field, sub)
                for name, field in value.items()
                if (sub := _field_schema(schema, name)) is not None
            }
        )
    if kind == "array":
        return celtypes.ListType([_to_cel(item, schema.get("items", {})) for item in value])
    if kind == "string":
        return celtypes.StringType(_text(value))
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(int(value))
    if kind == "boolean":
        return celtypes.BoolType(value)
    # An untyped value (x-kubernetes-preserve-unknown-fields) shows rules nothing inside it.
    return celtypes.MapType()
