"""GPU check (not yet run: no GPU was lent when it was written): the draft's per-exit-group step in CUDA
graphs (``SortedDraft(compile=True, compile_mode="reduce-overhead")``) under continuous batching, with
the engine's static draft shapes (``draft_batch_multiple``, ``draft_capacity``).

A random Llama target (``--hidden``, ``--layers``, bf16) and a 2-exit sorted draft cut from it; requests
join every few steps. Runs the same schedule with the eager draft and the graphed one, checks the greedy
tokens are equal, and reports ms per step and how many graphs torch.compile built (a few per window
length, not one per batch composition). Writes ``bench/results/engine_cuda_graph.{json,md}``.

    python bench/engine_cuda_graph.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from s2d_ext import SortedDraft
from s2d_ext.engine import Engine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def run(draft, target, prompts, args) -> tuple[dict, float, int]:
    engine = Engine(draft, target, draft_batch_multiple=8, draft_capacity=args.capacity)
    tokens: dict[str, list[int]] = {}
    steps, start = 0, None
    for i in range(4):  # NOTE: warm-up requests: compile / capture before timing
        engine.add_request(prompts[i % len(prompts)], SamplingParams(max_new_tokens=16, eos_token_id=[]))
    while engine.has_unfinished():
        engine.step()
    pending = list(range(len(prompts)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:
            i = pending.pop(0)
            engine.add_request(
                prompts[i],
                SamplingParams(max_new_tokens=args.max_new_tokens, eos_token_id=[]),
                request_id=str(i),
            )
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    torch.cuda.synchronize()
    return tokens, (time.perf_counter() - start) / steps * 1e3, steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    target = LlamaForCausalLM(config).to(args.device, torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, 32000, (int(n),), generator=gen).tolist()
        for n in torch.randint(8, 64, (args.requests,), generator=gen)
    ]
    eager = SortedDraft.truncate(target, 4, exits=(2, 4), thresholds=(0.5, 0.0))
    graphed = SortedDraft.truncate(
        target, 4, exits=(2, 4), thresholds=(0.5, 0.0), compile=True, compile_mode="reduce-overhead"
    )
    with torch.inference_mode():
        want, eager_ms, steps = run(eager, target, prompts, args)
        from torch._dynamo.utils import counters

        counters.clear()
        got, graph_ms, _ = run(graphed, target, prompts, args)
        frames = int(counters["stats"]["unique_graphs"])
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "target": f"random Llama hidden {args.hidden}, {args.layers} layers, bf16",
        "steps": steps,
        "eager_ms_per_step": eager_ms,
        "graphed_ms_per_step": graph_ms,
        "compiled_graphs": frames,
        "same_tokens": got == want,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_cuda_graph.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
