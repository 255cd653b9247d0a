"""Builds the family in order: tokenizer, targets (grown one from the other), the SoFT-tuned sorted draft."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from s2d_ext.train.family.cache import atomic_save, check_family, check_folder, marker_info
from s2d_ext.train.family.corpus import stdlib_corpus, train_tokenizer
from s2d_ext.train.family.spec import FORMAT_VERSION, MANIFEST, FamilySpec, TargetSpec, family_dir, get_spec


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


def grow_target(model, source) -> None:
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

    from s2d_ext.train import soft

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
    if rebuilt_upstream or check_folder(tok_dir, fp) is not None:
        say(f"family {spec.size!r}: training the BPE tokenizer (vocab {spec.vocab_size})")
        tokenizer = train_tokenizer(corpus, spec.vocab_size, spec.tokenizer_chars)
        atomic_save(root, "tokenizer", fp, {"vocab_size": len(tokenizer)}, tokenizer.save_pretrained)
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
        if rebuilt_upstream or check_folder(folder, fp) is not None:
            t0 = time.perf_counter()
            say(f"family {spec.size!r}: training {t.name} ({t.num_layers} layers, hidden {t.hidden_size})")
            torch.manual_seed(spec.seed * 1000 + index)
            model = LlamaForCausalLM(_llama_config(spec, t, tokenizer)).to(dev)
            if t.grow_from is not None:
                grow_target(model, targets[t.grow_from])
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

            atomic_save(root, t.name, fp, info, save)
            rebuilt_upstream = True
            say(f"family {spec.size!r}: {t.name}: held-out loss {loss:.3f} ({seconds:.0f} s)")
        targets[t.name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()

    # 3. draft: first layers of the source target, SoFT with distillation toward the targets
    d = spec.draft
    folder = root / d.name
    if rebuilt_upstream or check_folder(folder, fp) is not None:
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

        atomic_save(root, d.name, fp, info, save_draft)
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
        info = marker_info(root / name)
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
    from s2d_ext.train import soft

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
