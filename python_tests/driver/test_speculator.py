"""One draft, several targets: per-row targets, per-target settings, calibration."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

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
    chosen = spec.calibrate(
        "t", prompts, max_new_tokens=8, num_draft_grid=[2, 4], threshold_grid=[0.3, 0.9], rounds=2
    )
    results = chosen["results"]
    # 2 shared thresholds + the 2 fixed exits, times 2 draft lengths of the target's policy and the 2
    # short fixed lengths: every candidate is reported
    assert len(results) == 16
    assert {(r["draft_length"], r["num_draft_tokens"]) for r in results} == {
        ("heuristic", 2),
        ("heuristic", 4),
        ("fixed", 1),
        ("fixed", 2),
    }
    assert {r["thresholds"] for r in results} == {(0.3, 0.0), (0.9, 0.0), (0.0, 0.0), (1.0, 0.0)}
    assert {r["fixed_exit"] for r in results if r["thresholds"] in ((0.0, 0.0), (1.0, 0.0))} == {1, 2}
    assert all(r["fixed_exit"] is None for r in results if r["thresholds"] in ((0.3, 0.0), (0.9, 0.0)))
    # every candidate ran every round; the finalists (a quarter, at least 2) twice as many times
    counts = sorted(len(r["timings"]) for r in results)
    assert counts == [2] * 12 + [4] * 4
    for r in results:
        assert r["tokens_per_second"] == statistics.median(r["timings"]) and r["mat"] >= 1.0
    assert [r["tokens_per_second"] for r in results] == sorted(
        (r["tokens_per_second"] for r in results), reverse=True
    )
    assert chosen["tokens_per_second"] == results[0]["tokens_per_second"]
    assert spec.settings["t"]["num_draft_tokens"] == chosen["num_draft_tokens"]
    assert spec.settings["t"]["thresholds"] == chosen["thresholds"]
    # calibration changes speed only: greedy output is still the target's
    ids, mask = left_padded([4, 7])
    out = spec.generate(ids, mask, target="t", max_new_tokens=10, pad_token_id=0)
    assert torch.equal(out.sequences, greedy_reference(target, ids, mask, 10))


def test_calibrate_defaults_reach_low_thresholds_and_every_fixed_exit(monkeypatch):
    """The default grid goes below 0.4 and holds each fixed exit; runs are counted without timing them."""
    from s2d_ext.driver import speculator

    target = make_target("llama", seed=2)
    draft = SortedDraft.truncate(target, 3, exits=(1, 2, 3))
    spec = s2d_ext.Speculator(draft, targets={"t": target})
    calls = []

    def fake_generate(self, input_ids, attention_mask=None, **kwargs):
        assert kwargs["draft_length"] in ("fixed", "heuristic")
        calls.append((kwargs["thresholds"], kwargs["num_draft_tokens"], kwargs.get("seed")))
        rows = input_ids.shape[0]
        return SimpleNamespace(
            stats=SimpleNamespace(new_tokens=[4] * rows, mat=2.0, mat_per_row=[2.0] * rows)
        )

    monkeypatch.setattr(speculator.Speculator, "generate", fake_generate)
    chosen = spec.calibrate("t", [[1, 2, 3]], max_new_tokens=4, temperature=1.0)
    taus = {r["thresholds"] for r in chosen["results"]}
    assert min(t[0] for t in taus if t not in ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0))) < 0.4
    assert {(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)} <= taus
    assert {r["fixed_exit"] for r in chosen["results"]} == {None, 1, 2, 3}
    n = len(chosen["results"])
    assert n == (7 + 3) * (4 + 2)  # heuristic at 2, 4, 6, 8 and fixed at 1, 2 (SHORT_FIXED_LENGTHS)
    assert len(calls) == 1 + 3 * n + 3 * max(2, -(-n // 4))  # warm-up, 3 rounds, 3 rounds of finalists
    assert {seed for *_, seed in calls} == {0}  # sampled calibration runs with a fixed seed
    # draft-length policies as one more dimension; the winner's policy is kept
    calls.clear()
    both = spec.calibrate("t", [[1, 2, 3]], num_draft_grid=[3], draft_length_grid=["fixed", "heuristic"])
    assert len(both["results"]) == 2 * 10
    assert {r["draft_length"] for r in both["results"]} == {"fixed", "heuristic"}
    assert spec.settings["t"]["draft_length"] == both["draft_length"]
    with pytest.raises(ValueError, match="draft_length_grid"):
        spec.calibrate("t", [[1, 2, 3]], draft_length_grid=["sometimes"])
    # batch_size: every run generates the prompts in batches of that size, without all-padding columns
    shapes = []
    monkeypatch.setattr(
        speculator.Speculator,
        "generate",
        lambda self, ids, mask=None, **kw: (
            shapes.append(tuple(ids.shape)) or fake_generate(self, ids, mask, **kw)
        ),
    )
    result = spec.calibrate(
        "t", [[1, 2, 3], [4], [5, 6]], num_draft_grid=[3], threshold_grid=[], batch_size=2
    )
    assert set(shapes) == {(2, 3), (1, 2)}
    # 3 fixed exits x (heuristic at 3, fixed at 1 and 2) = 9 candidates, 3 finalists
    assert result["mat"] == 2.0 and len(shapes) == 2 * (1 + 3 * 9 + 3 * 3)


def test_calibrate_rejects_bad_grids():
    target = make_target("llama", seed=2)
    spec = s2d_ext.Speculator(SortedDraft.truncate(target, 2, exits=(1, 2)), targets={"t": target})
    with pytest.raises(ValueError, match="threshold_grid"):
        spec.calibrate("t", [[1, 2]], threshold_grid=[1.5])
    with pytest.raises(ValueError, match="num_draft_grid"):
        spec.calibrate("t", [[1, 2]], num_draft_grid=[])
    with pytest.raises(ValueError, match="rounds"):
        spec.calibrate("t", [[1, 2]], rounds=0)


def test_unknown_target_name(setup):
    spec, _, _, _ = setup
    ids, mask = left_padded([3, 3])
    with pytest.raises(ValueError, match="'medium'"):
        spec.generate(ids, mask, target=["small", "medium"], max_new_tokens=4)
    with pytest.raises(ValueError, match="one name per row"):
        spec.generate(ids, mask, target=["small"], max_new_tokens=4)
    with pytest.raises(ValueError, match="'medium'"):
        spec.calibrate("medium", [[1, 2]])


@pytest.mark.parametrize("argument", ["thresholds", "num_draft_tokens", "draft_length", "stop_threshold"])
def test_per_target_setting_for_an_unknown_target_raises(setup, argument):
    _, small, large, draft = setup
    value = {"thresholds": (0.9, 0.0), "num_draft_tokens": 2, "draft_length": "fixed", "stop_threshold": 0.5}
    with pytest.raises(ValueError, match=rf"{argument}.*'lrage'.*\['large', 'small'\]"):
        s2d_ext.Speculator(draft, {"large": large, "small": small}, **{argument: {"lrage": value[argument]}})
