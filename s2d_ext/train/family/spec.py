"""The family's specification: its targets, the draft, the sizes and the cache folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
MARKER = "s2d_family.json"
FORMAT_VERSION = 2  # NOTE: bump when the build procedure changes (part of the fingerprint)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TargetSpec:
    """One target of the family: a LlamaForCausalLM trained from scratch for ``steps`` optimizer steps."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    steps: int
    lr: float
    tie_embeddings: bool = True
    # NOTE: a "nested" target grows from a smaller one of the same width: it starts as a copy of it plus
    # extra layers whose output projections are zero (so it first computes exactly the same function),
    # then trains on. Cheap on 2 CPU cores, and the family's members share their lower layers.
    grow_from: str | None = None


@dataclass(frozen=True)
class DraftSpec:
    """The sorted draft: the first ``num_layers`` layers of target ``source``, SoFT-tuned over ``exits``."""

    source: str
    num_layers: int
    exits: tuple[int, ...]
    thresholds: tuple[float, ...]
    steps: int
    lr: float
    distill: tuple[tuple[str, float], ...] = ()  # (target name, weight) pairs
    ce_weight: float = 1.0
    name: str = "draft"


@dataclass(frozen=True)
class FamilySpec:
    """Everything that determines a family (its fingerprint decides whether a cache is reusable)."""

    size: str
    vocab_size: int
    seq_len: int
    batch_size: int
    targets: tuple[TargetSpec, ...]
    draft: DraftSpec
    corpus_chars: int  # training text read from the stdlib (after the held-out split)
    tokenizer_chars: int  # text the BPE tokenizer is trained on
    heldout_tokens: int
    heldout_every: int = 20
    max_file_chars: int = 12_000  # NOTE: cap per file, so that a small corpus still spans many files
    warmup_steps: int = 20
    seed: int = 0
    max_position_embeddings: int = 1024
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when available); only the CPU is bit-deterministic

    def fingerprint(self) -> str:
        payload = dataclasses.asdict(self)
        payload.pop("device")
        payload["format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# NOTE: sizes are chosen for 2 CPU cores. Both sizes are nested families of one width (the deeper targets
# grown from the shallower) so that little compute gives targets that one draft can follow. tiny: ~3 minutes
# in all; its 16-layer target costs clearly more than the 2-layer draft even on a CPU, where per-layer
# overhead dominates at this size. bench: <= 30 minutes on the CPU (a minute or two on a GPU) with a 41.7M
# parameter target so that target forwards dominate a speculative step. Drafts are cut from the smallest
# target and are much cheaper than the largest one (2 of 16 layers in tiny, 3 of 20 in bench).
FAMILY_SIZES: dict[str, FamilySpec] = {
    "tiny": FamilySpec(
        size="tiny",
        vocab_size=1024,
        # NOTE: short blocks learn much faster per token and per second at this budget (held-out 4.7 vs 5.4
        # nats after 300k tokens with 128); the demo keeps prompt + new tokens near this length.
        seq_len=64,
        batch_size=16,
        targets=(
            TargetSpec("target-small", 128, 4, 384, 4, 4, steps=300, lr=3e-3, tie_embeddings=False),
            TargetSpec(
                "target-medium",
                128,
                8,
                384,
                4,
                4,
                steps=100,
                lr=2e-3,
                tie_embeddings=False,
                grow_from="target-small",
            ),
            TargetSpec(
                "target-large",
                128,
                16,
                384,
                4,
                4,
                steps=60,
                lr=1.5e-3,
                tie_embeddings=False,
                grow_from="target-medium",
            ),
        ),
        draft=DraftSpec(
            source="target-small",
            num_layers=2,
            exits=(1, 2),
            thresholds=(0.6, 0.0),
            steps=160,
            lr=3e-3,
            distill=(("target-small", 0.3), ("target-medium", 0.3), ("target-large", 0.4)),
            ce_weight=0.3,
        ),
        corpus_chars=1_200_000,
        tokenizer_chars=1_000_000,
        heldout_tokens=16_384,
        warmup_steps=20,
    ),
    "bench": FamilySpec(
        size="bench",
        vocab_size=8192,
        seq_len=128,
        batch_size=16,
        targets=(
            TargetSpec("target-small", 384, 4, 1024, 6, 6, steps=100, lr=3e-3, tie_embeddings=False),
            TargetSpec(
                "target-medium",
                384,
                10,
                1024,
                6,
                6,
                steps=25,
                lr=1.5e-3,
                tie_embeddings=False,
                grow_from="target-small",
            ),
            TargetSpec(
                "target-large",
                384,
                20,
                1024,
                6,
                6,
                steps=15,
                lr=1e-3,
                tie_embeddings=False,
                grow_from="target-medium",
            ),
        ),
        draft=DraftSpec(
            source="target-small",
            num_layers=3,
            exits=(1, 2, 3),
            thresholds=(0.7, 0.6, 0.0),
            steps=30,
            lr=2e-3,
            distill=(("target-small", 0.3), ("target-medium", 0.3), ("target-large", 0.4)),
        ),
        corpus_chars=2_000_000,
        tokenizer_chars=2_000_000,
        heldout_tokens=16_384,
        warmup_steps=10,
        device="auto",
    ),
}


def get_spec(size: str | FamilySpec) -> FamilySpec:
    """The :class:`FamilySpec` of a named size (``tiny`` or ``bench``), or ``size`` itself."""
    if isinstance(size, FamilySpec):
        return size
    if size not in FAMILY_SIZES:
        raise ValueError(f"size must be one of {sorted(FAMILY_SIZES)}, got {size!r}")
    return FAMILY_SIZES[size]


def family_dir(size: str | FamilySpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $S2D_FAMILY_DIR or ~/.cache/s2d_ext/family>/<size>``."""
    root = cache_dir or os.environ.get("S2D_FAMILY_DIR") or Path.home() / ".cache" / "s2d_ext" / "family"
    return Path(root).expanduser() / get_spec(size).size
