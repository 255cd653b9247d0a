"""A tiny target + draft + character tokenizer behind a real HTTP server on loopback."""

from __future__ import annotations

import pytest
import torch

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine

from ..driver.tiny_models import make_target

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


class CharTokenizer:
    """Printable ASCII, one token per character (id = ord - 32); no special tokens, no chat template."""

    chat_template = None
    eos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [min(max(ord(c) - 32, 0), 95) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + int(i)) for i in ids)


@pytest.fixture(scope="module")
def served():
    """(url, async_engine, make_engine, tokenizer): one server for the module."""
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine
    from s2d_ext.server.launch import serving_in_thread

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    target = make_target("llama", seed=3)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    make = lambda: Engine(draft, {"tiny": target})  # noqa: E731
    engine = AsyncEngine(make())
    tokenizer = CharTokenizer()
    with serving_in_thread(build_app(engine, tokenizer)) as url:
        yield url, engine, make, tokenizer
    engine.close()
    torch.set_num_threads(previous)
