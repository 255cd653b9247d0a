"""Draft models for speculative decoding: the protocol, the sorted early-exit draft, draft-length policies."""

from s2d_ext.draft.policies import (
    ConfidenceStop,
    DraftLengthPolicy,
    FixedLength,
    HeuristicLength,
    make_policy,
)
from s2d_ext.draft.protocol import DraftModel, DraftState, Proposal
from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.draft.static_cache import SortedDraftState

__all__ = [
    "ConfidenceStop",
    "DraftLengthPolicy",
    "DraftModel",
    "DraftState",
    "FixedLength",
    "HeuristicLength",
    "Proposal",
    "SortedDraft",
    "SortedDraftState",
    "make_policy",
]
