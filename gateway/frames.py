"""Reading a WebSocket client's text frame defensively: `parse_frame` and `safe_id`.

``json.loads`` alone accepts ``NaN`` and ``Infinity`` (which no JSON encoder then writes back),
turns ``1e999`` into infinity, raises `RecursionError` past the recursion limit and `ValueError`
for integers longer than Python's int-string limit; `parse_frame` turns each into a `FrameError`
and also bounds nesting (`MAX_DEPTH`), so that nothing a client sends reaches an encoder it breaks.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # nesting of objects and arrays in one frame (the frame itself is 1)
MAX_ID_CHARS = 128
MAX_SAFE_INT = 2**53 - 1  # what a JavaScript client reads back exactly


class FrameError(Exception):
    """A client frame that cannot be handled: ``message`` says why (never echoing much of it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def parse_frame(text: str) -> dict[str, Any]:
    """A client's text frame as a JSON object, or `FrameError`: malformed JSON, ``NaN``/``Infinity``
    or numbers out of float range, integers past Python's digit limit, nesting past `MAX_DEPTH`
    (also when it is past the recursion limit), anything but an object."""
    try:
        frame = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise FrameError(f"malformed JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise FrameError(f"malformed JSON: nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # NaN, Infinity, 1e999, an integer past sys.get_int_max_str_digits()
        raise FrameError(f"malformed JSON: {str(exc)[:160]}") from None
    if not isinstance(frame, dict):
        raise FrameError("a frame is a JSON object with a `type`")
    if text.count("{") + text.count("[") > MAX_DEPTH and _too_deep(frame, MAX_DEPTH):
        raise FrameError(f"malformed JSON: nested more than {MAX_DEPTH} deep")
    return frame


def safe_id(value: Any) -> str | int | None:
    """A frame's ``id`` if it may be echoed (None when absent); `FrameError` for any other value."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SAFE_INT:
        return value
    raise FrameError(f"`id` must be a string of up to {MAX_ID_CHARS} characters or an integer "
                     f"within +-{MAX_SAFE_INT}")
