"""Training prompts with no download: Magpie user turns from the chat template's user header, questions
from the standard library's docstrings, and the evaluation prompts they must never equal."""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from pathlib import Path

from s2d_ext._data import SPEC_BENCH_QUESTIONS

#: question templates over a docstring entry: {module}, {name} (qualified) and {doc} (first paragraph)
DOCSTRING_TEMPLATES = (
    "What does `{name}` from Python's `{module}` module do?",
    "Explain in plain words what this Python documentation says: {doc}",
    "Write a short Python example that uses `{module}.{name}` and explain it.",
    "When would I use `{module}.{name}` in Python? Its documentation says: {doc}",
    "Summarize the following documentation of `{module}.{name}`: {doc}",
)


def normalize_prompt(text: str) -> str:
    """Whitespace collapsed, case folded: two prompts that differ only so count as equal."""
    return " ".join(text.split()).casefold()


def evaluation_prompts(path: str | os.PathLike | None = None) -> set[str]:
    """Every turn of every Spec-Bench question (normalised): text no training prompt may equal."""
    if path is None:
        path = SPEC_BENCH_QUESTIONS
    out = set()
    for line in Path(path).read_text().splitlines():
        if line.strip():
            for turn in json.loads(line)["turns"]:
                out.add(normalize_prompt(turn))
    return out


def _first_paragraph(doc: str, max_chars: int = 400) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    para = " ".join(para.split())
    return para[:max_chars].rsplit(" ", 1)[0] if len(para) > max_chars else para


def docstring_entries() -> list[tuple[str, str, str]]:
    """(module, qualified name, first docstring paragraph) of public functions and classes of the stdlib,
    in a fixed order (sorted files, source order). Files are parsed, never imported."""
    from s2d_ext.train.family.corpus import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    entries = []
    for path in stdlib_files():
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if any(p.startswith("_") for p in parts):
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc:
                para = _first_paragraph(doc)
                if len(para) >= 30:
                    entries.append((module, node.name, para))
    return entries


def docstring_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` questions from stdlib docstrings: entries drawn without replacement with ``seed`` (repeating
    only when the stdlib has fewer), each through a template drawn with the same generator."""
    entries = docstring_entries()
    if not entries or n <= 0:
        return []
    rng = random.Random(seed)
    order = []
    while len(order) < n:
        batch = list(range(len(entries)))
        rng.shuffle(batch)
        order += batch
    out = []
    for index in order[:n]:
        module, name, doc = entries[index]
        template = DOCSTRING_TEMPLATES[rng.randrange(len(DOCSTRING_TEMPLATES))]
        out.append(template.format(module=module, name=name, doc=doc))
    return out


def user_header(tokenizer) -> list[int]:
    """The chat template's token ids up to where a user message's text starts (Magpie's "pre-query").

    NOTE: rendered from the template itself (a user message holding a marker, cut at the marker), so the
    system prompt a template inserts by default is part of it, exactly as at evaluation time.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template: Magpie prompts need one")
    marker = "\u2063S2D-USER-TURN\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise ValueError("the chat template does not show the user message verbatim; cannot find its header")
    return list(tokenizer(text.split(marker, 1)[0], add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A user turn through the chat template with the generation prompt (as the bench encodes prompts)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def answer_stop_ids(tokenizer, model) -> list[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the target has no EOS token: answers would never end")
    return sorted(ids)
