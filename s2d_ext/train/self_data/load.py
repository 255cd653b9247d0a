"""Loading a built self-written data set (:class:`SelfData`) and checking that it is complete and intact."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from s2d_ext.train.self_data.cache import sha256_file
from s2d_ext.train.self_data.spec import MANIFEST, PROMPTS_FILE, self_data_dir


@dataclass
class SelfData:
    """A loaded self-written data set (every shard concatenated).

    Sequence ``i`` is ``tokens[seq_offsets[i]:seq_offsets[i+1]]``: chat-template prompt, then the answer from
    ``answer_start[i]`` on. Answer token ``j`` (over all sequences, in order) was predicted by the target
    distribution whose top-k is ``topk_ids[j]`` / ``topk_logprobs[j]``; ``answer_offsets[i]`` is sequence
    ``i``'s first row there.
    """

    root: Path
    tokens: torch.Tensor  # [T] int64
    seq_offsets: torch.Tensor  # [n + 1] int64
    answer_start: torch.Tensor  # [n] int64, within the sequence
    answer_offsets: torch.Tensor  # [n + 1] int64, rows of topk_*
    topk_ids: torch.Tensor  # [A, K] int64
    topk_logprobs: torch.Tensor  # [A, K] float32
    temperature: torch.Tensor  # [n] float32
    finished: torch.Tensor  # [n] bool
    prompts: list[dict]
    manifest: dict

    @property
    def num_sequences(self) -> int:
        return int(self.answer_start.shape[0])

    @property
    def num_answer_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def sequence(self, i: int) -> torch.Tensor:
        return self.tokens[self.seq_offsets[i] : self.seq_offsets[i + 1]]

    def answer_tokens(self, indices: Sequence[int]) -> torch.Tensor:
        """[sum of answer lengths] int64: the answer tokens of sequences ``indices``, in order (what a draft
        trained on them predicts; e.g. counted for a draft vocabulary)."""
        parts = [self.sequence(int(i))[int(self.answer_start[int(i)]) :] for i in indices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def training_prompts(self) -> list[str]:
        return [p["text"] for p in self.prompts]


def check_self_data(name: str, cache_dir=None, *, fingerprint: str | None = None) -> str | None:
    """None when the data set ``name`` is complete and intact (and of ``fingerprint`` if given), else why
    it is not."""
    root = self_data_dir(name, cache_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{MANIFEST}: missing or unreadable"
    if not manifest.get("complete"):
        return f"{MANIFEST}: incomplete"
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        return f"{MANIFEST}: built from another spec or target"
    for file, digest in manifest.get("files", {}).items():
        path = root / file
        if not path.is_file():
            return f"{file}: missing"
        if sha256_file(path) != digest:
            return f"{file}: checksum mismatch"
    return None


def load_self_data(
    root: str | os.PathLike, *, verify: bool = True, shards: Sequence[str] | None = None
) -> SelfData:
    """Load a built data set folder (checksums verified unless ``verify=False``).

    ``shards``: load only these answer shards (file names, in order) of a data set still being built, whose
    digests the caller checked; ``prompts`` then holds the rows of those shards only.
    """
    from safetensors.torch import load_file

    root = Path(root)
    manifest: dict[str, Any] = {}
    if verify and shards is None:
        reason = check_self_data(root.name, root.parent)
        if reason is not None:
            raise FileNotFoundError(f"self data at {str(root)!r} is not complete or is damaged ({reason})")
        manifest = json.loads((root / MANIFEST).read_text())
    prompts = [json.loads(line) for line in (root / PROMPTS_FILE).read_text().splitlines() if line.strip()]
    shards = (
        sorted(root.glob("answers_*.safetensors")) if shards is None else [root / name for name in shards]
    )
    if not shards:
        raise FileNotFoundError(f"self data at {str(root)!r} holds no answer shards")
    parts = [load_file(str(p)) for p in shards]
    tokens, seq_offsets, answer_offsets = (
        [],
        [torch.zeros(1, dtype=torch.int64)],
        [torch.zeros(1, dtype=torch.int64)],
    )
    base_tok = base_ans = 0
    for part in parts:
        offs = part["seq_offsets"]
        starts = part["answer_start"]
        tokens.append(part["tokens"].long())
        seq_offsets.append(offs[1:] + base_tok)
        answer_len = (offs[1:] - offs[:-1]) - starts
        answer_offsets.append(answer_len.cumsum(0) + base_ans)
        base_tok += int(offs[-1])
        base_ans += int(answer_len.sum())
    return SelfData(
        root=root,
        tokens=torch.cat(tokens),
        seq_offsets=torch.cat(seq_offsets),
        answer_start=torch.cat([p["answer_start"] for p in parts]),
        answer_offsets=torch.cat(answer_offsets),
        topk_ids=torch.cat([p["topk_ids"] for p in parts]).long(),
        topk_logprobs=torch.cat([p["topk_logprobs"] for p in parts]).float(),
        temperature=torch.cat([p["temperature"] for p in parts]),
        finished=torch.cat([p["finished"] for p in parts]).bool(),
        prompts=prompts[: sum(int(p["answer_start"].shape[0]) for p in parts)],
        manifest=manifest,
    )
