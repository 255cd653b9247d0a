"""speculate() / Speculator.generate() / custom_generate called as a user calls generate(): same defaults.

Regression tests: speculate() used to ignore the target's generation_config (on SmolLM2 it ran 28 tokens past
the EOS where generate() stopped), and it returned the prompt for max_new_tokens=0, where generate() and so
custom_generate raise.
"""

from __future__ import annotations

import pytest
import torch

import s2d_ext

from .tiny_models import left_padded, make_draft_model, make_target


@pytest.fixture(scope="module")
def pair_with_eos():
    """A target whose generation_config sets eos (and pad): an id its greedy output emits early."""
    target = make_target("llama", seed=3)
    ids, mask = left_padded([5, 8, 3])
    free = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 emits it as its 4th new token
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = (eos + 1) % target.config.vocab_size
    return target, make_draft_model(target)


def test_speculate_takes_eos_and_pad_from_generation_config(pair_with_eos):
    target, draft = pair_with_eos
    ids, mask = left_padded([5, 8, 3])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert ref.shape[1] < ids.shape[1] + 24 or bool((ref == target.generation_config.eos_token_id).any())
    out = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=24)
    assert torch.equal(out.sequences, ref)
    eos = target.generation_config.eos_token_id
    assert int(out.stats.new_tokens[0]) == 4 and int(out.sequences[0, ids.shape[1] + 3]) == eos


def test_speculator_and_custom_generate_take_the_same_defaults(pair_with_eos):
    target, draft = pair_with_eos
    ids, mask = left_padded([5, 8, 3])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    spec = s2d_ext.Speculator(draft, targets={"t": target})
    assert torch.equal(spec.generate(ids, mask, target="t", max_new_tokens=24).sequences, ref)
    hooked = target.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=False,
        custom_generate=s2d_ext.generate,
        draft=draft,
    )
    assert torch.equal(hooked, ref)


def test_an_explicit_eos_overrides_the_generation_config(pair_with_eos):
    target, draft = pair_with_eos
    ids, mask = left_padded([5, 8, 3])
    kwargs = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    out = s2d_ext.speculate(target, draft, ids, mask, **kwargs)
    assert out.stats.new_tokens == [12, 12, 12]  # no eos: every row runs to max_new_tokens


def test_targets_with_different_eos_need_an_explicit_one(pair_with_eos):
    target, draft = pair_with_eos
    other = make_target("llama", seed=3)
    other.generation_config.eos_token_id = (target.generation_config.eos_token_id + 2) % 96
    spec = s2d_ext.Speculator(draft, targets={"a": target, "b": other})
    ids, mask = left_padded([5, 8])
    with pytest.raises(ValueError, match="eos_token_id"):
        spec.generate(ids, mask, target=["a", "b"], max_new_tokens=4)
    out = spec.generate(ids, mask, target=["a", "b"], max_new_tokens=4, eos_token_id=1, pad_token_id=0)
    assert out.sequences.shape[0] == 2


def test_max_new_tokens_zero_is_rejected_everywhere_like_generate(pair_with_eos):
    target, draft = pair_with_eos
    ids, mask = left_padded([4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        target.generate(ids, attention_mask=mask, max_new_tokens=0, do_sample=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        target.generate(
            ids, attention_mask=mask, max_new_tokens=0, custom_generate=s2d_ext.generate, draft=draft
        )
    with pytest.raises(ValueError, match="max_new_tokens"):
        s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s2d_ext.Speculator(draft, targets={"t": target}).generate(ids, mask, target="t", max_new_tokens=0)


# Regression: speculate() and Speculator.generate() read only eos / pad from the generation_config, so a
# target shipping repetition_penalty, max_new_tokens or do_sample gave other tokens than its generate().
def _configured(**settings):
    target = make_target("llama", seed=3)
    for key, value in settings.items():
        setattr(target.generation_config, key, value)
    return target, make_draft_model(target)


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.5),
        "bad_words",  # the free greedy output's first new token, banned
        "min_new_tokens",  # its second new token as EOS, held back for 5 tokens
        dict(max_new_tokens=6),
        dict(typical_p=0.9),  # a sampling-only setting: generate() ignores it when greedy, so do we
    ],
    ids=["repetition_penalty", "bad_words", "min_new_tokens", "max_new_tokens", "typical_p_greedy"],
)
def test_greedy_follows_the_generation_config_like_generate(settings):
    ids, mask = left_padded([5, 8, 3])
    if isinstance(settings, str):
        free = make_target("llama", seed=3).generate(
            ids, attention_mask=mask, pad_token_id=0, max_new_tokens=4
        )
        first, second = (int(t) for t in free[0, ids.shape[1] : ids.shape[1] + 2])
        settings = (
            dict(bad_words_ids=[[first]])
            if settings == "bad_words"
            else dict(min_new_tokens=5, eos_token_id=second)
        )
    target, draft = _configured(**settings)
    kwargs = {} if "max_new_tokens" in settings else {"max_new_tokens": 16}
    ref = target.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)
    out = s2d_ext.speculate(target, draft, ids, mask, pad_token_id=0, **kwargs)
    assert torch.equal(out.sequences, ref)
    spec = s2d_ext.Speculator(draft, targets={"t": target})
    assert torch.equal(spec.generate(ids, mask, target="t", pad_token_id=0, **kwargs).sequences, ref)
    hooked = target.generate(
        ids, attention_mask=mask, pad_token_id=0, custom_generate=s2d_ext.generate, draft=draft, **kwargs
    )
    assert torch.equal(hooked, ref)


def test_a_sampling_generation_config_samples_with_its_settings():
    target, draft = _configured(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    ids, mask = left_padded([5, 8, 3])
    runs = [
        s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=12, seed=s).sequences for s in range(4)
    ]
    explicit = [
        s2d_ext.speculate(
            target, draft, ids, mask, max_new_tokens=12, seed=s, temperature=0.7, top_k=20, top_p=0.9
        ).sequences
        for s in range(4)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs, explicit))
    greedy = s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=12, temperature=0.0).sequences
    assert any(not torch.equal(r, greedy) for r in runs)  # it samples, as generate() does


def test_unsupported_generation_config_settings_are_refused():
    target, draft = _configured(no_repeat_ngram_size=2)
    ids, mask = left_padded([5, 8, 3])
    with pytest.raises(ValueError, match=r"target\.generation_config\.no_repeat_ngram_size=2"):
        s2d_ext.speculate(target, draft, ids, mask, max_new_tokens=4)
    sampling, _ = _configured(do_sample=True, typical_p=0.9)
    with pytest.raises(ValueError, match="typical_p"):
        s2d_ext.speculate(sampling, draft, ids, mask, max_new_tokens=4)


def test_targets_with_different_generation_settings_need_them_explicit():
    one, draft = _configured(repetition_penalty=1.5)
    two = make_target("llama", seed=3)
    spec = s2d_ext.Speculator(draft, targets={"one": one, "two": two})
    ids, mask = left_padded([5, 8])
    with pytest.raises(ValueError, match="repetition_penalty.*pass repetition_penalty explicitly"):
        spec.generate(ids, mask, target=["one", "two"], max_new_tokens=4, pad_token_id=0)
    out = spec.generate(
        ids, mask, target=["one", "two"], max_new_tokens=4, pad_token_id=0, repetition_penalty=1.0
    )
    assert out.sequences.shape == (2, ids.shape[1] + 4)
