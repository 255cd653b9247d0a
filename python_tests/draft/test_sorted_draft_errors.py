"""Bad input to SortedDraft: each a ValueError (or TypeError) naming the problem."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, Qwen3Config, Qwen3ForCausalLM

from python_tests.draft.helpers import EXITS, left_pad, tiny_model
from s2d_ext import SortedDraft
from s2d_ext.draft.lean_llama import rope_parameters


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize(
    "exits,match",
    [
        ((4, 2, 6), "strictly increasing"),
        ((2, 2, 6), "strictly increasing"),
        ((2, 4, 8), "beyond the model's 6 layers"),
        ((2, 4), "must end with the final exit 6"),
        ((0, 6), ">= 1"),
        ((), "at least one exit"),
    ],
)
def test_bad_exits(model, exits, match):
    with pytest.raises(ValueError, match=match):
        SortedDraft.from_pretrained(model, exits=exits, thresholds=(0.0,) * max(len(exits), 1))


@pytest.mark.parametrize(
    "thresholds,match",
    [
        ((0.5, 1.5, 0.0), r"in \[0, 1\]"),
        ((-0.1, 0.5, 0.0), r"in \[0, 1\]"),
        ((0.5, 0.0), "one value per exit"),
    ],
)
def test_bad_thresholds(model, thresholds, match):
    with pytest.raises(ValueError, match=match):
        SortedDraft.from_pretrained(model, exits=EXITS, thresholds=thresholds)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        SortedDraft.from_pretrained(gpt2)
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=50,
        )
    )
    with pytest.raises(ValueError, match="unsupported architecture 'qwen3'"):
        SortedDraft.from_pretrained(qwen3)


def test_unsupported_rope_type_is_named():
    model = tiny_model(
        "llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        SortedDraft.from_pretrained(model)


def test_legacy_rope_theta_is_read():
    class Legacy:
        rope_theta = 500000.0

    assert rope_parameters(Legacy()) == {"rope_theta": 500000.0, "rope_type": "default"}
    assert rope_parameters(LlamaConfig(rope_theta=1234.0))["rope_theta"] == 1234.0


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model_or_path"):
        SortedDraft.from_pretrained(42)


def test_truncate_bad_layers(model):
    with pytest.raises(ValueError, match="n_layers"):
        SortedDraft.truncate(model, 7)
    with pytest.raises(ValueError, match="must end with the final exit 4"):
        SortedDraft.truncate(model, 4, exits=(2, 3))


def test_begin_bad_input(model):
    draft = SortedDraft.from_pretrained(model, exits=EXITS)
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="left-padded"):
        draft.begin(ids, mask.flip(1), 16)
    with pytest.raises(ValueError, match="without any token"):
        draft.begin(ids, torch.zeros_like(mask), 16)
    with pytest.raises(ValueError, match="attention_mask must be a"):
        draft.begin(ids, mask[:1], 16)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        draft.begin(ids, mask, 257)
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        draft.begin(ids, mask, 2)
    with pytest.raises(ValueError, match="token ids"):
        draft.begin(ids + 1000, mask, 16)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        draft.begin(ids[0], None, 16)


def test_mistral_sliding_window_is_enforced():
    draft = SortedDraft.from_pretrained(tiny_model("mistral"))  # sliding_window=128
    draft.begin(torch.tensor([[1, 2]]), None, 128)
    with pytest.raises(ValueError, match="sliding_window=128"):
        draft.begin(torch.tensor([[1, 2]]), None, 129)


def test_propose_bad_input(model):
    draft = SortedDraft.from_pretrained(model, exits=EXITS)
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    state = draft.begin(ids, mask, 8)
    with pytest.raises(ValueError, match=r"num_draft must be a scalar or a \[B=2\] tensor"):
        draft.propose(state, 3, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="num_draft must be in 0..num_tokens=3"):
        draft.propose(state, 3, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="num_tokens"):
        draft.propose(state, -1)
    with pytest.raises(ValueError, match="exceed max_length=8.*longer than the cache"):
        draft.propose(state, 6, torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="thresholds must be"):
        draft.propose(state, 2, thresholds=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
        draft.propose(state, 2, thresholds=torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="seeds are required"):
        draft.propose(state, 2, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        draft.propose(state, 2, temperature=-1.0)
    # NOTE: checked by propose itself: the fused exit op skips its value checks inside propose.
    with pytest.raises(ValueError, match="top_k"):
        draft.propose(state, 2, temperature=1.0, seeds=1, top_k=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="top_p"):
        draft.propose(state, 2, temperature=1.0, seeds=1, top_p=torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="top_p"):
        draft.propose(state, 2, temperature=1.0, seeds=1, top_p=0.0)
    with pytest.raises(TypeError, match="state"):
        draft.propose(object(), 2)
    # After the failed calls the state is intact and usable.
    prop = draft.propose(state, 5, torch.tensor([5, 0]))
    assert prop.num_draft.tolist() == [5, 0]


def test_advance_bad_input(model):
    draft = SortedDraft.from_pretrained(model, exits=EXITS)
    state = draft.begin(torch.tensor([[1, 2, 3], [4, 5, 6]]), None, 16)
    draft.propose(state, 2, torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="num_accepted must be in 0..num_draft"):
        draft.advance(state, torch.tensor([2, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"num_accepted must be a scalar or a \[B=2\]"):
        draft.advance(state, torch.tensor([1, 1, 1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="emitted must be token ids"):
        draft.advance(state, torch.tensor([1, 1]), torch.tensor([1, 10_000]))
    draft.advance(state, torch.tensor([2, 1]), torch.tensor([1, 1]))


def test_an_unsupported_draft_dtype_is_named_where_the_draft_is_built(model):
    """float64 fails deep in the exit op otherwise; the error names the draft and the dtypes it runs in."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"draft LlamaForCausalLM \(6 layers\).*float64.*float32"):
        SortedDraft.from_pretrained(tiny_model("llama").to(torch.float64), exits=EXITS)
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match=r"dtype.*float64.*float32, bfloat16, float16"):
        SortedDraft.from_pretrained(fresh, exits=EXITS, dtype=torch.float64)
    assert all(p.dtype == torch.float32 for p in fresh.parameters())  # refused before casting
    draft = SortedDraft.truncate(model, 2)
    with pytest.raises(ValueError, match=r"draft LlamaForCausalLM \(2 layers\).*float64"):
        draft.to(torch.float64)
    assert draft.dtype == torch.float32
    draft.begin(ids, None, 8)  # still usable
    draft.hf_model.to(torch.float64)  # behind the draft's back
    with pytest.raises(ValueError, match=r"draft LlamaForCausalLM \(2 layers\).*float64"):
        draft.begin(ids, None, 8)
