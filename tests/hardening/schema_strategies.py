"""Hypothesis strategies from the JSON Schemas of an OpenAPI document (the subset pydantic writes: $ref,
anyOf, type, properties / required / additionalProperties, items, min/max length, items and bounds, enum,
const), plus the hostile variants of a body a schema describes.

``valid(schema)`` draws documents the schema accepts; ``hostile(schema)`` draws ones that break it the ways
callers do (a boolean for an integer, a 5,000-digit number, a lone surrogate, a missing required key, an
unknown key, a number that overflows, a nested structure where a string goes) and ``raw_bodies(schema)``
bytes a JSON parser sees (truncated, duplicated keys, NaN, non-UTF-8). hypothesis-jsonschema would do the
first part but no longer runs on current Hypothesis (it calls a Hypothesis internal that is gone).
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4)),
                        max_leaves=12)
# Values that break a field the ways the hostile test of issue 20 did, as raw JSON text.
HOSTILE_JSON = ("true", "false", "null", "1.0", "-1", "0", "1e999", "-1e999", "NaN", "Infinity", "7" * 5000,
                '"\\ud800"', '"\\udfff tail"', '"' + "\U0001f600" * 900 + '"', '""', '"' + "x" * 5000 + '"',
                "[]", "{}", "[[[[[[[[[[]]]]]]]]]]", '{"nested": {"deeper": [1, 2, {"x": null}]}}', '"\\u0000"',
                '"\\u2028"', "123456789012345678901234567890", "-0", "1e-400", '["\\ud83d"]')


class SchemaStrategies:
    """Strategies for the schemas of one document; ``definitions`` maps a $ref to its schema."""

    def __init__(self, definitions: dict[str, dict], ref_prefix: str = "#/components/schemas/"):
        self.definitions = definitions
        self.ref_prefix = ref_prefix

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.definitions[schema["$ref"].removeprefix(self.ref_prefix)]
        return schema

    def valid(self, schema: dict) -> st.SearchStrategy:
        schema = self.resolve(schema)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "anyOf" in schema:
            return st.one_of(*(self.valid(option) for option in schema["anyOf"]))
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of(*(self.valid({**schema, "type": k}) for k in kind))
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return st.integers(schema.get("minimum"), schema.get("maximum"))
        if kind == "number":
            return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
        if kind == "string":
            return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
        if kind == "array":
            return st.lists(self.valid(schema.get("items", {})), min_size=schema.get("minItems", 0),
                            max_size=min(schema.get("maxItems", 4), 4))
        if kind == "object":
            return self._object(schema)
        return ANY_JSON

    def _object(self, schema: dict) -> st.SearchStrategy:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))

        @st.composite
        def build(draw) -> dict:
            out = {}
            for name, sub in properties.items():
                if name in required or draw(st.booleans()):
                    out[name] = draw(self.valid(sub))
            return out

        return build()

    def hostile(self, schema: dict, bodies: st.SearchStrategy[dict] | None = None) -> st.SearchStrategy[str]:
        """JSON text of an object the schema describes (drawn from ``bodies``, default ``valid(schema)``) with one
        or two fields broken (see module docstring)."""
        schema = self.resolve(schema)
        names = sorted(schema.get("properties", {}))
        valid = bodies if bodies is not None else self.valid(schema)

        @st.composite
        def build(draw) -> str:
            body = draw(valid)
            fields = {name: json.dumps(value) for name, value in body.items()}
            for _ in range(draw(st.integers(1, 2))):
                action = draw(st.sampled_from(["break", "break", "drop", "unknown", "any"]))
                if action == "drop" and fields:
                    fields.pop(draw(st.sampled_from(sorted(fields))))
                elif action == "unknown":
                    fields[draw(st.text(min_size=1, max_size=12))] = draw(st.sampled_from(HOSTILE_JSON))
                elif action == "any":
                    fields[draw(st.sampled_from(names))] = json.dumps(draw(ANY_JSON))
                else:
                    fields[draw(st.sampled_from(names))] = draw(st.sampled_from(HOSTILE_JSON))
            return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"

        return build()

    def raw_bodies(self, schema: dict, bodies: st.SearchStrategy[dict] | None = None) -> st.SearchStrategy[bytes]:
        """Bytes a JSON parser chokes on, made from a valid body."""
        valid = (bodies if bodies is not None else self.valid(schema)).map(lambda body: json.dumps(body).encode())

        @st.composite
        def build(draw) -> bytes:
            text = draw(valid)
            how = draw(st.sampled_from(["truncate", "non-utf8", "duplicate", "bom", "garbage"]))
            if how == "truncate":
                return text[:draw(st.integers(0, max(0, len(text) - 1)))]
            if how == "non-utf8":
                at = draw(st.integers(0, len(text)))
                return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + text[at:]
            if how == "duplicate" and text.startswith(b"{") and len(text) > 2:
                return b'{"model": "a", "model": "b", ' + text[1:]
            if how == "bom":
                return b"\xef\xbb\xbf" + text
            return draw(st.binary(max_size=64))

        return build()


def request_schemas(openapi: dict) -> tuple[SchemaStrategies, dict[str, dict]]:
    """(strategies, path -> request body schema) of an OpenAPI document's POST routes."""
    strategies = SchemaStrategies(openapi["components"]["schemas"])
    bodies = {path: item["post"]["requestBody"]["content"]["application/json"]["schema"]
              for path, item in openapi["paths"].items() if "post" in item}
    return strategies, bodies

