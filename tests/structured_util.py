"""Specs and checks shared by the structured-output tests (engine, server, GPU)."""

from __future__ import annotations

import json
import re

from dsv2.engine import StructuredOutputsParams

USER = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
PALETTE = {"type": "object", "additionalProperties": False, "required": ["colour", "ok", "tags"],
           "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                          "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}}}
POINT = {"type": "object", "additionalProperties": False, "required": ["point", "label"],
         "properties": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                  "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                 "y": {"type": "integer", "minimum": -9, "maximum": 9}}},
                        "label": {"type": "string", "pattern": "^[a-z]{1,5}$"}}}
SCHEMAS = [USER, PALETTE, POINT]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["Romeo", "Juliet", "Hamlet", "Ophelia"]
LARK = 'start: "(" NUMBER ("+" NUMBER)~0..3 ")"\nNUMBER: /[0-9]{1,3}/'
LARK_PATTERN = r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)"
NEVER = 'start: a\na: a "x"'  # compiles, but no string is in its language
PROMPTS = ["The user record in JSON:", "HAMLET. To be, or not to be,", "def add(a, b):", "Once upon a time"]


def follows(value, schema: dict) -> bool:
    """`value` against the JSON Schema keywords the schemas here use (no jsonschema package here)."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(follows(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(follows(v, schema.get("items", {})) for v in value))
    if kind == "string":
        return (isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
                and ("pattern" not in schema or re.search(schema["pattern"], value) is not None))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def check_output(spec: StructuredOutputsParams, text: str, finish_reason: str) -> None:
    """A constrained output that finished by itself ("stop") is in its spec's language."""
    assert finish_reason == "stop", (spec, text)
    if spec.json is not None:
        assert follows(json.loads(text), spec.json), (spec.json, text)
    elif spec.json_object:
        assert isinstance(json.loads(text), dict), text
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), (spec.regex, text)
    elif spec.choice is not None:
        assert text in spec.choice, text
    else:
        assert re.fullmatch(LARK_PATTERN, text), text
