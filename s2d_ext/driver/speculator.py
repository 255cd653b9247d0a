"""``Speculator``: one draft serving several targets, with per-target settings and calibration.

The draft proposes for the whole batch in one pass (each row with its own target's exit thresholds and
draft length); each target verifies only its own rows (:class:`s2d_ext.engine.Engine` with one
:class:`~s2d_ext.engine.TargetConfig` per target). ``calibrate`` measures tokens/s over a small grid
of thresholds, fixed exits and draft lengths (several alternating rounds, medians) and keeps the best for
that target.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from s2d_ext.driver.batch import BatchRequest, SpeculateOutput, generate_batch
from s2d_ext.engine.models import DRAFT_LENGTHS, TargetConfig, as_draft, check_target
from s2d_ext.engine.params import check_int as _check_int


class Speculator:
    """One draft, many targets.

    Parameters
    ----------
    draft : SortedDraft, DraftModel or transformers.PreTrainedModel
    targets : dict[str, transformers.PreTrainedModel]
        Name -> target. All must share the draft's vocabulary.
    thresholds : dict[str, sequence of float], optional
        Exit thresholds per target (missing: the draft's own).
    num_draft_tokens : dict[str, int] or int
        Draft length per target (start value of the "heuristic" policy).
    draft_length : str or dict[str, str]
        "fixed", "heuristic" or "confidence", for all targets or per target.
    stop_threshold : float or dict[str, float], optional
        Confidence stop of the "confidence" policy.

    Raises
    ------
    ValueError
        When a per-target dict has a key that is not a name in ``targets``.
    """

    def __init__(
        self,
        draft: Any,
        targets: Mapping[str, torch.nn.Module],
        thresholds: Mapping[str, Sequence[float] | None] | None = None,
        num_draft_tokens: Mapping[str, int] | int = 5,
        draft_length: Mapping[str, str] | str = "heuristic",
        stop_threshold: Mapping[str, float] | float | None = None,
    ) -> None:
        if not isinstance(targets, Mapping) or not targets:
            raise TypeError("targets must be a non-empty dict of name -> transformers causal LM")
        self.draft = as_draft(draft)
        self.targets = dict(targets)
        for name, model in self.targets.items():
            check_target(name, model, self.draft)
        per_target = {
            "thresholds": thresholds,
            "num_draft_tokens": num_draft_tokens,
            "draft_length": draft_length,
            "stop_threshold": stop_threshold,
        }
        for argument, value in per_target.items():
            _check_target_keys(argument, value, self.targets)
        self.settings: dict[str, dict[str, Any]] = {}
        for name in self.targets:
            self.settings[name] = {
                "thresholds": _setting_for(name, thresholds, None),
                "num_draft_tokens": _setting_for(name, num_draft_tokens, 5),
                "draft_length": _setting_for(name, draft_length, "heuristic"),
                "stop_threshold": _setting_for(name, stop_threshold, None),
            }
            self.settings[name]["thresholds"] = self._config(name, self.settings[name]).thresholds

    def _config(self, name: str, conf: Mapping[str, Any]) -> TargetConfig:
        return TargetConfig(self.targets[name], **conf).checked(name, self.draft)

    # ------------------------------------------------------------------------------------------ generate
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        target: str | Sequence[str],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        streamer: Any = None,
        num_draft_tokens: int | None = None,
        draft_length: str | None = None,
        thresholds: Sequence[float] | None = None,
        profile: bool = False,
        **sampling: Any,
    ) -> SpeculateOutput:
        """Generate every row with its own target (``target``: one name, or one name per row).

        Other arguments as in :func:`s2d_ext.speculate` (unset ones from the targets' generation_config,
        which must then agree); ``num_draft_tokens``, ``draft_length`` and ``thresholds`` override the
        per-target settings for this call.

        Returns
        -------
        SpeculateOutput
            ``sequences`` [B, L + max new], ``stats``.
        """
        batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 1
        names = [target] * batch if isinstance(target, str) else list(target)
        if len(names) != batch:
            raise ValueError(
                f"target must be one name or one name per row (B={batch}), got {len(names)} names"
            )
        unknown = sorted({n for n in names if n not in self.targets}, key=str)
        if unknown:
            raise ValueError(
                f"target {unknown[0]!r} is not held by this Speculator (it has {sorted(self.targets)})"
            )
        overrides = {
            "num_draft_tokens": num_draft_tokens,
            "draft_length": draft_length,
            "thresholds": thresholds,
        }
        configs = {}
        for name in dict.fromkeys(names):
            conf = {**self.settings[name], **{k: v for k, v in overrides.items() if v is not None}}
            configs[name] = self._config(name, conf)
        request = BatchRequest(
            input_ids,
            attention_mask,
            names,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            stop_token_ids=stop_token_ids,
            streamer=streamer,
            profile=profile,
            sampling=sampling,
        )
        return generate_batch(self.draft, configs, request)

    # ----------------------------------------------------------------------------------------- calibrate
    def calibrate(
        self,
        target_name: str,
        prompts: torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        num_draft_grid: Sequence[int] | None = None,
        threshold_grid: Sequence[float] | None = None,
        fixed_exits: bool = True,
        draft_length_grid: Sequence[str] | None = None,
        rounds: int = 3,
        refine: int | None = None,
        batch_size: int | None = None,
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """Pick the exit thresholds and draft length with the best measured tokens/s on ``prompts``.

        Candidates: every draft length of ``num_draft_grid`` (default 2, 4, 6, 8) times, for a draft with
        early exits, every shared early-exit threshold of ``threshold_grid`` (default 0.05, 0.1, 0.2, 0.3,
        0.4, 0.6, 0.8) and, with ``fixed_exits``, every single fixed exit (exit i always fires, the exits
        before it are off: thresholds 1, ..., 1, 0, ...), so calibrated S2D is never slower than the best
        fixed-exit draft on these prompts, up to timing noise. ``draft_length_grid`` adds draft-length
        policies as a dimension ("fixed", "heuristic", "confidence"); by default the one in
        ``generate_kwargs`` (else this target's setting) with ``num_draft_grid``, plus "fixed" at the
        lengths of :data:`SHORT_FIXED_LENGTHS` (1 and 2) for every threshold option. NOTE: where verifying
        more tokens costs disproportionately (on the 2-core Xeon of bench/results, a SmolLM2 forward of 4
        tokens costs 1.7x one token, of 3 tokens 1.25x: the CPU GEMM slows above 3 rows), a short fixed
        draft beats a growing one when acceptance is low.

        Timing: one warm-up run, then ``rounds`` rounds that time every candidate once each, in an order
        that alternates (forward, then backward) so slow drifts of the machine hit all candidates alike;
        then the ``refine`` best candidates by median (default: a quarter of them, at least 2) get
        ``rounds`` more rounds. A candidate's score is the median tokens/s of all its runs. A run
        generates every prompt, in batches of ``batch_size`` (default: all at once; pass the batch size the
        settings will serve, since the best settings differ between batch 1 and larger batches). Sampling runs
        use ``seed=0`` unless a seed is given, so every run of a candidate emits the same tokens and only
        the timing varies. The winner is kept in ``self.settings[target_name]``.

        Returns
        -------
        dict
            ``{"thresholds", "num_draft_tokens", "draft_length", "tokens_per_second", "mat", "fixed_exit",
            "results"}``:
            the winner, and ``results``, one entry per candidate timed (``thresholds``,
            ``num_draft_tokens``, ``draft_length``, ``fixed_exit`` (the exit layer, or None),
            ``tokens_per_second`` (the median), ``timings`` (tokens/s of every run), ``mat``), best first.
        """
        if target_name not in self.targets:
            raise ValueError(
                f"target {target_name!r} is not held by this Speculator (it has {sorted(self.targets)})"
            )
        rounds = _check_int("rounds", rounds, low=1)
        input_ids, attention_mask = _batch_prompts(prompts, attention_mask)
        batches = _split_batches(input_ids, attention_mask, batch_size)
        policy = generate_kwargs.pop("draft_length", None) or self.settings[target_name]["draft_length"]
        policies = list(draft_length_grid) if draft_length_grid is not None else [policy]
        if not policies or any(p not in DRAFT_LENGTHS for p in policies):
            raise ValueError(f"draft_length_grid must name policies from {DRAFT_LENGTHS}, got {policies!r}")
        candidates = [
            {**c, "draft_length": p}
            for p in policies
            for c in _calibration_candidates(self.draft.exits, num_draft_grid, threshold_grid, fixed_exits)
        ]
        if draft_length_grid is None:
            seen = {(repr(c["thresholds"]), c["num_draft_tokens"], c["draft_length"]) for c in candidates}
            for c in _calibration_candidates(
                self.draft.exits, SHORT_FIXED_LENGTHS, threshold_grid, fixed_exits
            ):
                key = (repr(c["thresholds"]), c["num_draft_tokens"], "fixed")
                if key not in seen:
                    candidates.append({**c, "draft_length": "fixed"})
        refine = max(2, -(-len(candidates) // 4)) if refine is None else _check_int("refine", refine, low=0)
        kwargs = {"max_new_tokens": max_new_tokens, **generate_kwargs}
        if kwargs.get("temperature", 0.0) > 0:
            kwargs.setdefault("seed", 0)

        def run(candidate: dict[str, Any]) -> tuple[float, float]:
            new_tokens, steps = 0, 0.0
            start = time.perf_counter()
            for ids, mask in batches:
                out = self.generate(
                    ids,
                    mask,
                    target=target_name,
                    num_draft_tokens=candidate["num_draft_tokens"],
                    thresholds=candidate["thresholds"],
                    draft_length=candidate["draft_length"],
                    **kwargs,
                )
                new_tokens += sum(out.stats.new_tokens)
                steps += sum(n / m for n, m in zip(out.stats.new_tokens, out.stats.mat_per_row) if m)
            elapsed = time.perf_counter() - start
            speed = new_tokens / elapsed if elapsed > 0 else math.inf
            return speed, (new_tokens / steps if steps else 0.0)

        run(candidates[0])  # warm-up
        for index in range(rounds):
            _time_round(candidates, index, run)
        ranked = sorted(candidates, key=lambda c: -statistics.median(c["timings"]))
        finalists = ranked[: min(refine, len(ranked))]
        if len(finalists) > 1:
            for index in range(rounds):
                _time_round(finalists, index, run)
        results = []
        for c in candidates:
            results.append({**c, "tokens_per_second": statistics.median(c["timings"])})
        results.sort(key=lambda r: -r["tokens_per_second"])
        best = results[0]
        self.settings[target_name]["num_draft_tokens"] = best["num_draft_tokens"]
        self.settings[target_name]["draft_length"] = best["draft_length"]
        if best["thresholds"] is not None:
            self.settings[target_name]["thresholds"] = best["thresholds"]
        keys = ("thresholds", "num_draft_tokens", "draft_length", "tokens_per_second", "mat", "fixed_exit")
        winner = {k: best[k] for k in keys}
        return {**winner, "results": results}


# ------------------------------------------------------------------------------------------ helpers
def _check_target_keys(argument: str, value: Any, targets: Mapping[str, Any]) -> None:
    """Raise ValueError when a per-target dict ``value`` has a key that names no target.

    NOTE: a misspelt name would otherwise leave that target on the defaults without a word.
    """
    if not isinstance(value, Mapping):
        return
    unknown = [key for key in value if key not in targets]
    if unknown:
        raise ValueError(
            f"{argument}: {unknown[0]!r} is not a target of this Speculator (its targets are "
            f"{sorted(targets, key=str)}); per-target settings must be keyed by target name"
        )


def _setting_for(name: str, value: Any, default: Any) -> Any:
    """Target ``name``'s setting: ``value[name]`` of a per-target dict (else ``default``), or ``value`` itself
    (``default`` when None)."""
    if isinstance(value, Mapping):
        return value.get(name, default)
    return default if value is None else value


def _batch_prompts(
    prompts: Any, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A [B, L] tensor as is, or a list of token lists / 1-D tensors left-padded with 0 plus its mask."""
    if isinstance(prompts, torch.Tensor):
        return prompts, attention_mask
    rows = [torch.as_tensor(p, dtype=torch.int64).flatten() for p in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids, mask


#: Fixed draft lengths ``calibrate`` also times by default (see its docstring).
SHORT_FIXED_LENGTHS = (1, 2)


def _calibration_candidates(exits, num_draft_grid, threshold_grid, fixed_exits) -> list[dict[str, Any]]:
    """Every (thresholds, draft length) pair ``calibrate`` times, each with an empty ``timings`` list."""
    lengths = list(num_draft_grid) if num_draft_grid is not None else [2, 4, 6, 8]
    if not lengths:
        raise ValueError("num_draft_grid must hold at least one draft length")
    for n in lengths:
        _check_int("num_draft_grid", n, low=1)
    n_exits = len(exits)
    options: list[tuple[tuple[float, ...] | None, int | None]] = []
    if n_exits > 1:
        taus = list(threshold_grid) if threshold_grid is not None else [0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
        for t in taus:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold_grid must hold thresholds in [0, 1], got {t!r}")
        options += [(tuple([float(t)] * (n_exits - 1) + [0.0]), None) for t in taus]
        if fixed_exits:
            # NOTE: threshold 1 turns an early exit off (its head is skipped) and 0 always fires, so
            # exit i alone costs what a draft cut at exit i costs.
            options += [(tuple([1.0] * i + [0.0] * (n_exits - i)), exits[i]) for i in range(n_exits)]
    else:
        options.append((None, exits[0]))
    unique = list(dict.fromkeys(options))
    if not unique:
        raise ValueError("calibrate has no candidate: give threshold_grid values or fixed_exits=True")
    return [
        {"thresholds": tau, "num_draft_tokens": n, "fixed_exit": fixed, "timings": [], "mat": None}
        for tau, fixed in unique
        for n in lengths
    ]


def _split_batches(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int | None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The prompts in batches of ``batch_size`` rows (None: one batch), each without all-padding columns."""
    if batch_size is None:
        return [(input_ids, attention_mask)]
    batch_size = _check_int("batch_size", batch_size, low=1)
    batches = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size]
        mask = None if attention_mask is None else attention_mask[start : start + batch_size]
        if mask is not None:
            # NOTE: left padding: drop the columns no row of this batch uses.
            first = int((mask != 0).any(0).int().argmax())
            ids, mask = ids[:, first:], mask[:, first:]
        batches.append((ids, mask))
    return batches


def _time_round(candidates: list[dict[str, Any]], index: int, run) -> None:
    """One timed run of every candidate; odd rounds go backwards (slow drifts then even out)."""
    order = candidates if index % 2 == 0 else candidates[::-1]
    for candidate in order:
        speed, mat = run(candidate)
        candidate["timings"].append(speed)
        candidate["mat"] = mat
