"""Cache helpers: checksums, atomic writes, a progress bar, and one seeded generator per shard."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> str:
    """``write(tmp)`` then rename ``tmp`` to ``path``; returns the file's SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


class Progress:
    """``progress.json``: the fingerprint and the SHA-256 of every finished file, rewritten atomically after
    each one (NOTE: a file that is not listed, or whose digest differs, is rebuilt on resume)."""

    def __init__(self, root: Path, fingerprint: str):
        self.path = root / "progress.json"
        self.fingerprint = fingerprint
        self.files: dict[str, str] = {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            self.files = dict(saved.get("files", {}))

    def valid(self, name: str) -> bool:
        path = self.path.parent / name
        return name in self.files and path.is_file() and sha256_file(path) == self.files[name]

    def record(self, name: str, digest: str) -> None:
        self.files[name] = digest
        payload = json.dumps({"fingerprint": self.fingerprint, "files": self.files}, indent=1)
        atomic_write(self.path, lambda tmp: tmp.write_text(payload))


def shard_generator(seed: int, stage: str, index: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{stage}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
