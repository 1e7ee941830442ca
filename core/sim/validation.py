"""Request bodies read the way FastAPI with pydantic 1 reads them.

Every field of A1111's request models is optional; values are coerced as pydantic 1
coerces them (`"8"` → 8, `7` → 7.0, `"yes"` → True), unknown keys are dropped, and a
value that cannot be coerced gives FastAPI's 422 body `{"detail": [{loc, msg, type}]}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class RequestValidationError(Exception):
    """A body FastAPI would refuse with 422; `errors` is its `detail` list."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


class _Invalid(Exception):
    def __init__(self, msg: str, type_: str, ctx: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.msg, self.type, self.ctx = msg, type_, ctx


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or FastAPI's `value_error.jsondecode` error."""
    doc = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(doc)
    except json.JSONDecodeError as exc:
        ctx = {"msg": exc.msg, "doc": doc, "pos": exc.pos, "lineno": exc.lineno, "colno": exc.colno}
        raise RequestValidationError(
            [{"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode", "ctx": ctx}]
        ) from None


def _integer(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _Invalid("value is not a valid integer", "type_error.integer") from None


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise _Invalid("value is not a valid float", "type_error.float") from None


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise _Invalid("str type expected", "type_error.str")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _Invalid("value could not be parsed to a boolean", "type_error.bool")


def _array(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _Invalid("value is not a valid list", "type_error.list")


def _object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _Invalid("value is not a valid dict", "type_error.dict")


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "integer": _integer,
    "number": _number,
    "string": _string,
    "boolean": _boolean,
    "array": _array,
    "object": _object,
}


def _check_limits(value: Any, spec: Mapping[str, Any]) -> None:
    if "enum" in spec and value not in spec["enum"]:
        permitted = ", ".join(map(repr, spec["enum"]))
        raise _Invalid(
            f"unexpected value; permitted: {permitted}",
            "value_error.const",
            {"given": value, "permitted": spec["enum"]},
        )
    if "minimum" in spec and value < spec["minimum"]:
        limit = spec["minimum"]
        raise _Invalid(
            f"ensure this value is greater than or equal to {limit}",
            "value_error.number.not_ge",
            {"limit_value": limit},
        )
    if "maximum" in spec and value > spec["maximum"]:
        limit = spec["maximum"]
        raise _Invalid(
            f"ensure this value is less than or equal to {limit}",
            "value_error.number.not_le",
            {"limit_value": limit},
        )


def _field(value: Any, spec: Mapping[str, Any], loc: list[Any]) -> tuple[Any, list[dict[str, Any]]]:
    coerce = _COERCERS.get(spec["type"])
    if value is None or coerce is None:
        return value, []
    try:
        value = coerce(value)
        _check_limits(value, spec)
    except _Invalid as exc:
        error = {"loc": loc, "msg": exc.msg, "type": exc.type}
        if exc.ctx is not None:
            error["ctx"] = exc.ctx
        return None, [error]
    if spec["type"] == "array" and "items" in spec:
        results = [_field(item, {"type": spec["items"]}, [*loc, i]) for i, item in enumerate(value)]
        errors = [error for _, item_errors in results for error in item_errors]
        return [item for item, _ in results], errors
    return value, []


def validate(
    body: Any, fields: Mapping[str, Mapping[str, Any]], *, forbid_extra: bool = False
) -> dict[str, Any]:
    """Every field of the model in order, coerced, with defaults filled in."""
    if not isinstance(body, dict):
        raise RequestValidationError(
            [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
        )
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, spec in fields.items():
        if name not in body:
            values[name] = json.loads(json.dumps(spec.get("default")))  # a fresh copy
            continue
        values[name], field_errors = _field(body[name], spec, ["body", name])
        errors += field_errors
    if forbid_extra:
        errors += [
            {"loc": ["body", name], "msg": "extra fields not permitted", "type": "value_error.extra"}
            for name in body
            if name not in fields
        ]
    if errors:
        raise RequestValidationError(errors)
    return values
