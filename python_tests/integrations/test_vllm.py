"""s2d_ext.integrations.vllm: the custom_class proposer against vLLM's contract, without vLLM.

A small simulator plays vLLM's GPU model runner: a persistent batch (``token_ids_cpu`` [max_num_reqs,
max_model_len] int32, ``num_tokens_no_spec`` [max_num_reqs] int32), bookkeeping that writes each step's
sampled tokens (accepted drafts + one) before ``propose``, requests joining at the end and leaving with the
last row moved into the hole (vLLM's condense). Proposals are checked against a plain-PyTorch cascade (full
recompute of every exit, no caches).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from python_tests.draft.helpers import EXITS, MIXED_THRESHOLDS, VOCAB, ReferenceCascade, tiny_model
from s2d_ext import SortedDraft
from s2d_ext.integrations.vllm import S2DProposer, common_prefix_length

K = 4
MAX_MODEL_LEN = 48
MAX_NUM_REQS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A tiny sorted draft saved as a checkpoint, and the HF model it was made from."""
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("draft")
    SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS).save_pretrained(path)
    return path, model


def vllm_config(additional_config, k=K, max_model_len=MAX_MODEL_LEN):
    """A duck-typed VllmConfig with the fields the proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(
            method="custom_class", model="s2d_ext.integrations.vllm.S2DProposer", num_speculative_tokens=k
        ),
        model_config=SimpleNamespace(max_model_len=max_model_len),
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_NUM_REQS),
        additional_config=additional_config,
    )


class FakeRunner:
    """vLLM's persistent input batch and the bookkeeping before ``propose``, for one proposer."""

    def __init__(self, proposer, reference, seed=0):
        self.proposer = proposer
        self.reference = reference
        self.rng = random.Random(seed)
        self.token_ids_cpu = np.zeros((MAX_NUM_REQS, MAX_MODEL_LEN), dtype=np.int32)
        self.num_tokens_no_spec = np.zeros((MAX_NUM_REQS,), dtype=np.int32)
        self.req_ids: list[str] = []
        self.drafts: dict[str, list[int]] = {}  # last step's proposal per request
        self.pending: dict[str, list[int]] = {}  # sampled tokens to write at the next step
        self.accepted_fewer = 0
        self.checked = 0
        self.scratch_cost = 0  # tokens a draft without caches would run: (n - 1) + (k - 1) per row

    def join(self, req_id, prompt, first_token):
        row = len(self.req_ids)
        self.req_ids.append(req_id)
        self.token_ids_cpu[row, : len(prompt)] = prompt
        self.num_tokens_no_spec[row] = len(prompt)
        self.pending[req_id] = [first_token]  # the prefill step samples one token
        self.drafts[req_id] = []

    def leave(self, req_id):
        """vLLM's condense: the last row moves into the hole."""
        row, last = self.req_ids.index(req_id), len(self.req_ids) - 1
        if row != last:
            self.token_ids_cpu[row] = self.token_ids_cpu[last]
            self.num_tokens_no_spec[row] = self.num_tokens_no_spec[last]
            self.req_ids[row] = self.req_ids[last]
        self.req_ids.pop()
        self.token_ids_cpu[last] = 0
        self.num_tokens_no_spec[last] = 0
        del self.drafts[req_id], self.pending[req_id]

    def verify(self, req_id, accept=None):
        """The target keeps ``accept`` of the request's drafts (random when None) and samples one more,
        different from the next draft when one was rejected."""
        drafts = self.drafts[req_id]
        a = self.rng.randint(0, len(drafts)) if accept is None else min(accept, len(drafts))
        if a < len(drafts):
            bonus = self.rng.choice([t for t in range(1, VOCAB) if t != drafts[a]])
            self.accepted_fewer += 1
        else:
            bonus = self.rng.randrange(1, VOCAB)
        self.pending[req_id] = drafts[:a] + [bonus]

    def step(self, accept=None, skip=()):
        """Bookkeeping then ``propose``; checks each proposal against the reference cascade."""
        sampled = []
        for row, req_id in enumerate(self.req_ids):
            ids = [] if req_id in skip else self.pending[req_id]
            start = int(self.num_tokens_no_spec[row])
            ids = ids[: MAX_MODEL_LEN - start]
            self.token_ids_cpu[row, start : start + len(ids)] = ids
            self.num_tokens_no_spec[row] = start + len(ids)
            sampled.append(list(ids))
        out = self.proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu, slot_mappings=None)
        assert isinstance(out, list) and len(out) == len(self.req_ids)
        for row, req_id in enumerate(self.req_ids):
            n = int(self.num_tokens_no_spec[row])
            if not sampled[row] or n >= MAX_MODEL_LEN:
                assert out[row] == []
                continue
            k = min(K, MAX_MODEL_LEN - n)
            context = self.token_ids_cpu[row, :n].tolist()
            expected, _, _ = self.reference.draft(context, k)
            assert all(isinstance(t, int) for t in out[row])
            assert out[row] == expected, f"{req_id} (row {row}, {n} tokens)"
            self.checked += 1
            self.scratch_cost += (n - 1) + (k - 1)
            self.drafts[req_id] = out[row]
        for req_id in self.req_ids:
            if req_id not in skip:
                self.verify(req_id, accept if not callable(accept) else accept(req_id))
        return out


def make(draft_dir, seed=0, **extra):
    path, model = draft_dir
    proposer = S2DProposer(vllm_config({"s2d_draft": str(path), "s2d_device": "cpu", **extra}))
    return FakeRunner(proposer, ReferenceCascade(model, EXITS, MIXED_THRESHOLDS), seed=seed)


def test_steps_with_joins_leaves_and_rewinds_match_the_reference(draft_dir):
    runner = make(draft_dir)
    proposer = runner.proposer
    runner.join("a", [5, 17, 33, 2, 90, 41, 7], 11)
    runner.join("b", [8, 64, 3], 12)
    runner.step()
    runner.join("c", [9, 9, 9, 1], 13)
    for _ in range(3):
        runner.step()
    runner.leave("a")  # c moves into a's row
    runner.join("d", [5, 17, 33, 2, 88], 14)  # shares a prompt prefix with the finished a
    for _ in range(3):
        runner.step(skip=("b",) if proposer.stats.steps == 5 else ())
    assert runner.accepted_fewer >= 3, "some rows must rewind after a rejection"
    assert proposer.stats.fresh == 3  # a, b, c; c's move and d's join reuse states
    assert proposer.stats.reused_tokens > 0
    assert proposer.stats.fed_tokens < runner.scratch_cost / 2, (
        proposer.stats.fed_tokens,
        runner.scratch_cost,
    )
    assert runner.checked >= 15


def test_a_row_that_accepts_one_of_its_drafts_rewinds_the_cache(draft_dir):
    runner = make(draft_dir, seed=1)
    runner.join("a", [3, 1, 4, 1, 5, 9, 2, 6], 5)
    runner.step()
    stats = runner.proposer.stats
    for accept in (1, 0, K, 2, 0):
        runner.verify("a", accept)
        reused, before = stats.reused_tokens, int(runner.num_tokens_no_spec[0])
        runner.step(accept=0)
        # The context and the accepted drafts before the pending token came from the cache (the last
        # draft of a step is never fed, so a row that kept all K feeds that one).
        n = int(runner.num_tokens_no_spec[0])
        assert stats.reused_tokens - reused == min(n - 1, before + K - 1)
    cached = runner.proposer._cached
    assert len(cached) == 1
    state = cached[0].state
    n = int(runner.num_tokens_no_spec[0])
    # The state holds the row's context then exactly this step's drafts.
    assert state.tokens[0, :n].tolist() == runner.token_ids_cpu[0, :n].tolist()
    assert state.tokens[0, n : n + K].tolist() == runner.drafts["a"]
    assert runner.proposer.stats.fresh == 1


def test_two_rows_with_one_prompt_fork_the_state(draft_dir):
    runner = make(draft_dir, seed=2)
    runner.join("a", [4, 4, 8, 15, 16, 23, 42], 9)
    runner.step()
    runner.join("b", [4, 4, 8, 15, 16, 23, 42], 10)  # parallel sampling: the same prompt
    runner.step()
    runner.step()
    assert runner.proposer.stats.fresh == 1 and runner.proposer.stats.forked == 1


def test_proposals_shrink_near_max_model_len(draft_dir):
    runner = make(draft_dir, seed=3)
    runner.join("a", list(range(1, MAX_MODEL_LEN - 6)), 7)  # 41 prompt tokens + 1
    lengths = []
    for _ in range(5):
        out = runner.step(accept=lambda _: K)
        n = int(runner.num_tokens_no_spec[0])
        lengths.append((n, len(out[0])))
    assert lengths[0] == (MAX_MODEL_LEN - 6, K)
    assert all(length == min(K, max(0, MAX_MODEL_LEN - n)) for n, length in lengths)
    assert lengths[-1] == (MAX_MODEL_LEN, 0)


def test_idle_states_are_evicted(draft_dir):
    runner = make(draft_dir, seed=4, s2d_max_idle_steps=2)
    runner.join("a", [1, 2, 3], 4)
    runner.join("b", [7, 8, 9], 6)
    runner.step()
    runner.leave("b")
    assert len(runner.proposer._cached) == 2
    for _ in range(3):
        runner.step()
    assert len(runner.proposer._cached) == 1 and runner.proposer.stats.evicted == 1


def test_common_prefix_length():
    a = np.array([1, 2, 3, 4])
    assert common_prefix_length(a, np.array([1, 2, 9])) == 2
    assert common_prefix_length(a, np.array([1, 2])) == 2
    assert common_prefix_length(a, np.array([5])) == 0
    assert common_prefix_length(a, a) == 4


def test_a_config_without_a_draft_names_the_key(monkeypatch, draft_dir):
    monkeypatch.delenv("S2D_VLLM_DRAFT", raising=False)
    for extra in ({}, None, {"s2d_draft": ""}):
        with pytest.raises(ValueError, match=r"additional_config\['s2d_draft'\]") as info:
            S2DProposer(vllm_config(extra))
        assert "\n" not in str(info.value) and "S2D_VLLM_DRAFT" in str(info.value)
    with pytest.raises(ValueError, match=r"'s2d_draft'\] = '/nonexistent/draft' is not a folder"):
        S2DProposer(vllm_config({"s2d_draft": "/nonexistent/draft"}))
    path = str(draft_dir[0])
    with pytest.raises(ValueError, match="unknown additional_config key 's2d_thresold'"):
        S2DProposer(vllm_config({"s2d_draft": path, "s2d_thresold": [0.5]}))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        S2DProposer(vllm_config({"s2d_draft": path}, k=None))
    monkeypatch.setenv("S2D_VLLM_DRAFT", path)
    assert S2DProposer(vllm_config({})).options.draft == path


def test_the_module_imports_no_engine():
    import subprocess
    import sys

    code = "import sys, s2d_ext.integrations.vllm; print(sorted({'vllm', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
