"""One draft, several targets: per-row targets, per-target settings, calibration."""

from __future__ import annotations

import pytest
import torch

import s2d_ext
from s2d_ext.draft.sorted_draft import SortedDraft

from .tiny_models import greedy_reference, left_padded, make_target


@pytest.fixture(scope="module")
def setup():
    large = make_target("llama", layers=4, seed=0)
    small = make_target("llama", layers=3, seed=0, damp=0.3)
    draft = SortedDraft.truncate(large, 2, exits=(1, 2), thresholds=(0.6, 0.0))
    spec = s2d_ext.Speculator(
        draft,
        targets={"small": small, "large": large},
        thresholds={"small": (0.9, 0.0)},
        num_draft_tokens={"small": 2, "large": 4},
    )
    return spec, small, large, draft


def _new(out, row, width):
    return out.sequences[row, width : width + out.stats.new_tokens[row]].tolist()


def test_mixed_targets_greedy_equal_each_target_alone(setup):
    spec, small, large, _ = setup
    ids, mask = left_padded([5, 9, 3, 7, 6], seed=4)
    names = ["small", "large", "large", "small", "large"]
    out = spec.generate(ids, mask, target=names, max_new_tokens=16, pad_token_id=0)
    models = {"small": small, "large": large}
    for row, name in enumerate(names):
        ref = greedy_reference(models[name], ids[row : row + 1], mask[row : row + 1], 16)
        assert out.sequences[row].tolist() == ref[0].tolist()
    assert set(out.stats.exit_histogram) <= {1, 2}


def test_mixed_targets_sampling_equal_each_row_alone(setup):
    spec, _, _, _ = setup
    ids, mask = left_padded([4, 8, 6], seed=5)
    names = ["large", "small", "large"]
    kwargs = dict(
        max_new_tokens=14, temperature=1.0, top_p=0.9, seed=[1, 2, 3], eos_token_id=9, pad_token_id=0
    )
    out = spec.generate(ids, mask, target=names, **kwargs)
    for row, name in enumerate(names):
        n = int(mask[row].sum())
        kwargs["seed"] = [row + 1]
        alone = spec.generate(ids[row : row + 1, -n:], target=name, **kwargs)
        assert _new(out, row, ids.shape[1]) == _new(alone, 0, n)


def test_speculate_equals_speculator_single_target(setup):
    spec, small, _, draft = setup
    ids, mask = left_padded([6, 2], seed=6)
    a = spec.generate(ids, mask, target="small", max_new_tokens=12, temperature=0.9, seed=7)
    b = s2d_ext.speculate(
        small,
        draft,
        ids,
        mask,
        max_new_tokens=12,
        temperature=0.9,
        seed=7,
        thresholds=(0.9, 0.0),
        num_draft_tokens=2,
    )
    assert torch.equal(a.sequences, b.sequences)


def test_thresholds_are_kept_per_target(setup):
    spec, _, _, _ = setup
    ids, mask = left_padded([6], seed=8)
    eager = spec.generate(ids, mask, target="large", max_new_tokens=10, thresholds=(0.0, 0.0))
    assert set(eager.stats.exit_histogram) == {1}  # threshold 0: every token exits at layer 1
    late = spec.generate(ids, mask, target="large", max_new_tokens=10, thresholds=(1.0, 0.0))
    assert set(late.stats.exit_histogram) == {2}
    assert spec.settings["small"]["thresholds"] == (0.9, 0.0)
    assert spec.settings["large"]["thresholds"] is None  # the draft's own


def test_calibrate_picks_and_keeps_settings():
    target = make_target("llama", seed=2)
    draft = SortedDraft.truncate(target, 2, exits=(1, 2))
    spec = s2d_ext.Speculator(draft, targets={"t": target})
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    chosen = spec.calibrate("t", prompts, max_new_tokens=8, num_draft_grid=[2, 4], threshold_grid=[0.5, 0.9])
    assert len(chosen["results"]) == 4
    assert chosen["tokens_per_second"] == max(r["tokens_per_second"] for r in chosen["results"])
    assert spec.settings["t"]["num_draft_tokens"] == chosen["num_draft_tokens"]
    assert spec.settings["t"]["thresholds"] == chosen["thresholds"]
    # calibration changes speed only: greedy output is still the target's
    ids, mask = left_padded([4, 7])
    out = spec.generate(ids, mask, target="t", max_new_tokens=10, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_reference(target, ids, mask, 10))


def test_unknown_target_name(setup):
    spec, _, _, _ = setup
    ids, mask = left_padded([3, 3])
    with pytest.raises(ValueError, match="'medium'"):
        spec.generate(ids, mask, target=["small", "medium"], max_new_tokens=4)
    with pytest.raises(ValueError, match="one name per row"):
        spec.generate(ids, mask, target=["small"], max_new_tokens=4)
    with pytest.raises(ValueError, match="'medium'"):
        spec.calibrate("medium", [[1, 2]])
