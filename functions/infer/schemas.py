"""JSON Schemas a caller sends (a typed answer's, a tool's parameters), compiled safely.

A caller's schema is hostile input that infer runs against values the model produced, so it is
compiled with jsonschema-rs:
- offline: a `$ref` to a URL or a file is refused, never fetched (a schema cannot make infer
  reach an address);
- with linear-time regular expressions: a `pattern` built to backtrack for ever cannot stall the
  process (Python's `re` holds the interpreter while it matches); look-arounds and
  back-references are refused when the schema is checked;
- bounded: its size, and its nesting (a value too deep to check is a mismatch, not a crash).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from functions.errors import Unprocessable

MAX_PROBLEMS = 10  # validation errors reported for one value


class SchemaError(Unprocessable):
    """The schema itself is unusable: the message says where and why."""


@dataclass(frozen=True)
class Schema:
    """A compiled JSON Schema and its source."""

    source: dict[str, Any]
    validator: Any

    def problems(self, value: Any) -> list[str]:
        """What is wrong with `value` (empty when it matches), at most `MAX_PROBLEMS`, each
        with its place in the value (a JSON pointer)."""
        found = []
        try:
            for error in self.validator.iter_errors(value):
                where = "/" + "/".join(str(p) for p in error.instance_path)
                found.append(f"at {where}: {error.message}")
                if len(found) == MAX_PROBLEMS:
                    break
        except (ValueError, RecursionError, OverflowError) as e:  # nested past what is checked
            return [f"the value cannot be checked: {e}"]
        return found


def compile_schema(schema: Any, what: str, max_bytes: int | None) -> Schema:
    """`schema` compiled; `SchemaError` (422) naming `what` when it is not a usable schema (or
    is larger than `max_bytes`, when given)."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{what} must be a JSON Schema object, not {type(schema).__name__}")
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise SchemaError(f"{what} is not a JSON object (or is nested too deeply)") from None
    if max_bytes is not None and size > max_bytes:
        raise SchemaError(f"{what} is {size} bytes; the limit is {max_bytes}")
    try:
        validator = jsonschema_rs.validator_for(
            dict(schema), offline=True, pattern_options=jsonschema_rs.RegexOptions()
        )
    except jsonschema_rs.ValidationError as e:
        where = "/" + "/".join(str(p) for p in e.instance_path)
        raise SchemaError(
            f"{what} is not a valid JSON Schema: {_first_line(e)} (at {where})"
        ) from None
    except (ValueError, RecursionError) as e:  # a reference cycle or nesting past the limit
        raise SchemaError(f"{what} cannot be used: {e}") from None
    return Schema(dict(schema), validator)


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return message.splitlines()[0] if message else "invalid"


@dataclass(frozen=True)
class Checked:
    """An answer checked against its schema: the value and its JSON text, or what is wrong."""

    value: Any = None
    text: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class AnswerSchema:
    """A run's `output_schema`: what the model is told, and the check of its answer."""

    schema: Schema

    @classmethod
    def of(cls, source: Any, max_bytes: int) -> AnswerSchema:
        return cls(compile_schema(source, "output_schema", max_bytes))

    def shown(self) -> str:
        """The schema as the model reads it."""
        return json.dumps(self.schema.source, indent=1, ensure_ascii=False)

    def check(self, content: str | None) -> Checked:
        """The answer's text (a value set in the REPL arrives as its JSON) read as JSON, or taken
        as a plain string when that is what matches."""
        if content is None:
            return Checked(problems=("no answer was set",))
        first: list[str] | None = None
        for value in _readings(content):
            problems = self.schema.problems(value)
            if not problems:
                return Checked(value, json.dumps(value, ensure_ascii=False))
            first = first if first is not None else problems
        return Checked(problems=tuple(first or ()))


def _readings(content: str) -> list[Any]:
    """The values an answer's text may mean: its JSON (inside a ```json fence or not), then the
    text itself."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        text = text[text.index("\n") + 1 : -3].strip()
    try:
        return [json.loads(text), content]
    except (ValueError, RecursionError):
        return [content]
