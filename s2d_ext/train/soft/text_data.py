"""Text data for SoFT: a JSONL / text file read into strings, tokenized into fixed-length blocks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def load_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a training file: plain text (the whole file is one document) or JSONL (``.jsonl`` /
    ``.json`` suffix, or a first line that is a JSON object) with one ``{text_field: str}`` object per line.

    Raises FileNotFoundError for a missing file and ValueError for an empty one or a malformed JSONL line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} is not a regular file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    first = raw.lstrip().split("\n", 1)[0].strip()
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if not is_jsonl and first.startswith("{"):
        try:
            is_jsonl = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_jsonl = False
    if not is_jsonl:
        return [raw]
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {str(path)!r} line {lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"data file {str(path)!r} line {lineno}: no string field {text_field!r}")
        if obj[text_field]:
            texts.append(obj[text_field])
    if not texts:
        raise ValueError(f"data file {str(path)!r} holds no non-empty {text_field!r} texts")
    return texts


def tokenize_blocks(
    texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize documents, join them with the EOS token and cut the stream into blocks.

    Returns [n_blocks, seq_len] int64 (the trailing remainder is dropped; a stream shorter than one block
    gives a single shorter block). ``max_tokens`` caps the stream length.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    if len(stream) < 2:
        raise ValueError("the data holds fewer than 2 tokens: nothing to train on")
    ids = torch.tensor(stream, dtype=torch.long)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        return ids.unsqueeze(0)
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)
