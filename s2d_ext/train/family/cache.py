"""Cache bookkeeping: folder markers with SHA-256 checksums, atomic saves and the completeness check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from s2d_ext.train.family.spec import MANIFEST, MARKER, FamilySpec, family_dir, get_spec


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_marker(folder: Path, fingerprint: str, info: dict) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"fingerprint": fingerprint, "files": files, **info}, indent=2))


def check_folder(folder: Path, fingerprint: str) -> str | None:
    """None when ``folder`` is complete and intact, else the reason it is not."""
    if not folder.is_dir():
        return f"{folder.name}: missing"
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{folder.name}: no valid {MARKER}"
    if marker.get("fingerprint") != fingerprint:
        return f"{folder.name}: built from another spec"
    for name, digest in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{folder.name}/{name}: missing"
        if _sha256(path) != digest:
            return f"{folder.name}/{name}: checksum mismatch"
    return None


def marker_info(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def check_family(size: str | FamilySpec, cache_dir=None) -> str | None:
    """None when the cached family of ``size`` is complete and intact, else why it is not."""
    spec = get_spec(size)
    root = family_dir(spec, cache_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{MANIFEST}: missing or unreadable"
    if not manifest.get("complete") or manifest.get("fingerprint") != spec.fingerprint():
        return f"{MANIFEST}: incomplete or from another spec"
    for name in ["tokenizer", *(t.name for t in spec.targets), spec.draft.name]:
        reason = check_folder(root / name, spec.fingerprint())
        if reason:
            return reason
    return None


def atomic_save(root: Path, name: str, fingerprint: str, info: dict, save_fn) -> Path:
    """Call ``save_fn(tmp_folder)``, write the marker, then rename the folder to ``root/name``."""
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    write_marker(tmp, fingerprint, info)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
