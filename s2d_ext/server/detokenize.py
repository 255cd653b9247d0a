"""Incremental detokenization and stop strings for streamed text.

A streamed token may complete a multi-byte character only with the next one, so the text of the tokens so
far is decoded whole and only its settled part (no trailing replacement character) is sent. Stop strings
are found in the settled text; the text is cut before the first one. Until the request is final the last
``max(len(stop)) - 1`` characters are held back, since they may be the start of a stop string that the
next tokens complete (vLLM holds back the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The text of one request's tokens, handed out as deltas.

    Once a stop string is found, :attr:`stopped` is True and :attr:`num_tokens` is the number of tokens
    up to and including the one that completed the stop string: the tokens to report (ids, logprobs,
    usage). Before that, :attr:`num_tokens` is every token added.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # NOTE: as in vLLM, a stop string counts only once min_tokens tokens were generated: one that ends
        # within the text of the first min_tokens - 1 tokens never stops the request.
        self.min_tokens = min_tokens
        self.floor: int | None = 0 if min_tokens <= 1 else None  # characters a stop string must end after
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False
        self.num_tokens = 0

    def _settled(self, tokens: Sequence[int], final: bool) -> str:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        return text

    def add(self, tokens: Sequence[int], final: bool = False) -> str:
        """Append ``tokens``; returns the new text that is settled (all of it when ``final``)."""
        if self.stopped:
            return ""
        before = len(self.tokens)
        self.tokens += list(tokens)
        self.num_tokens = len(self.tokens)
        text = self._settled(self.tokens, final)
        if self.floor is None and len(self.tokens) >= self.min_tokens:
            self.floor = len(self._settled(self.tokens[: self.min_tokens - 1], False))
        # NOTE: a stop string starting before ``sent`` was whole in the previous text (the hold-back), so
        # it would have been found then; searching from a little before ``sent`` is enough.
        found = []
        if self.floor is not None:
            for s in self.stop:
                i = text.find(s, max(0, self.sent - len(s), self.floor - len(s) + 1))
                if i >= 0:
                    found.append((i, i + len(s)))
        if found:
            cut, end = min(found)
            text, self.stopped = text[:cut], True
            self.num_tokens = self._tokens_through(end, before)
        elif not final and self.hold:
            text = text[: max(self.sent, len(text) - self.hold)]
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta

    def _tokens_through(self, end: int, start: int) -> int:
        """The fewest leading tokens whose settled text reaches character ``end``.

        NOTE: the stop string ended in this call's text, so the search starts at the tokens held before
        it (``start``) and walks back only if the decoding of a prefix is longer than expected.
        """
        n = min(start, len(self.tokens))
        while n > 0 and len(self._settled(self.tokens[:n], False)) >= end:
            n -= 1
        while n < len(self.tokens) and len(self._settled(self.tokens[:n], False)) < end:
            n += 1
        return n
