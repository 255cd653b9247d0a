"""row_invariant: a converted model gives each token the same logits bits whatever the width of the
forward, so greedy speculative decoding equals greedy generate() of that model in bfloat16 too; and it
converts back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import s2d_ext
from python_tests.driver.tiny_models import make_target
from s2d_ext.row_invariant import (
    ATTENTION,
    InvariantLinear,
    invariant_linear_count,
    use_row_invariant_kernels,
    uses_row_invariant_kernels,
)


def converted(arch, dtype, **kwargs):
    model = make_target(arch, **kwargs).to(dtype)
    return use_row_invariant_kernels(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_forward_equals_one_token_forwards(arch, dtype):
    model = converted(arch, dtype)
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        cache = model(ids[:, :17], attention_mask=mask[:, :17], use_cache=True).past_key_values
        wide = model(ids[:, 17:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        cache.crop(-6)
        narrow = [
            model(ids[:, 17 + i : 18 + i], attention_mask=mask[:, : 18 + i], past_key_values=cache).logits
            for i in range(6)
        ]
        whole = model(ids, attention_mask=mask).logits[:, 17:]
    assert torch.equal(wide, torch.cat(narrow, dim=1))
    assert torch.equal(wide, whole)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_speculation_equals_generate_in_bfloat16(arch):
    target = converted(arch, torch.bfloat16, layers=4, damp=0.3)
    draft = s2d_ext.SortedDraft.truncate(target, 2, exits=(1, 2))
    prompts = torch.randint(0, 96, (6, 9), generator=torch.Generator().manual_seed(5))
    accepted = 0
    for prompt in prompts:
        ids = prompt[None]
        reference = target.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        out = s2d_ext.speculate(target, draft, ids, max_new_tokens=40, num_draft_tokens=4)
        assert torch.equal(out.sequences, reference)
        accepted += out.stats.accepted_tokens
    assert accepted > 0  # the drafts were verified, not all rejected


def test_convert_and_back():
    model = make_target("llama")
    before = model.config._attn_implementation
    linears = sum(type(m) is nn.Linear for m in model.modules())

    class Custom(nn.Linear):
        pass

    model.extra = Custom(4, 4)
    use_row_invariant_kernels(model)
    assert uses_row_invariant_kernels(model) and model.config._attn_implementation == ATTENTION
    assert invariant_linear_count(model) == linears and type(model.extra) is Custom
    assert isinstance(model.lm_head, InvariantLinear) and isinstance(model.lm_head, nn.Linear)
    assert "lm_head.weight" in model.state_dict()
    use_row_invariant_kernels(model, enable=False)
    assert not uses_row_invariant_kernels(model) and invariant_linear_count(model) == 0
    assert model.config._attn_implementation == before


def test_converted_logits_match_torch_to_rounding():
    model = make_target("qwen2")
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        got = use_row_invariant_kernels(model)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
