"""Client-supplied values made safe for one log line: control characters escaped, length bounded.

Task ids, audio references and error texts come from whoever calls the backend. Logged raw,
a newline forges a log line and a megabyte id writes a megabyte line; :func:`clip` prevents both.
"""

from __future__ import annotations

MAX_LOGGED_CHARS = 160


def clip(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as one printable line of at most about ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}…(+{len(text) - limit} chars)"
    if text.isprintable():
        return text
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")
