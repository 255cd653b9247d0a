"""The draft states' row operations (DraftState: select, concat, with_capacity): a row keeps its slots,
caches and positions, so it proposes what it would propose alone."""

from __future__ import annotations

import pytest
import torch

from python_tests.draft.helpers import EXITS, MIXED_THRESHOLDS, left_pad, tiny_model
from s2d_ext import SortedDraft
from s2d_ext.draft.hf_draft import HFDraft
from s2d_ext.draft.protocol import DraftState

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 64, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def _draft(kind: str):
    model = tiny_model("llama")
    if kind == "sorted":
        return SortedDraft.from_pretrained(model, exits=EXITS, thresholds=MIXED_THRESHOLDS)
    return HFDraft(model)


def _greedy(draft, state, batch: int, k: int) -> torch.Tensor:
    """[B, k] greedy drafts (every row asks for k; the plain-HF draft takes every argument)."""
    zeros = torch.zeros(batch)
    return draft.propose(
        state,
        k,
        torch.full((batch,), k),
        temperature=zeros,
        top_k=zeros.long(),
        top_p=torch.ones(batch),
        seeds=None,
        offsets=None,
    ).tokens


@pytest.mark.parametrize("kind", ["sorted", "hf"])
def test_rows_selected_and_concatenated_propose_what_they_propose_alone(kind):
    draft = _draft(kind)
    ids, mask = left_pad(PROMPTS)
    alone = [_greedy(draft, draft.begin(*left_pad([p]), 40), 1, 4)[0] for p in PROMPTS]
    state = draft.begin(ids, mask, 40)
    assert isinstance(state, DraftState)
    # NOTE: rows 2 and 0 from one state, row 1 from a state of its own, joined in that order.
    joined = state.select([2, 0]).concat([draft.begin(*left_pad([PROMPTS[1]]), 40)])
    tokens = _greedy(draft, joined, 3, 4)
    for row, prompt in enumerate([2, 0, 1]):
        assert torch.equal(tokens[row], alone[prompt]), (row, prompt)


def test_sorted_state_grows_to_a_capacity_and_keeps_its_rows():
    draft = _draft("sorted")
    ids, mask = left_pad(PROMPTS)
    reference = draft.propose(draft.begin(ids, mask, 40), 4).tokens
    state = draft.begin(ids, mask, 40)
    grown = state.with_capacity(state.capacity + 25)
    assert grown.capacity == state.capacity + 25 and state.with_capacity(1) is state
    assert grown.pads == state.pads
    assert torch.equal(draft.propose(grown, 4).tokens, reference)


def test_sorted_state_keeps_its_rows_padding_on_the_host():
    draft = _draft("sorted")
    state = draft.begin(*left_pad(PROMPTS), 40)
    assert state.pads == state.pad.tolist() == [4, 8, 0]
    assert state.select([2, 1, 1]).pads == [0, 8, 8]
    joined = state.concat([draft.begin(*left_pad([[1, 2]]), 60)])
    assert joined.pads == [4, 8, 0, 0] and joined.capacity >= 8 + 60
