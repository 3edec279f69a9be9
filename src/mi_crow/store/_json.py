"""JSON metadata: checked completely before anything is written, read back within limits.

Metadata is written as mi_crow 1.0 writes it (Python's ``json``, indent 2, UTF-8). By default
``NaN`` and ``±Infinity`` are accepted and written as Python writes them (the tokens ``NaN``,
``Infinity``): mi_crow records training losses in run metadata, and a diverged run must still
save. ``allow_nan=False`` (an option of every store) writes strict RFC 8259 JSON instead, which
every JSON reader (jq, JavaScript, Rust) can read, and refuses those values. Keys follow Python's
``json`` rules (``int``/``float``/``bool``/``None`` keys become strings); tuples become lists.

Every check here is iterative (no recursion on the caller's data) and bounded by the limits of
:mod:`mi_crow.store.limits`, so neither a deeply nested value nor a hostile file can raise
``RecursionError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from mi_crow.store.errors import InvalidJSONError
from mi_crow.store.limits import MAX_JSON_BYTES, MAX_JSON_DEPTH

# Python's json reader refuses integers of more than sys.get_int_max_str_digits() (4300) digits;
# 14,000 bits is about 4,214 digits, so whatever is written reads back.
MAX_INT_BITS = 14_000


def _scalar_problem(value: Any, path: str, allow_nan: bool) -> str | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            return f"{path} is an integer of {value.bit_length()} bits; at most {MAX_INT_BITS} (about 4,200 digits)"
        return None
    if isinstance(value, float):
        if allow_nan or math.isfinite(value):
            return None
        return (
            f"{path} is {value!r}; strict JSON (allow_nan=False) has no NaN or Infinity "
            "(store None or a string instead, or open the store with allow_nan=True)"
        )
    return (
        f"{path} is a {type(value).__name__}, which is not JSON-serialisable (convert it to a list, number or string)"
    )


def _find_problem(value: Any, root: str, allow_nan: bool) -> str | None:
    """Describe the first value under ``value`` that cannot be written (and read back) as JSON.

    A depth-first walk with an explicit stack: the caller's data never drives recursion.
    """
    if not isinstance(value, (dict, list, tuple)):
        return _scalar_problem(value, root, allow_nan)
    active: set[int] = {id(value)}  # containers on the current path (a circular reference revisits one)
    stack: list[tuple[Any, str, Iterable[tuple[Any, Any]]]] = [
        (value, root, iter(value.items()) if isinstance(value, dict) else enumerate(value))
    ]
    while stack:
        container, path, items = stack[-1]
        step = next(iter(items), None)
        if step is None:
            active.discard(id(container))
            stack.pop()
            continue
        k, v = step
        if isinstance(container, dict):
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{path} has a key {k!r} of type {type(k).__name__}; JSON object keys must be strings"
            if isinstance(k, float) and not allow_nan and not math.isfinite(k):
                return f"{path} has the key {k!r}; strict JSON (allow_nan=False) has no NaN or Infinity"
        child = f"{path}[{k!r}]"
        if isinstance(v, (dict, list, tuple)):
            if id(v) in active:
                return f"{child} contains itself (a circular reference)"
            if len(stack) >= MAX_JSON_DEPTH:
                return f"{child} is nested deeper than {MAX_JSON_DEPTH} levels, the most the store writes"
            active.add(id(v))
            stack.append((v, child, iter(v.items()) if isinstance(v, dict) else enumerate(v)))
        else:
            problem = _scalar_problem(v, child, allow_nan)
            if problem:
                return problem
    return None


def check(meta: Any, what: str, *, reserved: Iterable[str] = (), allow_nan: bool = True) -> dict[str, Any]:
    """Check that ``meta`` is a JSON-serialisable dict without reserved fields.

    Args:
        meta: The caller's metadata.
        what: Its name in error messages (e.g. ``"metadata"``).
        reserved: Top-level field names the store uses itself.
        allow_nan: Whether NaN and ±Infinity may be written (as Python's ``json`` writes them).

    Returns:
        ``meta`` itself, for chaining.

    Raises:
        ValueError: If ``meta`` is not a dict, holds a reserved field, nests deeper than
            ``MAX_JSON_DEPTH``, or holds a value JSON cannot represent; the message names the
            offending path.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{what} must be a dict, got {type(meta).__name__}")
    for name in reserved:
        if name in meta:
            raise ValueError(f"{what} must not contain the field {name!r}: the store writes it itself")
    problem = _find_problem(meta, what, allow_nan)
    if problem:
        raise ValueError(f"{problem}; nothing was written")
    return meta


def _checked_size(data: bytes, what: str) -> bytes:
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(
            f"{what} is {len(data):,} bytes as JSON; at most {MAX_JSON_BYTES:,} are stored "
            "(store large values as tensors); nothing was written"
        )
    return data


def dumps(obj: Any, *, allow_nan: bool = True, what: str = "metadata") -> bytes:
    """Serialise checked metadata the way mi_crow 1.0 does (indent 2, UTF-8, no ASCII escaping).

    Raises:
        ValueError: If the result would be larger than ``MAX_JSON_BYTES``.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=allow_nan)
    except (TypeError, ValueError, RecursionError) as e:  # pragma: no cover - check() ran first
        raise ValueError(f"{what} is not JSON-serialisable: {e}; nothing was written") from None
    return _checked_size(text.encode("utf-8", "surrogatepass"), what)


def dumps_compact(obj: Any, *, allow_nan: bool = True, what: str = "metadata") -> str:
    """Serialise checked metadata compactly (inside a safetensors header)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=allow_nan)
    except (TypeError, ValueError, RecursionError) as e:  # pragma: no cover - check() ran first
        raise ValueError(f"{what} is not JSON-serialisable: {e}; nothing was written") from None
    _checked_size(text.encode("utf-8", "surrogatepass"), what)
    return text


def loads(data: bytes | str, where: str) -> Any:
    """Parse JSON read from ``where``; any failure names the file.

    Raises:
        InvalidJSONError: (a ``json.JSONDecodeError`` and a ``CorruptFileError``) if ``data`` is
            larger than ``MAX_JSON_BYTES``, not UTF-8, not valid JSON, nested too deeply for the
            parser, or holds an integer too long to parse.
    """
    if len(data) > MAX_JSON_BYTES:
        raise InvalidJSONError(where, f"{len(data):,} bytes of JSON; at most {MAX_JSON_BYTES:,} are read")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidJSONError(where, f"invalid UTF-8 in JSON ({e})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise InvalidJSONError(
            where, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", e.doc, e.pos
        ) from None
    except RecursionError:
        raise InvalidJSONError(
            where, f"JSON nested too deeply to parse (the store writes at most {MAX_JSON_DEPTH})"
        ) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise InvalidJSONError(where, f"invalid JSON: {e}") from None
