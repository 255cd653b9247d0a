"""A local nested model family for demos and benchmarks, built with no downloads.

Corpus: the ``*.py`` source files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, sorted; ``site-packages``, test suites, ``encodings``,
build-configuration files and files that are not UTF-8 are skipped). Every ``heldout_every``-th file (in
sorted order) is held out for the held-out loss; the rest is shuffled with the seed. NOTE: the corpus
therefore depends on the Python version; a family is deterministic given the seed *and* the interpreter (and
the torch thread count on the CPU).

Built in order, each saved as an ordinary HF checkpoint (safetensors) with the tokenizer beside it:

1. a byte-level BPE tokenizer trained with ``tokenizers`` (saved as a transformers fast tokenizer);
2. targets of several sizes (``LlamaForCausalLM``), trained with the plain LM loss (SoFT with one exit),
   either from scratch or *grown* from a smaller target of the same width (``TargetSpec.grow_from``: copied,
   extra layers appended with zeroed output projections, trained on), which makes the family nested;
3. one sorted draft made as S2D makes it: the first layers of the *smallest* target (the paper cuts the first
   12 of Vicuna-7B's 32 layers), fine-tuned with SoFT over its exits, plus a distillation term toward the
   targets' distributions (see :mod:`s2d_ext.soft`) so that one draft agrees with every target.

Layout: ``<cache>/<size>/{tokenizer,<model name>...,manifest.json}`` where ``<cache>`` is ``--cache-dir``,
else ``$S2D_FAMILY_DIR``, else ``~/.cache/s2d_ext/family``. Each folder is written under a temporary name and
renamed into place (atomic) with a ``s2d_family.json`` marker holding its files' SHA-256; ``manifest.json``
(parameter counts, training tokens, held-out losses, timings, ``"complete": true``) is written last. A cache
whose manifest, markers or checksums do not verify is rebuilt (only the broken parts and what depends on
them), never half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
MARKER = "s2d_family.json"
FORMAT_VERSION = 2  # NOTE: bump when the build procedure changes (part of the fingerprint)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

__all__ = [
    "FAMILY_SIZES",
    "DraftSpec",
    "FamilySpec",
    "TargetSpec",
    "build_family",
    "check_family",
    "family_dir",
    "get_spec",
    "load_family",
    "stdlib_corpus",
]


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


# ----------------------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ----------------------------------------------------------------------------------------------------------


# NOTE: test suites are skipped too: they are half of the stdlib and mostly ``self.assertEqual(...)``, which
# small models then repeat forever.
_SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "__pycache__", "test", "tests", "idle_test"}


def _stdlib_files() -> list[Path]:
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
    files = _stdlib_files()
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


# ----------------------------------------------------------------------------------------------------------
# Cache bookkeeping
# ----------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_marker(folder: Path, fingerprint: str, info: dict) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"fingerprint": fingerprint, "files": files, **info}, indent=2))


def _check_folder(folder: Path, fingerprint: str) -> str | None:
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


def _marker_info(folder: Path) -> dict:
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
        reason = _check_folder(root / name, spec.fingerprint())
        if reason:
            return reason
    return None


def _atomic_save(root: Path, name: str, fingerprint: str, info: dict, save_fn) -> Path:
    """Call ``save_fn(tmp_folder)``, write the marker, then rename the folder to ``root/name``."""
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    _write_marker(tmp, fingerprint, info)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------


def _device(spec: FamilySpec, device: str | None) -> torch.device:
    name = device or spec.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _llama_config(spec: FamilySpec, t: TargetSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=t.tie_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-5,
    )


def _grow(model, source) -> None:
    """Copy ``source`` into the first layers (and embeddings, norm, head) of the deeper ``model``; zero the
    output projections of the extra layers so that ``model`` starts as exactly ``source``."""
    n_src = source.config.num_hidden_layers
    for attr in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(model.config, attr) != getattr(source.config, attr):
            raise ValueError(f"grow_from: {attr} differs ({getattr(model.config, attr)} vs source's)")
    if model.config.num_hidden_layers < n_src:
        raise ValueError("grow_from: the grown target must have at least the source's layers")
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("model.layers.") and "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"grow_from: incompatible source (missing={missing}, unexpected={unexpected})")
    with torch.no_grad():
        for layer in model.model.layers[n_src:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def _params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if model.config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    return {"params": total, "non_embedding_params": total - embed - head}


def _finalize_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = None


def build_family(
    size: str | FamilySpec = "tiny",
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    log=None,
    draft_vocab: int | None = None,
) -> Path:
    """Build (or complete/repair) the family of ``size`` in its cache folder; returns that folder.

    Does nothing when the cache is complete and intact (unless ``force``). Parts whose folder is missing,
    corrupt or from another spec are rebuilt together with everything that depends on them.

    ``draft_vocab=N`` also writes the draft's reduced vocabulary (the N most frequent tokens of the SoFT
    data, ``draft/draft_vocab.safetensors``); on a complete cache it adds (or replaces) only that file. It is
    not part of the models' checksums: the models do not change with it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from s2d_ext import soft

    spec = get_spec(size)
    root = family_dir(spec, cache_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not force and check_family(spec, cache_dir) is None:
        say(f"family {spec.size!r}: cache at {root} is complete")
        if draft_vocab is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
            blocks = _train_blocks(spec, tokenizer, stdlib_corpus(spec)[0])
            manifest = json.loads((root / MANIFEST).read_text())
            manifest["draft_vocab"] = _write_draft_vocab(spec, root, blocks, draft_vocab, say)
            tmp = root / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, root / MANIFEST)
        return root
    fp = spec.fingerprint()
    dev = _device(spec, device)
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).exists():
        # NOTE: the manifest is the completion marker; drop it first so an interrupted rebuild reads
        # as incomplete.
        (root / MANIFEST).unlink()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    corpus, heldout_docs, corpus_stats = stdlib_corpus(spec)
    rebuilt_upstream = force

    # 1. tokenizer
    t0 = time.perf_counter()
    tok_dir = root / "tokenizer"
    if rebuilt_upstream or _check_folder(tok_dir, fp) is not None:
        say(f"family {spec.size!r}: training the BPE tokenizer (vocab {spec.vocab_size})")
        tokenizer = train_tokenizer(corpus, spec.vocab_size, spec.tokenizer_chars)
        _atomic_save(root, "tokenizer", fp, {"vocab_size": len(tokenizer)}, tokenizer.save_pretrained)
        rebuilt_upstream = True
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    timings["tokenizer"] = time.perf_counter() - t0

    train_blocks = _train_blocks(spec, tokenizer, corpus)
    heldout_blocks = soft.tokenize_blocks(
        heldout_docs, tokenizer, spec.seq_len, max_tokens=spec.heldout_tokens
    )
    corpus_stats["train_tokens_available"] = int(train_blocks.numel())
    corpus_stats["heldout_tokens"] = int(heldout_blocks.numel())

    # 2. targets
    targets = {}
    for index, t in enumerate(spec.targets):
        folder = root / t.name
        if rebuilt_upstream or _check_folder(folder, fp) is not None:
            t0 = time.perf_counter()
            say(f"family {spec.size!r}: training {t.name} ({t.num_layers} layers, hidden {t.hidden_size})")
            torch.manual_seed(spec.seed * 1000 + index)
            model = LlamaForCausalLM(_llama_config(spec, t, tokenizer)).to(dev)
            if t.grow_from is not None:
                _grow(model, targets[t.grow_from])
            _finalize_generation_config(model, tokenizer)
            cfg = soft.SoftConfig(
                max_steps=t.steps,
                batch_size=spec.batch_size,
                lr=t.lr,
                warmup_steps=spec.warmup_steps,
                weight_decay=0.01,
                seed=spec.seed + index,
                thresholds=(0.0,),
            )
            result = soft.train_soft(model, train_blocks, cfg, progress=progress, desc=t.name)
            loss = soft.heldout_loss(model, heldout_blocks)[-1]
            seconds = time.perf_counter() - t0
            info = {
                "kind": "target",
                **_params(model),
                "layers": t.num_layers,
                "hidden_size": t.hidden_size,
                "train_tokens": result.tokens_seen,
                "heldout_loss": loss,
                "train_seconds": seconds,
            }

            def save(tmp, model=model):
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)

            _atomic_save(root, t.name, fp, info, save)
            rebuilt_upstream = True
            say(f"family {spec.size!r}: {t.name}: held-out loss {loss:.3f} ({seconds:.0f} s)")
        targets[t.name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()

    # 3. draft: first layers of the source target, SoFT with distillation toward the targets
    d = spec.draft
    folder = root / d.name
    if rebuilt_upstream or _check_folder(folder, fp) is not None:
        t0 = time.perf_counter()
        say(
            f"family {spec.size!r}: SoFT of the draft (first {d.num_layers} layers of {d.source}, "
            f"exits {d.exits})"
        )
        torch.manual_seed(spec.seed * 1000 + 999)
        draft = soft.truncate_model(targets[d.source], d.num_layers, d.exits, d.thresholds)
        teachers = [targets[name] for name, _ in d.distill]
        cfg = soft.SoftConfig(
            exits=d.exits,
            thresholds=d.thresholds,
            max_steps=d.steps,
            batch_size=spec.batch_size,
            lr=d.lr,
            warmup_steps=spec.warmup_steps,
            weight_decay=0.01,
            seed=spec.seed + 999,
            ce_weight=d.ce_weight,
            distill_weights=tuple(w for _, w in d.distill),
        )
        result = soft.train_soft(draft, train_blocks, cfg, targets=teachers, progress=progress, desc=d.name)
        losses = soft.heldout_loss(draft, heldout_blocks, d.exits)
        seconds = time.perf_counter() - t0
        info = {
            "kind": "draft",
            **_params(draft),
            "layers": d.num_layers,
            "source": d.source,
            "exits": list(d.exits),
            "thresholds": list(d.thresholds),
            "hidden_size": draft.config.hidden_size,
            "train_tokens": result.tokens_seen,
            "heldout_loss": {str(e): v for e, v in zip(d.exits, losses)},
            "train_seconds": seconds,
            "distill": {name: w for name, w in d.distill},
        }

        def save_draft(tmp):
            draft.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        _atomic_save(root, d.name, fp, info, save_draft)
        say(
            f"family {spec.size!r}: draft held-out loss per exit "
            f"{dict(zip(d.exits, [round(x, 3) for x in losses]))}"
        )
    vocab_record = None
    if draft_vocab is not None:
        vocab_record = _write_draft_vocab(spec, root, train_blocks, draft_vocab, say)
    timings["total"] = time.perf_counter() - t_start

    models = {}
    for name in [t.name for t in spec.targets] + [d.name]:
        info = _marker_info(root / name)
        info.pop("files", None)
        info.pop("fingerprint", None)
        models[name] = {"path": name, **info}
    for t in spec.targets:
        models[t.name]["grown_from"] = t.grow_from
    models[d.name]["cut_from"] = d.source
    for name, info in models.items():
        info["train_tokens_total"] = total_train_tokens(spec, models, name)
    manifest = {
        "format": FORMAT_VERSION,
        "size": spec.size,
        "fingerprint": fp,
        "seed": spec.seed,
        "spec": dataclasses.asdict(spec),
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer), "type": "byte-level BPE"},
        "corpus": corpus_stats,
        "models": models,
        "build_seconds_this_run": timings["total"],
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _transformers_version(),
        },
        "complete": True,
    }
    if vocab_record is not None:
        manifest["draft_vocab"] = vocab_record
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    say(f"family {spec.size!r}: built in {timings['total']:.0f} s at {root}")
    return root


def _train_blocks(spec: FamilySpec, tokenizer, corpus: Sequence[str]) -> torch.Tensor:
    """The training token blocks every model of the family (and the draft's SoFT) draws from."""
    from s2d_ext import soft

    max_tokens = max(max(t.steps for t in spec.targets), spec.draft.steps) * spec.batch_size * spec.seq_len
    return soft.tokenize_blocks(corpus, tokenizer, spec.seq_len, max_tokens=max_tokens)


def _write_draft_vocab(spec: FamilySpec, root: Path, blocks: torch.Tensor, n: int, say) -> dict:
    """Save the N most frequent tokens of ``blocks`` as the draft's vocabulary; returns its manifest entry."""
    from transformers import AutoConfig

    from s2d_ext.draft.draft_vocab import DRAFT_VOCAB_FILE, most_frequent_tokens, save_draft_vocab

    vocab_size = int(AutoConfig.from_pretrained(root / spec.draft.name).vocab_size)
    vocab = most_frequent_tokens(blocks, vocab_size, n)
    save_draft_vocab(root / spec.draft.name, vocab)
    counts = torch.bincount(blocks.flatten(), minlength=vocab_size)
    coverage = float(counts[vocab].sum()) / max(int(counts.sum()), 1)
    say(f"family {spec.size!r}: draft vocabulary of {n} ids covers {coverage:.1%} of the training tokens")
    return {"path": f"{spec.draft.name}/{DRAFT_VOCAB_FILE}", "size": n, "train_token_coverage": coverage}


def family_draft_vocab(
    size: str | FamilySpec, n: int, cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """The N most frequent tokens of a built family's training data (what ``build_family(draft_vocab=N)``
    saves), computed without writing anything."""
    from transformers import AutoConfig, AutoTokenizer

    from s2d_ext.draft.draft_vocab import most_frequent_tokens

    spec = get_spec(size)
    root = family_dir(spec, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    blocks = _train_blocks(spec, tokenizer, stdlib_corpus(spec)[0])
    vocab_size = int(AutoConfig.from_pretrained(root / spec.draft.name).vocab_size)
    return most_frequent_tokens(blocks, vocab_size, n)


def total_train_tokens(spec: FamilySpec, models: dict, name: str) -> int:
    """Training tokens of model ``name`` including those of the models it was grown or cut from."""
    own = int(models[name]["train_tokens"])
    parents = {t.name: t.grow_from for t in spec.targets}
    parent = spec.draft.source if name == spec.draft.name else parents.get(name)
    return own + (total_train_tokens(spec, models, parent) if parent else 0)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


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
