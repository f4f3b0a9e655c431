"""Read a ds_config from a path, a dict, a JSON/hjson string or base64 of one, the way DeepSpeed reads it.

DeepSpeed reads configs with hjson (a JSON superset: ``#``, ``//`` and ``/* */`` comments, unquoted
keys and strings, optional and trailing commas) and rejects duplicate keys; we do the same, so a
config file that starts DeepSpeed starts zero-all. Strict JSON is tried first (its errors point at
the exact character), then hjson. Comments are
stripped by a small scanner that knows about JSON strings, so ``"http://host"`` or a path
containing ``//`` inside a string is left alone.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "load_config_source", "strip_json_comments"]


class ConfigError(ValueError):
    """A ds_config problem: the message names the key path and what is accepted."""


def strip_json_comments(text: str) -> str:
    """Remove ``// ...`` and ``/* ... */`` comments outside JSON strings (newlines are kept for line numbers)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ConfigError("ds_config: unterminated /* comment")
            out.append("\n" * text.count("\n", i, end))  # keep line numbers in JSON errors right
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"ds_config: duplicate key {key!r} (DeepSpeed rejects duplicate keys too; keep one)")
        seen[key] = value
    return seen


def _parse(text: str, origin: str) -> dict[str, Any]:
    """JSON (with comments) first, for its precise errors; then hjson, the superset DeepSpeed reads configs with."""
    try:
        value = json.loads(strip_json_comments(text), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, ConfigError) as e:
        if isinstance(e, ConfigError) and "duplicate key" in str(e):
            raise
        value = _parse_hjson(text, origin, e)
    if not isinstance(value, dict):
        raise ConfigError(f"ds_config {origin}: the top level must be a JSON object, got {type(value).__name__}")
    return value


def _parse_hjson(text: str, origin: str, json_error: Exception) -> Any:
    import hjson

    try:
        return hjson.loads(text, object_pairs_hook=_no_duplicates)
    except ConfigError:
        raise  # a duplicate key
    except (ValueError, IndexError) as e:  # HjsonDecodeError is a ValueError; hjson 3.1 raises IndexError at EOF
        if isinstance(json_error, ConfigError):
            raise json_error from None  # our comment scanner's own message (an unterminated /* comment)
        assert isinstance(json_error, json.JSONDecodeError)
        also = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, hjson.HjsonDecodeError) else "truncated"
        raise ConfigError(
            f"ds_config {origin}: not valid JSON at line {json_error.lineno} column {json_error.colno}: "
            f"{json_error.msg} (nor hjson: {also})"
        ) from None


def _base64_config(source: str) -> str | None:
    """The text of a base64-encoded config (DeepSpeed accepts one in place of a path), or None."""
    text = source.strip()
    if not text or len(text) % 4 or not re.fullmatch(r"[A-Za-z0-9+/_=-]+", text):
        return None
    try:
        decoded = base64.urlsafe_b64decode(text).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded if decoded.lstrip().startswith("{") else None


def load_config_source(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Return the config as a plain dict from a dict, a JSON/hjson file, a JSON/hjson string or base64 of one.

    A string is read as a path when such a file exists, else as JSON/hjson text when it starts with
    ``{``, else as base64 (as DeepSpeed does); anything else is an error naming what was tried.
    """
    if isinstance(source, dict):
        # Round-trip through JSON so the engine never shares (or mutates) the caller's dict and
        # non-JSON values (tensors, objects) are caught here with a clear message.
        try:
            return json.loads(json.dumps(source))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"ds_config dict must hold only JSON values: {e}") from e
    if isinstance(source, str) and not source.lstrip().startswith(("{", "[")) and not Path(source).is_file():
        decoded = _base64_config(source)
        if decoded is not None:
            return _parse(decoded, "base64 string")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"ds_config: no such file {str(path)!r} (pass a path, a dict, a JSON/hjson string or base64 of one)"
            )
        return _parse(path.read_text(encoding="utf-8"), str(path))
    if isinstance(source, str):
        return _parse(source, "string")
    raise ConfigError(f"ds_config must be a path, a dict or a JSON string, got {type(source).__name__}")
