"""Progress bars (tqdm) for long work in the Python API: shown by default, off in quiet mode.

Quiet mode, as Hugging Face libraries have it: :func:`disable_progress_bars` in the process, or
the environment variable ``MI_CROW_STORE_DISABLE_PROGRESS_BARS=1`` (``TQDM_DISABLE=1`` too). A
function's own ``progress=`` argument wins over both. Without tqdm installed nothing is shown.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_disabled = False
ENV = "MI_CROW_STORE_DISABLE_PROGRESS_BARS"


def disable_progress_bars() -> None:
    """Quiet mode: no progress bars unless a call asks for one (``progress=True``)."""
    global _disabled
    _disabled = True


def enable_progress_bars() -> None:
    """Undo :func:`disable_progress_bars` (the environment variables still apply)."""
    global _disabled
    _disabled = False


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a bar: ``progress`` when given, else not in quiet mode."""
    if progress is not None:
        return bool(progress)
    if _disabled:
        return False
    return not any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in (ENV, "TQDM_DISABLE"))


class _NoBar:
    """What a disabled bar is: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(progress: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (``kwargs`` are tqdm's: ``total``, ``desc``, ``unit``...), or one that
    shows nothing when progress is off or tqdm is not installed."""
    if not progress_enabled(progress):
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
