"""The bench tests reuse the training tests' tiny tokenizer and one-thread fixture."""

from python_tests.train.conftest import _one_thread, tiny_tokenizer  # noqa: F401
