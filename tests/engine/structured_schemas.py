"""JSON schemas for the structured-output tests: nested objects, arrays with bounds, enums, numbers with
bounds, strings with patterns and formats, optional fields, $defs / $ref, anyOf, const. Strings and
arrays are bounded so that a constrained completion always fits its token budget."""

from __future__ import annotations

S = {"type": "string", "maxLength": 12}
I = {"type": "integer", "minimum": -1000, "maximum": 1000}


def obj(props: dict, required: list | None = None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


SCHEMAS: list[dict] = [
    obj({"name": S}),
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"x": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}}),
    obj({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"size": {"enum": [1, 2, 3]}, "unit": {"const": "cm"}}),
    obj({"v": {"type": "null"}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"nums": {"type": "array", "items": I, "minItems": 2, "maxItems": 2}}),
    obj({"empty": {"type": "array", "items": I, "maxItems": 0}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"day": {"type": "string", "format": "date"}}),
    obj({"at": {"type": "string", "format": "date-time"}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
    obj({"mail": {"type": "string", "format": "email", "maxLength": 30}}),
    obj({"short": {"type": "string", "minLength": 2, "maxLength": 4}}),
    obj({"a": S, "b": I}, required=["a"]),
    obj({"a": S, "b": I, "c": {"type": "boolean"}}, required=[]),
    obj({"person": obj({"first": S, "last": S})}),
    obj({"outer": obj({"inner": obj({"leaf": I})})}),
    obj({"address": obj({"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}), "name": S}),
    obj({"items": {"type": "array", "items": obj({"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
                   "minItems": 1, "maxItems": 2}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": I, "maxItems": 2}, "maxItems": 2}}),
    {"type": "array", "items": S, "maxItems": 3},
    {"type": "array", "items": obj({"k": S}), "minItems": 1, "maxItems": 2},
    {"type": "string", "maxLength": 10},
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "boolean"},
    {"enum": ["yes", "no", "maybe"]},
    obj({"value": {"anyOf": [I, S]}}),
    obj({"value": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}}),
    obj({"shape": {"oneOf": [obj({"kind": {"const": "circle"}, "r": I}), obj({"kind": {"const": "square"}, "side": I})]}}),
    {"$defs": {"point": obj({"x": I, "y": I})}, **obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}})},
    {"$defs": {"name": S}, **obj({"names": {"type": "array", "items": {"$ref": "#/$defs/name"}, "maxItems": 2}})},
    {"$defs": {"leaf": obj({"v": I})}, **obj({"tree": obj({"left": {"$ref": "#/$defs/leaf"},
                                                            "right": {"$ref": "#/$defs/leaf"}})})},
    obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
         "genre": {"enum": ["drama", "comedy", "horror"]}}),
    obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180,
                                                                           "maximum": 180}}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 10000}, "currency": {"enum": ["EUR", "USD"]}}),
    obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99999}, "admin": {"type": "boolean"}}),
         "roles": {"type": "array", "items": {"enum": ["read", "write"]}, "maxItems": 2}}),
    obj({"answer": {"type": "string", "enum": ["A", "B", "C", "D"]}, "confidence": {"type": "number", "minimum": 0,
                                                                                    "maximum": 1}}),
    obj({"steps": {"type": "array", "items": S, "minItems": 2, "maxItems": 3}, "done": {"type": "boolean"}}),
    obj({"meta": {"type": "object", "additionalProperties": I, "maxProperties": 2}}),
    obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$", "maxLength": 11}}),
    obj({"word": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8}, "count": I}),
    obj({"opt": obj({"x": I}, required=[])}),
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}}),
    obj({"pair": {"type": "array", "prefixItems": [S, I], "items": False}}),
    obj({"nullable": {"type": ["string", "null"], "maxLength": 6}}),
]
