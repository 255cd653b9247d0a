"""Qwen2.5-Coder-0.5B-Instruct from its part packages (CI installs the 0.5B's six; the 1.5B's 22 are left to
`make install-qwen`): the alias resolves to the cached bf16 checkpoint, and with row-invariant kernels greedy
speculative decoding in bfloat16 equals the same model's generate() token for token."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from s2d_ext import checkpoints, packaged_models
from s2d_ext.row_invariant import use_row_invariant_kernels

PROMPTS = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    "def fizzbuzz(n):\n",
]


@pytest.fixture(scope="module")
def qwen05():
    model = packaged_models.PACKAGED_MODELS["qwen-coder-0.5b"]
    missing = packaged_models.missing_distributions(model)
    if missing:
        pytest.skip(packaged_models.missing_message(model))
    ref = checkpoints.resolve_target("qwen-coder-0.5b")
    tokenizer = checkpoints.load_tokenizer(ref)
    target = checkpoints.load_target(ref, dtype=torch.bfloat16)
    return tokenizer, target, ref


def test_alias_resolves_to_the_converted_checkpoint(qwen05):
    tokenizer, target, ref = qwen05
    assert ref.describe() == "qwen-coder-0.5b" and not ref.is_gguf
    assert packaged_models.checkpoint_problem(ref.folder) is None
    config = target.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (24, 896, 151936)
    assert target.get_input_embeddings().weight.dtype == torch.bfloat16
    assert getattr(config, "quantization_config", None) is None and len(tokenizer) == 151936


def test_greedy_speculation_equals_generate_in_bfloat16(qwen05):
    tokenizer, target, _ = qwen05
    torch.set_num_threads(1)
    use_row_invariant_kernels(target)
    try:
        draft = s2d_ext.SortedDraft.truncate(
            target, 8, exits=(4, 8), thresholds=(0.6, 0.0), share_embeddings=True
        )
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.inference_mode():
                reference = target.generate(ids, max_new_tokens=24, do_sample=False)
            out = s2d_ext.speculate(target, draft, ids, max_new_tokens=24)
            assert torch.equal(out.sequences, reference)
    finally:
        use_row_invariant_kernels(target, enable=False)
