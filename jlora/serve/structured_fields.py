"""Structured output as clients ask for it, turned into a `StructuredOutput` (at most one per request).

- OpenAI (completions and chat): `response_format` {"type": "text"}, {"type": "json_object"} or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (strict or not, the output follows the schema).
- vLLM's extra fields: `structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object"} (vLLM 0.12's
  name), and the `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar` fields it replaced.
- SGLang's /generate: `regex`, `json_schema` (text) or `ebnf` in sampling_params.

Grammars are Lark or GBNF. Shapes are checked here (`RequestError` naming the field); whether a schema, regex or
grammar compiles is checked when the engine takes the request, which refuses it alone (HTTP 400).
"""

from __future__ import annotations

import json

from jlora.errors import RequestError
from jlora.sampling import check_text
from jlora.serve.protocol import show
from jlora.structured import StructuredOutput

VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
SGLANG = {"regex": "regex", "json_schema": "json", "ebnf": "grammar"}
MAX_CHOICES = 256


def _text(field: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{field} must be a non-empty string, got {show(value)}")
    check_text(field, value)
    return value


def _schema(field: str, value) -> str:
    """A JSON schema given as an object (or, where the API allows, as JSON text)."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str) and value:
        check_text(field, value)
        return value
    raise RequestError(f"{field} must be a JSON schema object, got {show(value)}")


def _choice(field: str, value) -> str:
    """A Lark grammar whose only sentences are the given strings."""
    if not isinstance(value, list) or not value or len(value) > MAX_CHOICES:
        raise RequestError(f"{field} must be a list of 1 to {MAX_CHOICES} strings, got {show(value)}")
    return "start: " + " | ".join(json.dumps(_text(f"{field}[{i}]", c)) for i, c in enumerate(value))


def _one(field: str, kind: str, value) -> StructuredOutput:
    """vLLM's and SGLang's kinds (json, regex, choice, grammar) as a StructuredOutput."""
    if kind == "json":
        return StructuredOutput("json_schema", _schema(field, value))
    if kind == "choice":
        return StructuredOutput("grammar", _choice(field, value))
    return StructuredOutput(kind, _text(field, value))


def response_format(value) -> StructuredOutput | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(f"response_format.json_schema must be an object {{name, schema, strict}}, got "
                               f"{show(spec)}")
        if not isinstance(spec.get("name", ""), str):
            raise RequestError(f"response_format.json_schema.name must be a string, got {show(spec['name'])}")
        if not isinstance(spec.get("schema"), dict):
            raise RequestError(f"response_format.json_schema.schema must be a JSON schema object, got "
                               f"{show(spec.get('schema'))}")
        return StructuredOutput("json_schema", json.dumps(spec["schema"]))
    raise RequestError(f"response_format must be {{type: text | json_object | json_schema}}, got {show(value)}")


def _vllm(value) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise RequestError(f"structured_outputs must be an object, got {show(value)}")
    unknown = sorted(set(value) - set(VLLM_KEYS))
    if unknown:
        raise RequestError(f"structured_outputs.{unknown[0]} is not supported (only {', '.join(VLLM_KEYS)})")
    given = [k for k in VLLM_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise RequestError(f"structured_outputs must set exactly one of {', '.join(VLLM_KEYS)}, got {given}")
    if given[0] == "json_object":
        if value["json_object"] is not True:
            raise RequestError(f"structured_outputs.json_object must be true, got {show(value['json_object'])}")
        return StructuredOutput("json_object")
    return _one(f"structured_outputs.{given[0]}", given[0], value[given[0]])


def openai(body: dict) -> StructuredOutput | None:
    """The constraint a completions or chat body asks for, or None."""
    asked = [k for k in ("response_format", "structured_outputs", *GUIDED) if body.get(k) is not None]
    if len(asked) > 1:
        raise RequestError(f"ask for structured output once: got {', '.join(asked)}")
    if not asked:
        return None
    key = asked[0]
    if key == "response_format":
        return response_format(body[key])
    if key == "structured_outputs":
        return _vllm(body[key])
    return _one(key, GUIDED[key], body[key])


def generate(params: dict) -> StructuredOutput | None:
    """The constraint of a /generate body's sampling_params (SGLang's regex, json_schema or ebnf), or None."""
    asked = [k for k in SGLANG if params.get(k) is not None]
    if len(asked) > 1:
        raise RequestError(f"sampling_params takes one of {', '.join(SGLANG)}, got {', '.join(asked)}")
    return _one(asked[0], SGLANG[asked[0]], params[asked[0]]) if asked else None
