"""Short listings for one-line error messages: a count and the first few items, not every key."""

from __future__ import annotations

from typing import Iterable, Optional


def some_of(items: Iterable[object], noun: Optional[str] = None, shown: int = 3) -> str:
    """ "a, b, c and N-3 more" (all of them when there are at most `shown`), after "<noun> (N): " when a
    noun is given, so a message about a whole model's keys or layers stays one readable line."""
    texts = [str(i) for i in items]
    listed = ", ".join(texts[:shown]) + (f" and {len(texts) - shown} more" if len(texts) > shown else "")
    return f"{noun} ({len(texts)}): {listed}" if noun else listed
