"""Draft-length policies."""

from __future__ import annotations

import pytest
import torch

from s2d_ext.draft.policies import (
    DEFAULT_STOP_THRESHOLD,
    ConfidenceStop,
    FixedLength,
    HeuristicLength,
    make_policy,
)


def test_fixed():
    policy = make_policy("fixed", 4)
    assert isinstance(policy, FixedLength) and policy.stop_threshold is None and policy.max_tokens == 4
    current = policy.initial(3, "cpu")
    assert current.dtype == torch.int64 and current.tolist() == [4, 4, 4]
    nxt = policy.update(current, torch.tensor([0, 4, 2]), torch.tensor([4, 4, 4]))
    assert nxt.tolist() == [4, 4, 4]


def test_heuristic_follows_transformers_schedule():
    policy = make_policy("heuristic", 5)
    assert isinstance(policy, HeuristicLength) and policy.max_tokens == 16
    current = policy.initial(4)
    assert current.tolist() == [5, 5, 5, 5]
    # fully accepted -> +2; otherwise -1; a row that drafted nothing keeps its length
    nxt = policy.update(current, torch.tensor([5, 4, 0, 0], dtype=torch.int32), torch.tensor([5, 5, 5, 0]))
    assert nxt.tolist() == [7, 4, 4, 5]
    # a confidence-cut proposal fully accepted counts as fully accepted
    assert policy.update(torch.tensor([7]), torch.tensor([3]), torch.tensor([3])).tolist() == [9]
    # never below 1, never above the cap
    low = torch.tensor([1])
    assert policy.update(low, torch.tensor([0]), torch.tensor([1])).tolist() == [1]
    high = torch.tensor([15])
    assert policy.update(high, torch.tensor([15]), torch.tensor([15])).tolist() == [16]
    assert make_policy("heuristic", 3, max_num_draft=6).update(
        torch.tensor([5]), torch.tensor([5]), torch.tensor([5])
    ).tolist() == [6]


def test_confidence_stop():
    policy = make_policy("confidence", 6)
    assert isinstance(policy, ConfidenceStop) and policy.stop_threshold == DEFAULT_STOP_THRESHOLD
    assert policy.initial(2).tolist() == [6, 6]
    assert policy.update(torch.tensor([6, 6]), torch.tensor([0, 6]), torch.tensor([2, 6])).tolist() == [6, 6]
    assert make_policy("confidence", 6, stop_threshold=0.7).stop_threshold == 0.7


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="must be one of"):
        make_policy("greedy", 4)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        make_policy("fixed", 0)
    with pytest.raises(ValueError, match="stop_threshold"):
        make_policy("confidence", 4, stop_threshold=1.5)
    with pytest.raises(ValueError, match="max_num_draft"):
        make_policy("heuristic", 8, max_num_draft=4)
