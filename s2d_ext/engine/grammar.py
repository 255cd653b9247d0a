"""Grammar-constrained generation (JSON schema, regex, choice, Lark) as a lossless processor, via llguidance.

:class:`Grammars` compiles a grammar for one tokenizer and vocabulary; each request gets its own
:class:`GrammarProcessor`, a logits processor (:mod:`s2d_ext.engine.processors`) that masks the target's
logits at every verified position to the tokens the grammar allows after that position's prefix, so the
output is distributed exactly as ``generate()`` with the same mask (greedy: token for token). The same
object masks the draft (:meth:`GrammarProcessor.draft_allowed`, through
:mod:`s2d_ext.engine.draft_masks`), so proposals follow the grammar too.

Grammar state: one llguidance matcher per request holds the tokens it consumed; a call for a prefix rolls
the matcher back to where the prefix and those tokens part (the rejected drafts of the previous step) and
consumes the rest, caching the mask after each depth. So across steps the state advances by the accepted
tokens and rolls back on rejection; the target's call of a step finds the draft's masks cached. A prefix
holding a token the grammar refuses (a rejected draft, or a padded slot) is never kept by verification,
since the masked target gives that token probability 0; positions after it get no mask.

NOTE: llguidance was chosen over xgrammar and outlines-core by measurement
(``bench/results/grammar_libraries_cpu.md``): it compiles a JSON schema in milliseconds (xgrammar: 0.1-0.4 s,
outlines-core: 5-18 s, which also cannot express ``json_object``), reports unsatisfiable schemas at
compile time, and bounds its work per token; its masks cost ~50-65 us a token on this CPU.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch


class GrammarError(ValueError):
    """A grammar (JSON schema, regex, choice list, Lark) that is invalid or can match nothing."""


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[W] int32 bitmask (bit i of word w = token 32 w + i) -> [vocab] bool."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[:, None] >> shifts[None, :]) & 1  # [W, 32]
    return bits.flatten()[:vocab].bool()


class GrammarProcessor:
    """The lossless grammar mask of one request (see the module doc). Not shared between requests.

    Parameters
    ----------
    matcher : llguidance.LLMatcher
        A fresh matcher of the request's grammar.
    vocab_size : int
        V, the width of the target's logits.
    mask_drafts : bool
        Also restrict the draft's proposals to the grammar (default; a speed-up only, the output is the same
        distribution either way).
    grammar : str
        llguidance's text of the grammar (kept for reference).
    """

    def __init__(self, matcher: Any, vocab_size: int, mask_drafts: bool = True, grammar: str = "") -> None:
        self.matcher = matcher
        self.grammar = grammar  # llguidance's grammar text (what the matcher was made from)
        self.vocab_size = int(vocab_size)
        self.mask_drafts = bool(mask_drafts)
        self.tokens: list[int] = []  # consumed by the matcher, all allowed by the grammar
        self._counted: list[bool] = []  # per token: whether the matcher's history holds it
        self._final = 0  # leading tokens known final (equal in every later prefix)
        self._masks: dict[int, torch.Tensor] = {}  # depth -> [V] bool, allowed after tokens[:depth]
        self._bitmask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        self.masks_computed = 0  # how many masks the matcher computed (a cache miss each)

    # ------------------------------------------------------------------------------------ the state
    def _mask(self) -> torch.Tensor:
        """[V] bool: the tokens allowed after ``self.tokens`` (cached by depth)."""
        depth = len(self.tokens)
        mask = self._masks.get(depth)
        if mask is None:
            self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
            if self.matcher.is_error():
                raise GrammarError(f"grammar matcher failed: {self.matcher.get_error()}")
            mask = _unpack(self._bitmask, self.vocab_size)
            self._masks[depth] = mask
            self.masks_computed += 1
        return mask

    def allowed_after(self, generated: Sequence[int], committed: int = 0) -> torch.Tensor | None:
        """[V] bool of the tokens allowed after ``generated`` (None: no constraint, ``generated`` holds a
        token the grammar refuses). ``committed``: how many leading tokens of ``generated`` are final.

        NOTE: tokens final at an *earlier* call equal what the matcher holds, so the comparison starts after
        them; this call's newly final tokens may not (a bonus token replaces a rejected draft).
        """
        same = min(self._final, len(self.tokens), len(generated))
        while same < len(self.tokens) and same < len(generated) and self.tokens[same] == generated[same]:
            same += 1
        if same < len(self.tokens):
            # NOTE: the rejected drafts of an earlier call: back to where the prefixes part.
            self.matcher.rollback(sum(self._counted[same:]))
            del self.tokens[same:]
            del self._counted[same:]
            for depth in [d for d in self._masks if d > same]:
                del self._masks[depth]
        for token in generated[same:]:
            if not (0 <= token < self.vocab_size and bool(self._mask()[token])):
                self._final = max(self._final, min(committed, len(self.tokens)))
                return None
            # NOTE: a matcher already stopped (only EOS left) takes EOS without recording it: its rollback
            # must not count that token (vLLM's "rollback_lag").
            self._counted.append(not self.matcher.is_stopped())
            if not self.matcher.consume_token(token):
                error = self.matcher.get_error()
                raise GrammarError(f"grammar matcher refused allowed token {token}: {error}")
            self.tokens.append(token)
        self._final = max(self._final, min(committed, len(self.tokens)))
        return self._mask()

    # --------------------------------------------------------------------------- processor protocol
    def __call__(self, token_ids, num_prompt, prefix_lengths, logits):
        generated = token_ids[num_prompt : prefix_lengths[-1]].tolist()
        committed = prefix_lengths[0] - num_prompt
        rows = []
        for end in prefix_lengths:
            mask = self.allowed_after(generated[: end - num_prompt], committed)
            rows.append(torch.ones(logits.shape[1], dtype=torch.bool) if mask is None else mask)
        keep = torch.stack(rows).to(logits.device)  # [P, V]
        return logits.masked_fill(~keep, float("-inf"))

    def draft_allowed(self, generated: Sequence[int], committed: int) -> torch.Tensor | None:
        """[V] bool for the draft's next token after ``generated`` (the request's tokens + this step's
        drafts so far), or None (no constraint)."""
        return self.allowed_after(generated, committed)

    def __repr__(self) -> str:
        return f"GrammarProcessor({len(self.tokens)} tokens consumed)"


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary (llguidance); thread-safe.

    Parameters
    ----------
    tokenizer : transformers tokenizer or any object with ``decode(ids)`` and ``eos_token_id``
        A fast HF tokenizer is read whole (its merges and special tokens); any other tokenizer is read one id
        at a time (``decode([i])``), which suits character-level tokenizers.
    vocab_size : int
        V, the width of the model's logits (may exceed the tokenizer's vocabulary).
    eos_token_ids : sequence of int, optional
        The ids that end a grammar's output (default: the tokenizer's EOS). The model's
        ``generation_config.eos_token_id`` belongs here when it differs (chat models).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        eos = list(eos_token_ids or [])
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [int(tokenizer.eos_token_id)]
        if not eos:
            raise GrammarError("structured output needs an end-of-sequence token; this tokenizer has none")
        self.eos_token_ids = eos
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None

    def _tokenizer(self) -> Any:
        """The llguidance tokenizer, built once (seconds for a 50k+ BPE vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                try:
                    from transformers import PreTrainedTokenizerFast
                except ImportError:  # pragma: no cover (transformers is a dependency)
                    PreTrainedTokenizerFast = ()  # noqa: N806
                if isinstance(self.tokenizer, PreTrainedTokenizerFast):
                    import llguidance.hf

                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self.tokenizer, self.vocab_size, eos_token=self.eos_token_ids
                    )
                else:
                    self._ll_tokenizer = llguidance.LLTokenizer(
                        llguidance.TokenizerWrapper(_ByteVocabulary(self.tokenizer, self.vocab_size)),
                        n_vocab=self.vocab_size,
                        eos_token=self.eos_token_ids,
                    )
            return self._ll_tokenizer

    def _processor(self, grammar: str, what: str) -> GrammarProcessor:
        import llguidance

        tokenizer = self._tokenizer()
        ok, is_error, messages = _validate(llguidance, grammar, tokenizer)
        if not ok:
            raise GrammarError(f"{what}: {messages}")
        try:
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(f"{what}: {exc}") from None
        if matcher.is_error():
            raise GrammarError(f"{what}: {matcher.get_error()}")
        processor = GrammarProcessor(matcher, self.vocab_size, grammar=grammar)
        first = processor.allowed_after([], 0)
        if first is None or not bool(first.any()):
            raise GrammarError(f"{what}: no token of this vocabulary can start it")
        return processor

    def json_schema(self, schema: Any, any_whitespace: bool = True) -> GrammarProcessor:
        """Output: one JSON value valid under ``schema`` (a dict, a bool or its JSON text).
        ``any_whitespace=False``: no whitespace between tokens beyond one space after ``:`` and ``,``
        (vLLM's ``disable_any_whitespace``)."""
        import llguidance

        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": bool(any_whitespace)}
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        return self._processor(grammar, "invalid JSON schema")

    def json_object(self, any_whitespace: bool = True) -> GrammarProcessor:
        """Output: any JSON object (OpenAI's ``response_format: json_object``)."""
        return self.json_schema({"type": "object"}, any_whitespace)

    def regex(self, pattern: str) -> GrammarProcessor:
        return self._processor(_grammar_from("regex", pattern, "invalid regex"), "invalid regex")

    def choice(self, choices: Sequence[str]) -> GrammarProcessor:
        """Output: exactly one of ``choices`` (vLLM's ``guided_choice``)."""
        what = "invalid choice list"
        return self._processor(_grammar_from("choice", list(choices), what), what)

    def lark(self, grammar: str) -> GrammarProcessor:
        return self._processor(_grammar_from("lark", grammar, "invalid grammar"), "invalid grammar")


def _grammar_from(kind: str, value: Any, what: str) -> str:
    import llguidance

    try:
        return llguidance.grammar_from(kind, value)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise GrammarError(f"{what}: {exc}") from None


def _validate(llguidance: Any, grammar: str, tokenizer: Any) -> tuple[bool, bool, str]:
    """(ok, is_error, message) of llguidance's grammar check: warnings pass, errors fail."""
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    except (ValueError, TypeError, RuntimeError) as exc:
        return False, True, str(exc)
    text = "; ".join(messages)
    return not is_error, is_error, text


class _ByteVocabulary:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer: each id's bytes and an encoder."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.tokens = [
            b"<eos>" if i == eos else tokenizer.decode([i]).encode("utf-8") for i in range(vocab_size)
        ]
        self.special_token_ids = [] if eos is None else [eos]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text, add_special_tokens=False))
