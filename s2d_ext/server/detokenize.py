"""Incremental detokenization and stop strings for streamed text.

A streamed token may complete a multi-byte character only with the next one, so the text of the tokens so
far is decoded whole and only its settled part (no trailing replacement character) is sent. Stop strings
are found in the settled text; the text is cut before the first one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The text of one request's tokens, handed out as deltas."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def add(self, tokens: Sequence[int], final: bool = False) -> str:
        """Append ``tokens``; returns the new text that is settled (all of it when ``final``)."""
        self.tokens += list(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        cut = min(
            (i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            text, self.stopped = text[:cut], True
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta
