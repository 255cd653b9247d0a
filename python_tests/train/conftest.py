"""Tiny models and tokenizers shared by the training tests (seconds on a CPU core)."""

import pytest
import torch

TEXT = (
    "def add(a, b):\n    return a + b\n\n\n"
    "def sub(a, b):\n    return a - b\n\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\n"
) * 8


@pytest.fixture(autouse=True)
def _one_thread():
    # NOTE: the machine is shared; one thread keeps these tests cheap and their numerics fixed.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_llama(num_layers=3, vocab_size=64, hidden_size=32, seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from s2d_ext.train.family import train_tokenizer

    return train_tokenizer([TEXT], vocab_size=120, max_chars=10_000)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    """A 3-layer Llama with its tokenizer saved in tmp_path/base; returns the folder."""
    model = tiny_llama(num_layers=3, vocab_size=len(tiny_tokenizer))
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    path = tmp_path / "base"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
