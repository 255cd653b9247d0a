"""Bad input raises a clear error naming it; no call (failed or not) changes a later call's output."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from s2d_ext.draft.hf_draft import HFDraft

from .tiny_models import left_padded, make_draft_model, make_target


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama", context=32)
    return target, make_draft_model(target)


def test_vocab_mismatch(pair):
    target, _ = pair
    other = make_draft_model(make_target("llama", vocab=97, layers=2))
    ids, _ = left_padded([3])
    with pytest.raises(ValueError, match="draft vocabulary"):
        s2d_ext.speculate(target, other, ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="draft vocabulary"):
        s2d_ext.Speculator(HFDraft(other), targets={"t": target})


def test_prompt_longer_than_context(pair):
    target, draft = pair
    ids, _ = left_padded([40])
    with pytest.raises(ValueError, match="input_ids.*longer than.*context"):
        s2d_ext.speculate(target, draft, ids, max_new_tokens=1)
    ids, _ = left_padded([20])
    with pytest.raises(ValueError, match="max_new_tokens"):
        s2d_ext.speculate(target, draft, ids, max_new_tokens=20)


def test_empty_batch_and_empty_prompt(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="input_ids is an empty batch"):
        s2d_ext.speculate(target, draft, torch.zeros((0, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match="input_ids has empty prompts"):
        s2d_ext.speculate(target, draft, torch.zeros((2, 0), dtype=torch.int64))


def test_wrong_device(pair):
    target, draft = pair
    ids, mask = left_padded([3, 5])
    with pytest.raises(ValueError, match="input_ids is on meta"):
        s2d_ext.speculate(target, draft, ids.to("meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        s2d_ext.speculate(target, draft, ids, mask.to("meta"), max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(draft_length="sometimes"), "draft_length"),
        (dict(thresholds=(0.5, 0.5, 0.0)), "thresholds"),
        (dict(seed=[1, 2, 3]), "seed"),
        (dict(eos_token_id=1000), "eos_token_id"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_arguments_name_themselves(pair, kwargs, match):
    target, draft = pair
    ids, mask = left_padded([3, 5])
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises((ValueError, TypeError), match=match):
        s2d_ext.speculate(target, draft, ids, mask, **kwargs)


def test_bad_prompts(pair):
    target, draft = pair
    ids, mask = left_padded([3, 5])
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        s2d_ext.speculate(target, draft, ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold token ids"):
        s2d_ext.speculate(target, draft, ids + 200, max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        s2d_ext.speculate(target, draft, ids.float(), max_new_tokens=2)
    with pytest.raises(TypeError, match="draft must be"):
        s2d_ext.speculate(target, "not a model", ids, max_new_tokens=2)


def test_no_call_leaks_state_into_the_next(pair):
    target, draft_model = pair
    ids, mask = left_padded([4, 6])
    kwargs = dict(max_new_tokens=10, temperature=0.8, seed=[5, 6])
    for draft in (draft_model, HFDraft(draft_model)):
        first = s2d_ext.speculate(target, draft, ids, mask, **kwargs)

        class Boom:
            def put(self, value):
                if value.dim() == 1:  # the first new tokens
                    raise RuntimeError("boom")

            def end(self):
                pass

        with pytest.raises(RuntimeError, match="boom"):
            s2d_ext.speculate(target, draft, ids, mask, streamer=Boom(), **kwargs)
        with pytest.raises(ValueError):
            s2d_ext.speculate(target, draft, ids, mask, top_p=2.0, **kwargs)
        again = s2d_ext.speculate(target, draft, ids, mask, **kwargs)
        assert torch.equal(first.sequences, again.sequences)
    assert target.training is False and draft_model.training is False


@pytest.mark.parametrize("draft_kind", ["sorted", "hf"])
def test_generation_may_fill_the_context_exactly(pair, draft_kind):
    target, draft_model = pair
    draft = draft_model if draft_kind == "sorted" else HFDraft(draft_model)
    ids, mask = left_padded([12, 20])
    out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=12, num_draft_tokens=6)
    assert out.stats.new_tokens == [12, 12]


def test_hf_draft_needs_seeds_only_when_sampling():
    target = make_target("llama")
    draft = HFDraft(make_draft_model(target))
    state = draft.begin(torch.tensor([[1, 2, 3]]), None, 20)
    common = dict(top_k=torch.zeros(1, dtype=torch.int64), top_p=torch.ones(1), offsets=None)
    greedy = draft.propose(state, 3, torch.tensor([3]), temperature=torch.zeros(1), seeds=None, **common)
    assert greedy.probs is None and greedy.num_draft.tolist() == [3]
    with pytest.raises(ValueError, match="seeds are required"):
        draft.propose(state, 3, torch.tensor([3]), temperature=torch.ones(1), seeds=None, **common)


def test_a_float64_draft_is_named(pair):
    target, _ = pair
    ids, mask = left_padded([3, 5])
    draft = make_draft_model(target).to(torch.float64)
    with pytest.raises(ValueError, match=r"draft LlamaForCausalLM \(2 layers\).*float64"):
        s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=2)


def test_a_mask_inferred_from_pad_token_id_says_so(pair):
    """No attention_mask: it is inferred from pad_token_id (as generate() does); a pad id inside a
    prompt then breaks the left padding, and the error must say where the mask came from."""
    target, draft = pair
    ids = torch.tensor([[4, 7, 4, 9, 10]])
    with pytest.raises(ValueError, match=r"inferred.*pad_token_id=7.*attention_mask"):
        s2d_ext.speculate(target, draft, ids, max_new_tokens=2, pad_token_id=7)


@pytest.mark.parametrize(
    "name,hint", [("max_length", "max_new_tokens"), ("do_sample", "temperature"), ("beams", "")]
)
def test_a_generate_only_keyword_says_what_to_pass(name, hint):
    target = make_target("llama", seed=3)
    ids = torch.tensor([[5, 8, 3]])
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'.*{hint}"):
        s2d_ext.speculate(target, target, ids, max_new_tokens=4, **{name: 15})
