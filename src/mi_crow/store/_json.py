"""JSON metadata: checked completely before anything is written, read back strictly.

Metadata is written as standard JSON (RFC 8259): ``NaN`` and ``±Infinity`` are refused
rather than written as the non-standard tokens Python's ``json`` would emit, so every JSON
reader (jq, JavaScript, Rust) can read the files. Keys follow Python's ``json`` rules
(``int``/``float``/``bool``/``None`` keys become strings); tuples become lists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any


def _find_problem(value: Any, path: str, active: set[int] | None = None) -> str | None:
    """Describe the first value under ``value`` that cannot be written as strict JSON."""
    if active is None:
        active = set()
    if isinstance(value, (dict, list, tuple)):
        if id(value) in active:
            return f"{path} contains itself (a circular reference)"
        active.add(id(value))
        try:
            return _find_container_problem(value, path, active)
        finally:
            active.discard(id(value))
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{path} is {value!r}; JSON has no NaN or Infinity (store None or a string instead)"
    return (
        f"{path} is a {type(value).__name__}, which is not JSON-serialisable (convert it to a list, number or string)"
    )


def _find_container_problem(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str, active: set[int]
) -> str | None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{path} has a key {k!r} of type {type(k).__name__}; JSON object keys must be strings"
            if isinstance(k, float) and not math.isfinite(k):
                return f"{path} has the key {k!r}; JSON has no NaN or Infinity"
            found = _find_problem(v, f"{path}[{k!r}]", active)
            if found:
                return found
        return None
    for i, v in enumerate(value):
        found = _find_problem(v, f"{path}[{i}]", active)
        if found:
            return found
    return None


def encode_metadata(meta: Any, what: str, *, reserved: Iterable[str] = ()) -> dict[str, Any]:
    """Check that ``meta`` is a JSON-serialisable dict without reserved fields.

    Args:
        meta: The caller's metadata.
        what: Its name in error messages (e.g. ``"metadata"``).
        reserved: Top-level field names the store uses itself.

    Returns:
        ``meta`` itself, for chaining.

    Raises:
        ValueError: If ``meta`` is not a dict, holds a reserved field, or holds a value
            strict JSON cannot represent; the message names the offending path.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{what} must be a dict, got {type(meta).__name__}")
    for name in reserved:
        if name in meta:
            raise ValueError(f"{what} must not contain the field {name!r}: the store writes it itself")
    problem = _find_problem(meta, what)
    if problem:
        raise ValueError(f"{problem}; nothing was written")
    return meta


def dumps(obj: Any) -> bytes:
    """Serialise checked metadata the way mi_crow 1.0 does (indent 2, UTF-8, no ASCII escaping)."""
    try:
        return json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:  # e.g. a circular reference
        raise ValueError(f"metadata is not JSON-serialisable: {e}; nothing was written") from e


def loads(data: bytes, where: str) -> Any:
    """Parse JSON read from ``where``; a parse error names the file.

    Raises:
        json.JSONDecodeError: If ``data`` is not valid JSON (the message names ``where``).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"Invalid UTF-8 in JSON file {where}: {e}", "", 0) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json.JSONDecodeError(f"Invalid JSON in {where}: {e.msg}", e.doc, e.pos) from None
