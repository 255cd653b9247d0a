"""Loads a complete family: tokenizer, targets and the sorted draft (with its draft vocabulary, if any)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from s2d_ext.train.family.build import build_family
from s2d_ext.train.family.cache import check_family
from s2d_ext.train.family.spec import MANIFEST, FamilySpec, family_dir, get_spec


@dataclass
class Family:
    """What :func:`load_family` returns (unpacks as ``tokenizer, targets, draft``)."""

    tokenizer: Any
    targets: dict[str, Any]
    draft: Any  # SortedDraft, or the draft's checkpoint path when SortedDraft is unavailable
    root: Path
    manifest: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.tokenizer, self.targets, self.draft))


def load_family(
    size: str | FamilySpec = "tiny",
    cache_dir: str | os.PathLike | None = None,
    *,
    build: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    draft_as_path: bool = False,
) -> Family:
    """Load the family of ``size`` (building or repairing it first when ``build``).

    Returns a :class:`Family` that unpacks as ``(tokenizer, targets, draft)``: ``targets`` maps names
    (``target-small``, ``target-large``, ...) to eval-mode HF models ordered by size, ``draft`` is an
    :class:`s2d_ext.SortedDraft` (or the checkpoint path with ``draft_as_path`` or if SortedDraft is missing).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = get_spec(size)
    reason = check_family(spec, cache_dir)
    if reason is not None:
        if not build:
            raise FileNotFoundError(
                f"family {spec.size!r} is not built or is damaged at {family_dir(spec, cache_dir)} "
                f"({reason}); "
                f"run `python -m s2d_ext family build --size {spec.size}`"
            )
        build_family(spec, cache_dir, progress=progress)
    root = family_dir(spec, cache_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    targets = {}
    for t in spec.targets:
        model = AutoModelForCausalLM.from_pretrained(root / t.name, dtype=dtype).to(device).eval()
        targets[t.name] = model
    draft_path = root / spec.draft.name
    draft: Any = str(draft_path)
    if not draft_as_path:
        try:
            from s2d_ext.draft.sorted_draft import SortedDraft
        except ImportError:
            SortedDraft = None
        if SortedDraft is not None:
            from s2d_ext.draft.draft_vocab import load_draft_vocab

            model = AutoModelForCausalLM.from_pretrained(draft_path, dtype=dtype).to(device).eval()
            draft = SortedDraft.from_pretrained(model, draft_vocab=load_draft_vocab(draft_path))
    return Family(tokenizer=tokenizer, targets=targets, draft=draft, root=root, manifest=manifest)
