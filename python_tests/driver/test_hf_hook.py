"""generate(..., custom_generate=s2d_ext.generate, draft=...): generate() users switch in one argument."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft

from .tiny_models import left_padded, make_draft_model, make_target


@pytest.fixture(scope="module")
def pair():
    target = make_target("qwen2", seed=1)
    return target, make_draft_model(target)


@pytest.mark.parametrize("draft_kind", ["plain", "hf"])
def test_greedy_equals_plain_generate(pair, draft_kind):
    target, draft_model = pair
    draft = draft_model if draft_kind == "plain" else HFDraft(draft_model)
    ids, mask = left_padded([7, 2, 10])
    kwargs = dict(attention_mask=mask, max_new_tokens=18, do_sample=False, pad_token_id=0)
    ref = target.generate(ids, **kwargs)
    out = target.generate(ids, **kwargs, custom_generate=s2d_ext.generate, draft=draft, num_draft_tokens=3)
    assert torch.equal(out, ref)


def test_eos_from_generation_config_and_return_dict(pair):
    target, draft_model = pair
    ids, mask = left_padded([6, 9])
    free = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=1)
    ref = target.generate(ids, **kwargs)
    out = target.generate(
        ids, **kwargs, custom_generate=s2d_ext.generate, draft=draft_model, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref)


def test_sampling_settings_and_seed_pass_through(pair):
    target, draft_model = pair
    ids, mask = left_padded([5, 8])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=10, top_p=0.9
    )
    a = target.generate(ids, **kwargs, custom_generate=s2d_ext.generate, draft=draft_model, seed=3)
    b = s2d_ext.speculate(
        target, draft_model, ids, mask, max_new_tokens=12, temperature=0.7, top_k=10, top_p=0.9, seed=3
    )
    assert torch.equal(a, b.sequences)


def test_unsupported_settings_and_missing_draft_raise(pair):
    target, draft_model = pair
    ids, mask = left_padded([4])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        target.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=4,
            no_repeat_ngram_size=2,
            custom_generate=s2d_ext.generate,
            draft=draft_model,
        )
    with pytest.raises(ValueError, match="draft"):
        target.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=s2d_ext.generate)


def test_processors_from_the_config_and_the_caller_run_losslessly(pair):
    """repetition_penalty / bad_words_ids / min_new_tokens (config) and a caller's own processor
    (logits_processor=...) give generate()'s greedy tokens."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    target, draft_model = pair
    ids, mask = left_padded([6, 9])
    free = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    new = free[:, ids.shape[1] :]
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        repetition_penalty=1.5,
        # NOTE: the last bad word is the EOS id, which generate() drops from its bad words
        bad_words_ids=[[int(new[0, 2])], [int(new[1, 3]), int(new[1, 4])], [int(new[0, 1])]],
        min_new_tokens=5,
        eos_token_id=int(new[0, 1]),
        logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor([int(new[1, 0])])]),
    )
    ref = target.generate(ids, **kwargs)
    assert not torch.equal(ref[:, : free.shape[1]], free[:, : ref.shape[1]])  # the processors matter
    out = target.generate(ids, **kwargs, custom_generate=s2d_ext.generate, draft=draft_model)
    assert torch.equal(out, ref)


class _StopOnToken:
    """A caller's own stopping criterion: a row is done once its last token is ``token``."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_a_callers_own_stopping_criterion_raises(pair):
    """generate() would stop on it; s2d_ext.generate cannot run it exactly, so it refuses, never ignores."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    target, draft_model = pair
    ids, mask = left_padded([6])
    criterion = type("StopOnToken", (_StopOnToken, StoppingCriteria), {})(5)
    with pytest.raises(ValueError, match=r"stopping_criteria.*StopOnToken.*stop_token_ids"):
        target.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([criterion]),
            custom_generate=s2d_ext.generate,
            draft=draft_model,
        )


def test_a_callers_eos_and_max_length_criteria_are_honoured(pair):
    """A caller's EosTokenCriteria / MaxLengthCriteria take the place of generate()'s own: same tokens."""
    from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    target, draft_model = pair
    ids, mask = left_padded([6, 9])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = target.generate(ids, **kwargs)
    stop = int(free[0, ids.shape[1] + 3])
    for criteria in (
        [EosTokenCriteria(eos_token_id=stop)],
        [MaxLengthCriteria(max_length=ids.shape[1] + 5)],
        [MaxLengthCriteria(max_length=ids.shape[1] + 7), EosTokenCriteria(eos_token_id=[stop, 1])],
    ):
        sc = StoppingCriteriaList(criteria)
        ref = target.generate(ids, **kwargs, stopping_criteria=sc)
        assert ref.shape != free.shape or not torch.equal(ref, free)  # the criterion matters
        out = target.generate(
            ids, **kwargs, stopping_criteria=sc, custom_generate=s2d_ext.generate, draft=draft_model
        )
        assert torch.equal(out, ref)


def test_an_eos_criterion_other_than_the_eos_ids_with_min_new_tokens_raises(pair):
    """generate() then masks its EOS ids but stops on the criterion's: not what the driver implements."""
    from transformers import EosTokenCriteria, StoppingCriteriaList

    target, draft_model = pair
    ids, mask = left_padded([6])
    with pytest.raises(ValueError, match=r"stopping_criteria.*EosTokenCriteria.*min_new_tokens"):
        target.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            min_new_tokens=2,
            eos_token_id=3,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([EosTokenCriteria(eos_token_id=5)]),
            custom_generate=s2d_ext.generate,
            draft=draft_model,
        )


def test_an_all_ones_mask_is_kept_with_the_pad_id_inside_a_prompt(pair):
    """generate() drops an all-ones mask before calling custom_generate; the driver must not infer a new
    one from pad_token_id (generate() attends to every position, pad id or not)."""
    target, draft_model = pair
    ids = torch.tensor([[4, 7, 4, 9, 10]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=7)
    ref = target.generate(ids, **kwargs)
    out = target.generate(ids, **kwargs, custom_generate=s2d_ext.generate, draft=draft_model)
    assert torch.equal(out, ref)


class _Recorder:
    """A streamer that records what it is sent (transformers' BaseStreamer protocol)."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


def test_a_streamer_gets_the_new_tokens_and_the_end(pair):
    # Regression: transformers sends a streamer the prompt but does not hand it to a callable
    # custom_generate, so it never got the new tokens nor end() (a TextIteratorStreamer consumer hung).
    target, draft = pair
    ids = torch.tensor([[5, 8, 3, 9]])
    plain, hooked = _Recorder(), _Recorder()
    ref = target.generate(ids, max_new_tokens=12, do_sample=False, streamer=plain)
    out = target.generate(
        ids,
        max_new_tokens=12,
        do_sample=False,
        streamer=hooked,
        custom_generate=s2d_ext.generate,
        draft=draft,
    )
    assert torch.equal(out, ref)
    assert hooked.puts[0] == plain.puts[0] == ids[0].tolist()  # the prompt, once
    assert sum(hooked.puts[1:], []) == sum(plain.puts[1:], []) == ref[0, ids.shape[1] :].tolist()
    assert hooked.ended == plain.ended == 1


def test_inputs_embeds_is_refused(pair):
    # Regression: with input_ids given too, the embeddings were dropped and the output followed input_ids.
    target, draft = pair
    ids = torch.tensor([[5, 8, 3, 9]])
    embeds = target.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        target.generate(
            ids,
            inputs_embeds=embeds,
            max_new_tokens=4,
            do_sample=False,
            custom_generate=s2d_ext.generate,
            draft=draft,
        )
