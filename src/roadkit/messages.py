"""Short listings for one-line error messages: a count and the first few items, not every key."""

from __future__ import annotations

from typing import Iterable


def some_of(items: Iterable[object], noun: str, shown: int = 3) -> str:
    """"N <noun>: a, b, c and N-3 more" (or all of them when there are at most `shown`), so a message
    about a whole model's keys or layers stays one readable line."""
    items = [str(i) for i in items]
    head = ", ".join(items[:shown])
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {noun}: {head}{more}"
