"""A draft that shares modules with its target: casting or moving the draft leaves the target as it was."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from python_tests.draft.helpers import tiny_model
from s2d_ext import SortedDraft
from s2d_ext.draft.sorted_draft import mark_shared_modules, truncated_hf_model

PROMPT = torch.tensor([[1, 2, 3, 4]])


def _generate(model):
    return model.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)


def _snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_untouched(target, before, reference):
    after = target.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name
    assert torch.equal(_generate(target), reference)


def _load_draft_like(target):
    """What ``checkpoints.load_draft_model`` builds: own layers, the target's embedding and head modules."""
    model = truncated_hf_model(target, 2)
    model.model.embed_tokens = target.model.embed_tokens
    model.lm_head = target.lm_head
    return mark_shared_modules(model, ("model.embed_tokens", "lm_head"))


@pytest.mark.parametrize("tied", [False, True])
def test_casting_a_truncated_draft_leaves_the_shared_target_modules(tied):
    target = tiny_model("llama", tie_word_embeddings=tied)
    before, reference = _snapshot(target), _generate(target)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), share_embeddings=True)
    assert draft.hf_model.lm_head is target.lm_head
    draft.to(torch.bfloat16)
    _assert_untouched(target, before, reference)
    model = draft.hf_model
    assert draft.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head is not target.lm_head and model.model.embed_tokens is not target.model.embed_tokens
    assert model.model.norm is not target.model.norm
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.equal(model.lm_head.weight, target.lm_head.weight.to(torch.bfloat16))
    out = s2d_ext.speculate(target, draft, PROMPT, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out.sequences, reference)


def test_a_conversion_that_changes_nothing_keeps_the_sharing():
    target = tiny_model("llama")
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), share_embeddings=True)
    draft.to(torch.float32).to("cpu")
    assert draft.hf_model.lm_head is target.lm_head


def test_from_pretrained_casts_copies_of_a_loaded_drafts_shared_modules():
    target = tiny_model("llama")
    before, reference = _snapshot(target), _generate(target)
    draft = SortedDraft.from_pretrained(_load_draft_like(target), exits=(1, 2), dtype=torch.float16)
    _assert_untouched(target, before, reference)
    assert draft.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in draft.hf_model.parameters())
    out = s2d_ext.speculate(target, draft, PROMPT, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out.sequences, reference)


def test_casting_a_loaded_draft_leaves_the_target():
    target = tiny_model("llama")
    before, reference = _snapshot(target), _generate(target)
    draft = SortedDraft.from_pretrained(_load_draft_like(target), exits=(1, 2))
    draft.to(dtype=torch.bfloat16)
    _assert_untouched(target, before, reference)
    assert draft.dtype == torch.bfloat16


def test_mark_shared_modules_rejects_names_the_model_lacks():
    with pytest.raises(ValueError, match="names.*'model.embed'"):
        mark_shared_modules(tiny_model("llama"), ("model.embed",))


def test_a_draft_truncated_from_a_gguf_loaded_model_saves_and_reloads(tmp_path):
    """transformers keeps a GGUF quantizer on a model loaded with gguf_file= (its weights are plain
    dequantised tensors) and save_pretrained refused the truncation; the truncation forgets it."""
    target = tiny_model("llama")

    class GGUFQuantizer:  # what transformers' GGUF loading leaves on the model
        quantization_config = type("Config", (), {"quant_method": "gguf"})()

        def is_serializable(self):
            return False

    target.hf_quantizer = GGUFQuantizer()
    target.config.quantization_config = {"quant_method": "gguf"}
    draft = SortedDraft.truncate(target, 2, exits=(1, 2))
    draft.save_pretrained(tmp_path)
    reloaded = SortedDraft.from_pretrained(tmp_path)
    assert reloaded.exits == (1, 2)
    with torch.no_grad():
        assert torch.equal(reloaded.hf_model(PROMPT).logits, draft.hf_model(PROMPT).logits)
    assert target.hf_quantizer is not None  # the loaded model itself is left as it was
