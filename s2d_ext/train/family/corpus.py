"""The family's corpus (the running interpreter's standard library) and its byte-level BPE tokenizer."""

from __future__ import annotations

import hashlib
import os
import platform
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from s2d_ext.train.family.spec import EOS_TOKEN, PAD_TOKEN, FamilySpec

# NOTE: test suites are skipped too: they are half of the stdlib and mostly ``self.assertEqual(...)``, which
# small models then repeat forever.
_SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # NOTE: prune in place: site-packages (not the stdlib, and large) is never walked.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                files.append((Path(dirpath) / name).relative_to(root))
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def _read_until(paths: Sequence[Path], max_chars: int, per_file: int) -> tuple[list[str], int]:
    """Texts of ``paths`` in order (undecodable or blank files skipped; each cut to its first ``per_file``
    characters at a line end) until ``max_chars`` is reached."""
    texts, chars = [], 0
    for path in paths:
        if chars >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > per_file:
            text = text[: text.rfind("\n", 0, per_file) + 1] or text[:per_file]
        if text.strip():
            texts.append(text)
            chars += len(text)
    return texts, chars


def stdlib_corpus(spec: FamilySpec) -> tuple[list[str], list[str], dict]:
    """(train documents, held-out documents, stats) from the interpreter's standard library.

    Deterministic given ``spec.seed``: sorted files, every ``heldout_every``-th held out (read in order), the
    rest shuffled with the seed; each file cut to ``spec.max_file_chars``; files are read until
    ``spec.corpus_chars`` (train) and ``16 * spec.heldout_tokens`` (held out) characters.
    """
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"no *.py files found under {sysconfig.get_paths()['stdlib']!r}")
    heldout_files = files[:: spec.heldout_every]
    train_files = [p for i, p in enumerate(files) if i % spec.heldout_every]
    random.Random(spec.seed).shuffle(train_files)
    kept, chars = _read_until(train_files, spec.corpus_chars, spec.max_file_chars)
    heldout, heldout_chars = _read_until(heldout_files, 16 * spec.heldout_tokens, spec.max_file_chars)
    digest = hashlib.sha256("\0".join(kept).encode()).hexdigest()[:16]
    stats = {
        "stdlib": sysconfig.get_paths()["stdlib"],
        "python": platform.python_version(),
        "files_total": len(files),
        "train_files": len(kept),
        "train_chars": chars,
        "heldout_files": len(heldout),
        "heldout_chars": heldout_chars,
        "sha256_16": digest,
    }
    return kept, heldout, stats


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_chars: int):
    """A byte-level BPE tokenizer (``tokenizers``) wrapped as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample, chars = [], 0
    for text in texts:
        if chars >= max_chars:
            break
        sample.append(text)
        chars += len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        padding_side="left",
    )
    return wrapped
