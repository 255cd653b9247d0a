"""Structured output (llguidance) under speculative decoding: greedy output equals generate() with the same
grammar mask (draft masked or not, sorted or plain HF draft), sampled output follows the constrained
distribution, drafts stay inside the grammar when masked, and the grammar state rolls back."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList

from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, SamplingParams
from s2d_ext.engine.grammar import GrammarError, Grammars

from ..driver.tiny_models import make_draft_model, make_target
from .grammar_helpers import EOS, CharEosTokenizer, ReplayGrammar, replay_mask

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
    "required": ["id", "tag", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny():
    target = make_target("llama", seed=3)
    target.generation_config.eos_token_id = EOS
    return target, Grammars(CharEosTokenizer(), 96)


def _drafts(target, kind):
    if kind == "sorted":
        return SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    return HFDraft(make_draft_model(target))


@pytest.mark.parametrize("draft_kind", ["sorted", "hf"])
@pytest.mark.parametrize("mask_drafts", [True, False], ids=["draft_masked", "draft_free"])
@pytest.mark.parametrize("kind", ["json_schema", "regex"])
def test_greedy_output_equals_generate_with_the_same_grammar(tiny, draft_kind, mask_drafts, kind):
    target, grammars = tiny
    prompt = [5, 9, 17, 2, 40]
    if kind == "json_schema":
        make = lambda: grammars.json_schema(SCHEMA)  # noqa: E731
    else:
        make = lambda: grammars.regex(r"[a-f]{3}-\d+")  # noqa: E731
    processor = make()
    processor.mask_drafts = mask_drafts
    engine = Engine(_drafts(target, draft_kind), target, num_draft_tokens=4, draft_length="fixed")
    engine.add_request(prompt, SamplingParams(max_new_tokens=48, logits_processors=[processor]))
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason or reason
    ref = target.generate(
        torch.tensor([prompt]),
        max_new_tokens=48,
        do_sample=False,
        logits_processor=LogitsProcessorList([ReplayGrammar(grammars, make().grammar, len(prompt))]),
        pad_token_id=0,
        eos_token_id=EOS,
    )[0, len(prompt) :].tolist()
    assert tokens == ref
    assert engine.stats.draft_tokens > 0
    if reason == "stop":
        text = CharEosTokenizer().decode(tokens[:-1])
        if kind == "json_schema":
            value = json.loads(text)
            assert set(value) == {"id", "tag", "ok"} and value["tag"] in ("red", "green")
        else:
            assert text[3] == "-" and set(text[:3]) <= set("abcdef")


def test_masked_drafts_follow_the_grammar_and_unmasked_ones_do_not(tiny):
    """Every token the draft proposes under the mask is one the grammar allows after the request's tokens
    and the drafts before it; without the mask some are not (so the check can tell)."""
    target, grammars = tiny
    violations = {}
    for mask_drafts in (True, False):
        draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
        engine = Engine(draft, target, num_draft_tokens=4, draft_length="fixed")
        processor = grammars.json_schema(SCHEMA)
        processor.mask_drafts = mask_drafts
        engine.add_request([3, 4, 5], SamplingParams(max_new_tokens=40, logits_processors=[processor]))
        proposals = []

        def recording(*args, _propose=draft.propose, _proposals=proposals, **kwargs):
            prop = _propose(*args, **kwargs)
            _proposals.append(prop.tokens[0, : int(prop.num_draft[0])].tolist())
            return prop

        draft.propose = recording
        generated = []
        bad = 0
        while engine.has_unfinished():
            outs = engine.step()
            drafts = proposals[-1]
            for j, token in enumerate(drafts):
                if not replay_mask(grammars, processor.grammar, generated + drafts[:j], 96)[token]:
                    bad += 1
                    break
            generated += [t for o in outs for t in o.new_token_ids]
        violations[mask_drafts] = bad
    assert violations[True] == 0
    assert violations[False] > 0


def test_sampled_output_follows_the_constrained_distribution():
    """Regex [a-c]{2} then EOS: 9 strings; their frequencies under speculative sampling (draft masked)
    against the exact constrained distribution of the target, by a chi-square test."""
    vocab, samples = 96, 1500
    target = make_target("llama", seed=5, damp=0.3)
    target.generation_config.eos_token_id = EOS
    grammars = Grammars(CharEosTokenizer(), vocab)
    draft = SortedDraft.truncate(target, 2)
    prompt = [33, 34, 35, 36]  # "ABCD"
    letters = [ord(c) - 32 for c in "abc"]
    exact = torch.zeros(3, 3, dtype=torch.float64)
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1, letters].double(), -1)
        for i, a in enumerate(letters):
            second = torch.softmax(target(torch.tensor([prompt + [a]])).logits[0, -1, letters].double(), -1)
            exact[i] = first[i] * second
    engine = Engine(draft, target, num_draft_tokens=3, draft_length="fixed")
    for seed in range(samples):
        params = SamplingParams(
            max_new_tokens=4, temperature=1.0, seed=seed, logits_processors=[grammars.regex("[a-c]{2}")]
        )
        engine.add_request(prompt, params, request_id=str(seed))
    tokens = {str(s): [] for s in range(samples)}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert all(len(t) == 3 and t[2] == EOS for t in tokens.values())  # two letters, then EOS
    assert engine.stats.accepted_tokens > 0
    observed = torch.zeros(3, 3, dtype=torch.float64)
    for t in tokens.values():
        observed[letters.index(t[0]), letters.index(t[1])] += 1
    result = chisquare(observed.flatten().numpy(), (exact.flatten() * samples).numpy())
    assert result.pvalue > 1e-3, (result, observed, exact * samples)


def test_the_grammar_state_rolls_back_to_where_prefixes_part(tiny):
    _, grammars = tiny
    processor = grammars.json_schema(SCHEMA)
    text = [ord(c) - 32 for c in '{"id": 12, "tag": "red"']
    mask = processor.allowed_after(text, 0)
    assert processor.tokens == text
    torch.testing.assert_close(mask, replay_mask(grammars, processor.grammar, text, 96))
    other = text[:7] + [ord(c) - 32 for c in '345, "tag": "gr']
    mask = processor.allowed_after(other, 7)  # rolls back 16 tokens, then consumes the others
    assert processor.tokens == other
    torch.testing.assert_close(mask, replay_mask(grammars, processor.grammar, other, 96))
    refused = other[:8] + [ord("?") - 32]  # '{"id": 3?': a token the grammar refuses, no constraint after it
    assert processor.allowed_after(refused, 8) is None
    assert processor.tokens == other[:8]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda g: g.json_schema({"type": "banana"}), "invalid JSON schema"),
        (lambda g: g.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
        (lambda g: g.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable"),
        (lambda g: g.regex("[a-"), "invalid regex"),
    ],
)
def test_bad_grammars_raise_a_grammar_error(tiny, build, message):
    with pytest.raises(GrammarError, match=message):
        build(tiny[1])
