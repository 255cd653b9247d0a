"""StepReadout: one target's results scattered into their draft rows, one packed read, the fields by name."""

from __future__ import annotations

import torch

from s2d_ext.engine import host_reads
from s2d_ext.engine.readout import StepReadout


def test_rows_read_back_by_field_in_one_read():
    readout = StepReadout(batch=3, k=2, top_n=1, device=torch.device("cpu"))
    # A target serving draft rows 2 and 0, with drafts of width 2.
    rows = torch.tensor([2, 0])
    out = torch.tensor([[7, 8, 9], [5, -1, -1]])  # row 2: both drafts accepted, 9 emitted; row 0: 5 emitted
    n_accepted = torch.tensor([2, 0], dtype=torch.int32)
    blocked = torch.tensor([3, 3])  # k + 1: no position masked entirely
    logprobs = torch.arange(2 * 9, dtype=torch.float64).reshape(2, 9) / 8
    readout.scatter(rows, out, n_accepted, blocked, logprobs)
    assert readout.emitted().tolist() == [5, 0, 9]
    with host_reads.count_reads() as reads:
        readout.read(torch.tensor([1, 0, 2]), torch.tensor([[4, -1], [-1, -1], [2, 4]]))
    assert reads[0] == 1
    row = readout.row(2)
    assert (row.tokens, row.n_accepted, row.n_proposed, row.exits, row.blocked) == (
        [7, 8, 9],
        2,
        2,
        [2, 4],
        False,
    )
    assert row.logprobs == (logprobs[0]).tolist()
    row = readout.row(0)
    assert (row.tokens, row.n_accepted, row.n_proposed, row.exits) == ([5], 0, 1, [4])
    assert row.logprobs == logprobs[1].tolist()


def test_a_blocked_position_cuts_the_tokens():
    readout = StepReadout(batch=1, k=3, top_n=-1, device=torch.device("cpu"))
    assert readout.logprobs is None
    readout.scatter(
        torch.tensor([0]), torch.tensor([[4, 6, 2, 1]]), torch.tensor([3]), torch.tensor([1]), None
    )
    readout.read(torch.tensor([3]), torch.tensor([[2, 2, 2]]))
    row = readout.row(0)
    assert row.blocked and row.tokens == [4] and row.n_accepted == 3
