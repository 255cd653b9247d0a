"""The CLI tests reuse the training tests' tiny checkpoint (a 3-layer Llama with its tokenizer)."""

from python_tests.train.conftest import _one_thread, tiny_checkpoint, tiny_tokenizer  # noqa: F401
