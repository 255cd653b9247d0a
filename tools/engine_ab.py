"""Compare the engine of a git revision with the working tree's, in one process: time per step, and the lines
one steady-state sampled step traverses.

    python tools/engine_ab.py                      # base = HEAD
    python tools/engine_ab.py --base 97f88fe --rounds 20

The base revision's s2d_ext/ is exported as a package of its own (``s2d_base``) and loads the working tree's
compiled kernel libraries (so csrc/ must be the same in both). Both engines run the same random tiny Llama
target (4 layers, d=64, V=512) with a sorted draft cut from its first 2 layers (exits 1, 2), 1 torch thread:
``--batch`` requests (EOS off) of 48 new tokens greedy and 192 at T=1, timed from the second step (admission
out) to the last, rounds alternating which engine goes first. Same tokens are checked.

Lines traversed: over one steady-state step of 2 sampled requests (T=0.8), the distinct lines of the package
that execute (sys.settrace line events), and the total length (def to last line) of the functions entered.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export_base(revision: str, folder: Path) -> None:
    """``revision``'s s2d_ext/ as the package ``s2d_base`` in ``folder``."""
    archive = subprocess.run(
        ["git", "archive", revision, "s2d_ext"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "s2d_ext").rename(folder / "s2d_base")
    for path in (folder / "s2d_base").rglob("*.py"):
        text = path.read_text().replace("s2d_ext", "s2d_base")
        # NOTE: the working tree's ops modules register the fake kernels of torch.ops.s2d.* already.
        text = text.replace("\nif _native.has_native(", "\nif False and _native.has_native(")
        path.write_text(text)


def models(torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def run(package, target, draft, temperature: float, batch: int) -> tuple[float, int, list[int]]:
    engine = package.Engine(draft, target)
    for i in range(batch):
        # NOTE: sampled rows accept most drafts of this random pair: more tokens give them as many steps.
        new = 48 if temperature == 0 else 192
        params = package.SamplingParams(max_new_tokens=new, temperature=temperature, seed=i, eos_token_id=[])
        engine.add_request([1, 17 + i, 42, 99, 7, 3 + i], params)
    engine.step()
    steps, tokens = 0, []
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
        steps += 1
    return (time.perf_counter() - start) / steps, steps, tokens


def traversed(package, target, draft) -> tuple[int, int, int]:
    """(distinct executed lines, functions entered, their total length) of one steady-state sampled step."""
    folder = os.path.dirname(package.__file__)
    engine = package.Engine(draft, target)
    for i in range(2):
        engine.add_request(
            [1, 17 + i, 42, 99, 7], package.SamplingParams(max_new_tokens=200, temperature=0.8, seed=i)
        )
    for _ in range(4):
        engine.step()
    lines, codes = set(), set()

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(folder):
            return None
        if event == "call":
            codes.add(frame.f_code)
        elif event == "line":
            lines.add((frame.f_code.co_filename, frame.f_lineno))
        return tracer

    sys.settrace(tracer)
    engine.step()
    sys.settrace(None)
    functions = [c for c in codes if not c.co_name.startswith("<")]
    length = sum(
        max(n for _, _, n in c.co_lines() if n is not None) - c.co_firstlineno + 1 for c in functions
    )
    return len(lines), len(functions), length


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD", help="git revision of the base engine")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (0: skip)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_base(args.base, Path(tmp))
        os.environ["S2D_NATIVE_DIR"] = str(ROOT / "s2d_ext")
        sys.path[:0] = [str(ROOT), tmp]
        import torch

        torch.set_num_threads(1)
        import s2d_base

        import s2d_ext

        target = models(torch)
        packages = {"base": s2d_base, "tree": s2d_ext}
        drafts = {name: p.SortedDraft.truncate(target, 2, exits=(1, 2)) for name, p in packages.items()}
        with torch.inference_mode():
            for name, package in packages.items():
                executed, entered, length = traversed(package, target, drafts[name])
                print(f"{name}: a sampled step executes {executed} lines", end=", ")
                print(f"enters {entered} functions ({length} lines)")
            times = {(name, t): [] for name in packages for t in (0.0, 1.0)}
            outputs = {}
            for name, package in packages.items():
                for t in (0.0, 1.0):
                    outputs[(name, t)] = run(package, target, drafts[name], t, args.batch)[1:]  # warm-up
            for r in range(args.rounds):
                for name in list(packages) if r % 2 == 0 else list(packages)[::-1]:
                    for t in (0.0, 1.0):
                        seconds, *_ = run(packages[name], target, drafts[name], t, args.batch)
                        times[(name, t)].append(seconds)
        same = True
        for t in (0.0, 1.0) if args.rounds else ():
            base, tree = times[("base", t)], times[("tree", t)]
            ratios = [b / a for a, b in zip(base, tree)]
            equal = outputs[("base", t)] == outputs[("tree", t)]
            same &= equal
            medians = [
                1e3 * statistics.median(base),
                1e3 * statistics.median(tree),
                statistics.median(ratios),
            ]
            print(f"T={t:g}: base {medians[0]:.3f} ms/step, tree {medians[1]:.3f} ms/step", end=", ")
            print(
                f"tree/base median {medians[2]:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})", end=", "
            )
            print(f"{outputs[('tree', t)][0]} steps, same tokens: {equal}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
