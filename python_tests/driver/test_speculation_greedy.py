"""Greedy speculative decoding must reproduce target.generate(do_sample=False) token for token."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.sorted_draft import SortedDraft

from .tiny_models import greedy_reference, left_padded, make_draft_model, make_target

MAX_NEW = 24


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    target = make_target(request.param)
    return target, make_draft_model(target)


def _drafts(target, draft_model):
    return {
        "plain_hf_model": draft_model,  # auto-wrapped as a one-exit SortedDraft
        "hf_draft": HFDraft(draft_model),
        "sorted_two_exits": SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.6, 0.0)),
    }


@pytest.mark.parametrize("draft_kind", ["plain_hf_model", "hf_draft", "sorted_two_exits"])
@pytest.mark.parametrize("lengths", [[9], [5, 11, 1, 8]], ids=["batch1", "mixed_lengths"])
def test_greedy_matches_generate(pair, draft_kind, lengths):
    target, draft_model = pair
    draft = _drafts(target, draft_model)[draft_kind]
    ids, mask = left_padded(lengths)
    ref = greedy_reference(target, ids, mask, MAX_NEW)
    out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.stats.new_tokens == [MAX_NEW] * len(lengths)
    assert out.stats.mat > 1.0  # the damped target makes the draft useful: acceptance is non-trivial


@pytest.mark.parametrize("draft_length", ["fixed", "heuristic", "confidence"])
@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_every_draft_length_policy_is_lossless(pair, draft_length, num_draft_tokens):
    target, draft_model = pair
    ids, mask = left_padded([6, 3, 10])
    ref = greedy_reference(target, ids, mask, MAX_NEW)
    out = s2d_ext.speculate(
        target,
        HFDraft(draft_model),
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        pad_token_id=0,
        num_draft_tokens=num_draft_tokens,
        draft_length=draft_length,
    )
    assert torch.equal(out.sequences, ref)


def test_eos_matches_generate_and_pads(pair):
    target, draft_model = pair
    ids, mask = left_padded([5, 11, 7])
    free = greedy_reference(target, ids, mask, MAX_NEW)
    # an EOS that the first row emits mid-way (other rows may or may not emit it)
    eos = int(free[0, ids.shape[1] + 6])
    pad = (eos + 1) % 96
    ref = greedy_reference(target, ids, mask, MAX_NEW, eos_token_id=eos, pad_token_id=pad)
    out = s2d_ext.speculate(
        target, draft_model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad
    )
    assert torch.equal(out.sequences, ref)
    new = out.sequences[:, ids.shape[1] :]
    for row, n in enumerate(out.stats.new_tokens):
        assert (new[row, :n] == eos).sum() <= 1  # nothing after the first EOS
        assert n == new.shape[1] or new[row, n - 1] == eos
        assert bool((new[row, n:] == pad).all())
    assert n <= MAX_NEW


def test_stop_tokens_truncate_inclusively(pair):
    target, draft_model = pair
    ids, mask = left_padded([7, 4])
    free = greedy_reference(target, ids, mask, MAX_NEW)[:, ids.shape[1] :]
    stops = [int(free[0, 3]), int(free[1, 10])]
    out = s2d_ext.speculate(
        target, draft_model, ids, mask, max_new_tokens=MAX_NEW, stop_token_ids=stops, pad_token_id=95
    )
    new = out.sequences[:, ids.shape[1] :]
    for row in range(2):
        hits = [i for i, t in enumerate(free[row].tolist()) if t in stops]
        expect = free[row, : hits[0] + 1] if hits else free[row]
        n = out.stats.new_tokens[row]
        assert n == len(expect)
        assert torch.equal(new[row, :n], expect)
        assert bool((new[row, n:] == 95).all())
    assert new.shape[1] == max(out.stats.new_tokens)


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_exact(pair, max_new):
    target, draft_model = pair
    ids, mask = left_padded([3, 6])
    out = s2d_ext.speculate(target, draft_model, ids, mask, max_new_tokens=max_new, num_draft_tokens=5)
    assert out.sequences.shape == (2, 6 + max_new)
    assert out.stats.new_tokens == [max_new, max_new]
    assert torch.equal(out.sequences, greedy_reference(target, ids, mask, max_new))


def test_stats_add_up(pair):
    target, draft_model = pair
    ids, mask = left_padded([4, 9, 2])
    out = s2d_ext.speculate(
        target, draft_model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=5, pad_token_id=0, profile=True
    )
    st = out.stats
    assert len(st.new_tokens) == 3 and out.sequences.shape[1] == ids.shape[1] + max(st.new_tokens)
    assert st.steps >= 1
    row_steps = [n / m for n, m in zip(st.new_tokens, st.mat_per_row)]
    assert st.mat == pytest.approx(sum(st.new_tokens) / sum(row_steps))
    # every step emits accepted drafts + exactly one token (before an EOS cut)
    assert st.accepted_tokens <= st.draft_tokens
    assert sum(st.new_tokens) <= st.accepted_tokens + sum(row_steps)
    assert sum(st.exit_histogram.values()) == st.draft_tokens
    assert all(0.0 <= a <= 1.0 for a in st.acceptance_by_position)
    parts = st.time_draft + st.time_target + st.time_verify + st.time_other
    assert parts == pytest.approx(st.time_total, rel=1e-6)
    assert st.other_fraction == pytest.approx(st.time_other / st.time_total)
    # NOTE: timing is opt-in (profile=True); by default only the wall time is measured
    quiet = s2d_ext.speculate(target, draft_model, ids, mask, max_new_tokens=8, pad_token_id=0).stats
    assert quiet.time_total > 0 and quiet.time_draft == quiet.time_target == quiet.time_verify == 0.0


def test_prompt_of_one_token_and_no_mask(pair):
    target, draft_model = pair
    ids = torch.tensor([[17], [42]])
    ref = target.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = s2d_ext.speculate(target, draft_model, ids, max_new_tokens=10)
    assert torch.equal(out.sequences, ref)


def test_streamer_gets_prompt_then_columns(pair):
    target, draft_model = pair

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    for lengths in ([6], [4, 8]):
        ids, mask = left_padded(lengths)
        streamer = Collect()
        out = s2d_ext.speculate(
            target,
            draft_model,
            ids,
            mask,
            max_new_tokens=12,
            streamer=streamer,
            eos_token_id=7,
            pad_token_id=0,
        )
        assert streamer.ended and torch.equal(streamer.puts[0], ids)
        if len(lengths) == 1:
            streamed = torch.cat(streamer.puts[1:])
            assert torch.equal(streamed, out.sequences[0, ids.shape[1] :])
        else:
            streamed = torch.stack(streamer.puts[1:], dim=1)
            assert torch.equal(streamed, out.sequences[:, ids.shape[1] :])


def test_any_causal_lm_drafts_and_targets():
    """GPT-2 (no SortedDraft support) runs through HFDraft as a draft and as a target."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=96, n_layer=2, n_embd=32, n_head=2, bos_token_id=None, eos_token_id=None)
    ).eval()
    llama = make_target("llama")
    ids, mask = left_padded([5, 9, 2])
    out = s2d_ext.speculate(llama, gpt2, ids, mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_reference(llama, ids, mask, 12))
    out = s2d_ext.speculate(gpt2, make_draft_model(llama), ids, mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_reference(gpt2, ids, mask, 12))


def test_sliding_window_target():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=40,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.1,
    )
    target = MistralForCausalLM(config).eval()
    ids, mask = left_padded([5, 9])
    for draft in (HFDraft(make_draft_model(target, 1)), make_draft_model(target, 1)):
        out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=28, pad_token_id=0)
        assert torch.equal(out.sequences, greedy_reference(target, ids, mask, 28))
    with pytest.raises(ValueError, match="sliding"):
        s2d_ext.speculate(target, HFDraft(make_draft_model(target, 1)), ids, mask, max_new_tokens=31)
