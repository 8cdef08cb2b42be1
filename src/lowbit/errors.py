"""The one exception type that lowbit raises for bad input; the CLI prints it as one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class LowbitError(Exception):
    """A user-facing error: bad input, missing file, unknown preset. The message is the whole story."""


def validation_message(e: "ValidationError") -> str:
    """A pydantic validation error in one line: ``field.path: what is wrong; ...``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
