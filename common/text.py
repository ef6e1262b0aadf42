"""Small text helpers for messages people read (console flashes, banners, errors)."""

from __future__ import annotations

SENTENCE_ENDS = (".", "!", "?", "…")


def sentence(text: str) -> str:
    """`text` ending a sentence: a full stop is added unless it already ends with one (a name like "Demo Inc.",
    a reason someone typed with its own full stop)."""
    text = str(text).rstrip()
    return text if text.endswith(SENTENCE_ENDS) else text + "."
