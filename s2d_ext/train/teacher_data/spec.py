"""What a teacher-forced data set is built from (:class:`TeacherDataSpec`) and its cache folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1  # NOTE: bump when the build procedure changes (part of the fingerprint)


@dataclass(frozen=True)
class TeacherDataSpec:
    """Everything that decides a teacher-forced data set (with the teachers' weights: its fingerprint).

    The text is the running interpreter's standard library source (no download, no evaluation prompt), cut
    into ``seq_len``-token windows, at most ``windows_per_file`` per file, files in a seeded order, until
    ``max_tokens`` tokens. Every teacher scores every window in one forward (teacher forcing); each position's
    top-``top_k`` next-token log-probabilities (temperature 1) are recorded per teacher.
    """

    name: str = "stdlib"
    max_tokens: int = 40960
    seq_len: int = 256
    windows_per_file: int = 2
    top_k: int = 32
    shard_size: int = 8  # windows per shard (the unit of resumption)
    batch_size: int = 4  # windows per teacher forward
    seed: int = 0

    @property
    def num_windows(self) -> int:
        return -(-self.max_tokens // self.seq_len)

    def fingerprint(self, teacher_fingerprints: dict[str, str]) -> str:
        payload = dataclasses.asdict(self)
        payload["format"] = FORMAT_VERSION
        payload["teachers"] = teacher_fingerprints
        payload["torch"] = torch.__version__.split("+")[0]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def teacher_data_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $S2D_TEACHER_DATA_DIR or ~/.cache/s2d_ext/teacher_data>/<name>``."""
    root = (
        cache_dir
        or os.environ.get("S2D_TEACHER_DATA_DIR")
        or Path.home() / ".cache" / "s2d_ext" / "teacher_data"
    )
    return Path(root).expanduser() / name
