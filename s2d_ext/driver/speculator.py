"""``Speculator``: one draft serving several targets, with per-target settings and calibration.

The draft proposes for the whole batch in one pass (each row with its own target's exit thresholds and
draft length); each target verifies only its own rows (:class:`s2d_ext.engine.Engine` with one
:class:`~s2d_ext.engine.TargetConfig` per target). ``calibrate`` measures tokens/s over a small grid
of thresholds and draft lengths and keeps the best for that target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from s2d_ext.driver.batch import SpeculateOutput, generate_batch
from s2d_ext.engine.models import TargetConfig, as_draft, check_target


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
        self.settings: dict[str, dict[str, Any]] = {}
        for name in self.targets:
            self.settings[name] = {
                "thresholds": _pick(thresholds, name, None, "thresholds"),
                "num_draft_tokens": _pick(num_draft_tokens, name, 5, "num_draft_tokens"),
                "draft_length": _pick(draft_length, name, "heuristic", "draft_length"),
                "stop_threshold": _pick(stop_threshold, name, None, "stop_threshold"),
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
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
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

        Other arguments as in :func:`s2d_ext.speculate`; ``num_draft_tokens``, ``draft_length`` and
        ``thresholds`` override the per-target settings for this call.

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
        return generate_batch(
            self.draft,
            configs,
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
            extra=sampling,
        )

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
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """Pick the exit thresholds and draft length with the best measured tokens/s on ``prompts``.

        The grid is small on purpose: draft lengths ``num_draft_grid`` (default 2, 4, 6, 8) times, for a
        draft with early exits, one shared threshold for every early exit from ``threshold_grid``
        (default 0.4, 0.6, 0.8, 0.95). Each setting runs ``prompts`` once (after one warm-up run).
        The winner is kept in ``self.settings[target_name]``.

        Returns
        -------
        dict
            ``{"thresholds", "num_draft_tokens", "tokens_per_second", "mat", "results": [...]}``.
        """
        if target_name not in self.targets:
            raise ValueError(
                f"target {target_name!r} is not held by this Speculator (it has {sorted(self.targets)})"
            )
        input_ids, attention_mask = _batch_prompts(prompts, attention_mask)
        n_exits = len(self.draft.exits)
        drafts = list(num_draft_grid) if num_draft_grid is not None else [2, 4, 6, 8]
        if n_exits > 1:
            taus = list(threshold_grid) if threshold_grid is not None else [0.4, 0.6, 0.8, 0.95]
            threshold_options = [tuple([t] * (n_exits - 1) + [0.0]) for t in taus]
        else:
            threshold_options = [None]
        kwargs = {"max_new_tokens": max_new_tokens, **generate_kwargs}
        run = lambda **o: self.generate(input_ids, attention_mask, target=target_name, **kwargs, **o)  # noqa: E731
        run(num_draft_tokens=drafts[0], thresholds=threshold_options[0])  # warm-up
        results = []
        for tau in threshold_options:
            for n in drafts:
                start = time.perf_counter()
                out = run(num_draft_tokens=n, thresholds=tau)
                elapsed = time.perf_counter() - start
                speed = sum(out.stats.new_tokens) / elapsed if elapsed > 0 else math.inf
                results.append(
                    {
                        "thresholds": tau,
                        "num_draft_tokens": n,
                        "tokens_per_second": speed,
                        "mat": out.stats.mat,
                    }
                )
        best = max(results, key=lambda r: r["tokens_per_second"])
        self.settings[target_name]["num_draft_tokens"] = best["num_draft_tokens"]
        if best["thresholds"] is not None:
            self.settings[target_name]["thresholds"] = best["thresholds"]
        return {**best, "results": results}


# ------------------------------------------------------------------------------------------ helpers
def _pick(value: Any, name: str, default: Any, argument: str) -> Any:
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
