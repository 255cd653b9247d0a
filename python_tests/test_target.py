"""CachedLM: holes + explicit positions + compaction compute exactly what a contiguous forward computes."""

from __future__ import annotations

import pytest
import torch

from python_tests.driver.tiny_models import left_padded, make_target
from s2d_ext import _cache_compat
from s2d_ext.target import CachedLM


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return make_target(request.param, seed=4)


def _contiguous_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_holes_and_compaction_match_contiguous_forward(model):
    crops = []
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_padded([4, 7, 2], seed=3)
    runner = CachedLM(model, 3, max_waste=0.0, min_slack=0)
    crop = runner.cache.crop
    runner.cache.crop = lambda n: (crops.append(n), crop(n))
    kept = [ids[b][mask[b].bool()].tolist() for b in range(3)]
    with torch.no_grad():
        runner.forward(ids, mask.bool())
        runner.commit(mask.sum(-1))
        for step in range(12):
            width = int(torch.randint(1, 5, (1,), generator=gen))
            tokens = torch.randint(0, 96, (3, width), generator=gen)
            logits = runner.forward(tokens)
            for b in range(3):  # every appended token sees exactly its row's kept history
                ref = _contiguous_logits(model, kept[b] + tokens[b].tolist())[-width:]
                torch.testing.assert_close(logits[b], ref, rtol=1e-4, atol=1e-4)
            keep = torch.randint(0, width + 1, (3,), generator=gen)
            if step % 2:
                keep[step % 3] = width  # some row keeps everything, so holes stay in the middle
            else:
                keep = keep.clamp(max=width - 1)  # every row rejects the tail: it is cropped
            runner.commit(keep)
            for b in range(3):
                kept[b] += tokens[b, : keep[b]].tolist()
            longest = max(len(k) for k in kept)
            if step % 4 == 3:
                runner.maybe_compact()
                assert runner.num_columns == longest  # max_waste=0: compaction removes every shared hole
            assert runner.live.sum(-1).tolist() == [len(k) for k in kept]
        # drop a row: the others are unaffected
        runner.compact(torch.tensor([0, 2]))
        tokens = torch.randint(0, 96, (2, 3), generator=gen)
        logits = runner.forward(tokens)
        for i, b in enumerate([0, 2]):
            ref = _contiguous_logits(model, kept[b] + tokens[i].tolist())[-3:]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
    assert crops and all(n < 0 for n in crops)  # always crop(-n): crop(0) empties a 5.17 cache


def test_waste_bound_between_steps(model):
    gen = torch.Generator().manual_seed(1)
    runner = CachedLM(model, 4, max_waste=0.25, min_slack=8)
    ids, mask = left_padded([3, 3, 3, 3])
    with torch.no_grad():
        runner.forward(ids, mask.bool())
        runner.commit(mask.sum(-1))
        for _ in range(40):
            tokens = torch.randint(0, 96, (4, 5), generator=gen)
            runner.forward(tokens)
            runner.commit(torch.randint(1, 6, (4,), generator=gen))
            runner.maybe_compact()
            longest = int(runner.live.sum(-1).max())
            assert runner.num_columns <= longest + max(0.25 * longest, 8) + 1e-9
            assert _cache_compat.seq_length(runner.cache) == runner.num_columns
