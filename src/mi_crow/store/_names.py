"""The one place where names that become parts of paths are checked.

Every run id, layer signature, tensor key, model id and store prefix passes through
:func:`check_name` (or :func:`check_relpath`, which applies it to each component)
before any I/O happens, so that no name can address a file outside ``base_path``.
"""

from __future__ import annotations

import operator
import re
from typing import Any

from mi_crow.store.limits import MAX_BATCH_INDEX, MAX_KEY_BYTES, MAX_NAME_BYTES

# Names beginning with "." are reserved for the store's own files (temp files, staging
# directories, the run-level append log); refusing them keeps user names and internal
# names from ever colliding.
RESERVED_PREFIX = "."


# Printable ASCII without "/" and "\\", not starting with "." or a space, at most 200 long: valid.
# The common case is decided by this one match; everything else takes the detailed checks below.
_PLAIN_NAME = re.compile(r"[!-\-0-\[\]-~][ -.0-\[\]-~]{0,199}")


def check_name(value: Any, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise ``ValueError``.

    Args:
        value: The candidate name (a run id, layer signature, tensor key or model id).
        what: What the name is, used in the error message (e.g. ``"run_id"``).

    Returns:
        The validated name, unchanged.

    Raises:
        ValueError: If ``value`` is not a ``str``, is empty or blank, is ``.`` or ``..``,
            begins with ``.``, contains ``/``, ``\\``, NUL or another control character (C0, DEL, C1),
            cannot be encoded as UTF-8, or is longer than 200 bytes.
    """
    if type(value) is str and _PLAIN_NAME.fullmatch(value):
        return value
    return check_name_fully(value, what)


def check_name_fully(value: Any, what: str) -> str:
    """:func:`check_name` without its fast path: every rule, with a message for each."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value or not value.strip():
        raise ValueError(f"{what} must be a non-empty, non-blank string, got {value!r}")
    if value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not allowed: it would address a directory outside its place")
    if "/" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} contains a path separator ('/' or '\\'); names are single path components")
    bad = [c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F]
    if bad:
        raise ValueError(
            f"{what} {value!r} contains a control character {bad[0]!r} "
            "(C0 controls U+0000-U+001F, DEL and C1 controls U+0080-U+009F are refused)"
        )
    if value.startswith(RESERVED_PREFIX):
        raise ValueError(
            f"{what} {value!r} begins with '.', which is reserved for the store's own files; "
            "choose a name that starts with another character"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {value!r} cannot be encoded as UTF-8: {e}") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} is {size} bytes long in UTF-8; at most {MAX_NAME_BYTES} are allowed: {value[:40]!r}..."
        )
    return value


def check_relpath(value: Any, what: str) -> str:
    """Return ``value`` if it is a relative ``/``-separated path of safe components.

    Used for store prefixes (``runs_prefix`` ...) and the keys of ``put_tensor``.

    Raises:
        ValueError: If ``value`` is not a ``str``, is empty, absolute, or any component
            fails :func:`check_name`.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{what} must be a non-empty relative path, got {value!r}")
    if value.startswith("/") or value.startswith("\\"):
        raise ValueError(f"{what} {value!r} is an absolute path; it must be relative to base_path")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"{what} is {size} bytes long in UTF-8; at most {MAX_KEY_BYTES} are allowed: {value[:40]!r}..."
        )
    for part in value.split("/"):
        try:
            check_name(part, what)
        except ValueError as e:
            raise ValueError(f"{what} {value!r} has an unsafe component: {e}") from None
    return value


def check_batch_index(value: Any, what: str = "batch_index") -> int:
    """Return ``value`` as an ``int`` if it is a non-negative integer.

    ``bool``, ``float`` and ``str`` are refused even where Python would convert them;
    integer-like objects (``numpy.int64``, 0-d integer tensors) are accepted.

    Raises:
        ValueError: If ``value`` is not an integer or is negative.
    """
    if isinstance(value, (bool, float, str, bytes)):
        raise ValueError(f"{what} must be a non-negative int, got {type(value).__name__} {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a non-negative int, got {type(value).__name__} {value!r}") from None
    if index < 0:
        raise ValueError(f"{what} must be non-negative, got {index}")
    if index > MAX_BATCH_INDEX:
        raise ValueError(f"{what} {index} is larger than {MAX_BATCH_INDEX} (2**63 - 1), the largest index stored")
    return index


def check_prefix(value: Any, what: str) -> str:
    """Return ``value`` if it is a valid store prefix: ``""`` (the top of ``base_path``, as mi_crow
    1.0 allows) or a relative path that :func:`check_relpath` accepts."""
    if value == "":
        return ""
    return check_relpath(value, what)


def check_layer(value: Any, what: str = "layer signature") -> str:
    """A layer signature as a name: mi_crow 1.0 also takes ``int`` signatures (``register_hook(layer_signature:
    str | int)``) and stores them as ``str(layer)``; so does this store (``bool`` is refused)."""
    if type(value) is int:
        value = str(value)
    return check_name(value, what)
