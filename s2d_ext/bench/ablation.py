"""Threshold x draft-length grid per target, like the paper's tau grid (greedy, batch 1).

Every early exit gets the same threshold tau; the last exit always fires. Draft length is fixed at k.
Speedup is over plain ``generate`` on the same prompts, measured in the same call.
"""

from __future__ import annotations

from s2d_ext.bench.spec_bench import (
    encode_prompt,
    left_pad,
    load_models,
    load_questions,
    run_generate,
    run_speculate,
)

THRESHOLDS = (0.05, 0.1, 0.2, 0.5, 0.9)
DRAFT_LENGTHS = (3, 6)
ABLATION_PROMPTS = 4


def run_ablation(
    args, thresholds=THRESHOLDS, draft_lengths=DRAFT_LENGTHS, num_prompts=ABLATION_PROMPTS
) -> list:
    from tqdm.auto import tqdm

    tokenizer, targets, draft, _ = load_models(args)
    questions = load_questions(args.data, 1)[:num_prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prompts = [encode_prompt(tokenizer, q["turns"][0], args.max_prompt_tokens) for q in questions]
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0,
        seed=args.seed,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id,
        ignore_eos=args.ignore_eos,
    )
    rows = []
    for target_name, target in targets.items():
        baseline_tokens = baseline_seconds = 0.0
        for ids in prompts:
            input_ids, mask = left_pad([ids], pad_id)
            result = run_generate(target, input_ids, mask, settings)
            baseline_tokens += result.new_tokens
            baseline_seconds += result.seconds
        baseline = baseline_tokens / baseline_seconds
        grid = [(t, k) for t in thresholds for k in draft_lengths]
        for tau, k in tqdm(grid, desc=f"ablation {target_name}", leave=False):
            taus = (tau,) * (len(draft.exits) - 1) + (0.0,)
            tokens = seconds = steps = 0
            for ids in prompts:
                input_ids, mask = left_pad([ids], pad_id)
                result = run_speculate(
                    target,
                    draft,
                    input_ids,
                    mask,
                    settings,
                    thresholds=taus,
                    num_draft_tokens=k,
                    draft_length="fixed",
                )
                tokens += result.new_tokens
                seconds += result.seconds
                steps += result.steps
            rows.append(
                dict(
                    target=target_name,
                    threshold=tau,
                    num_draft_tokens=k,
                    mat=tokens / steps if steps else None,
                    speedup=(tokens / seconds) / baseline if seconds else None,
                )
            )
    return rows
