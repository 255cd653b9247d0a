"""Data files that ship inside the package, by path: the bench runs on them, training keeps clear of them."""

from __future__ import annotations

from pathlib import Path

#: The Spec-Bench questions (``s2d_ext/bench/data/``, see its README): the bench's prompts, and text no
#: training prompt may equal (:func:`s2d_ext.train.self_data.prompts.evaluation_prompts`).
SPEC_BENCH_QUESTIONS = Path(__file__).resolve().parent / "bench" / "data" / "spec_bench_question.jsonl"
