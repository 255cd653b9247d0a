"""Building (or resuming) a teacher-forced data set: standard-library source windows scored by every
teacher, in checksummed shards (the format of :mod:`s2d_ext.train.self_data`, with one top-k per teacher)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping

import torch

from s2d_ext.train.family.corpus import stdlib_files
from s2d_ext.train.self_data.cache import Progress, atomic_write
from s2d_ext.train.self_data.load import check_self_data, load_self_data
from s2d_ext.train.self_data.spec import MANIFEST, PROMPTS_FILE
from s2d_ext.train.teacher_data.spec import FORMAT_VERSION, TeacherDataSpec, teacher_data_dir


def source_windows(tokenizer, spec: TeacherDataSpec) -> list[dict]:
    """The data set's windows: ``{"text": "<stdlib file>:<window>", "ids": [seq_len ints]}``, in order.

    Files come in a seeded order; each gives its first ``windows_per_file`` full windows (tokenized whole,
    without special tokens), until ``spec.num_windows`` windows.
    """
    files = stdlib_files()
    random.Random(spec.seed).shuffle(files)
    windows: list[dict] = []
    for path in files:
        if len(windows) >= spec.num_windows:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for w in range(min(spec.windows_per_file, len(ids) // spec.seq_len)):
            if len(windows) >= spec.num_windows:
                break
            chunk = ids[w * spec.seq_len : (w + 1) * spec.seq_len]
            windows.append({"text": f"{path.name}:{w}", "source": "stdlib", "ids": chunk})
    if len(windows) < spec.num_windows:
        raise ValueError(
            f"the standard library gives {len(windows)} windows of {spec.seq_len} tokens, fewer than the "
            f"{spec.num_windows} that max_tokens={spec.max_tokens} asks for"
        )
    return windows


def stdlib_token_counts(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] float64: how often each id occurs in the whole standard library source (every file the
    data set may draw from), for choosing a draft vocabulary on far more text than the scored windows."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        if ids.numel():
            counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size).double()
    return counts


@torch.no_grad()
def teacher_topk(model, ids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L-1, K] int32 ids, [B, L-1, K] float32 log-probabilities): ``model``'s top-k next-token
    distribution (temperature 1) at every position but the last of ``ids`` [B, L]."""
    device = next(model.parameters()).device
    logits = model(ids.to(device)).logits[:, :-1].float()  # [B, L-1, V]
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.topk(top_k, dim=-1)
    return top.indices.to(torch.int32).cpu(), top.values.cpu()


def build_teacher_data(
    teachers: Mapping[str, torch.nn.Module],
    tokenizer,
    spec: TeacherDataSpec,
    teacher_fingerprints: Mapping[str, str],
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_file: Callable[[str], None] | None = None,
    max_seconds: float | None = None,
) -> list[str]:
    """Build (or resume, or verify) the data set of ``spec`` scored by ``teachers``; returns the names of its
    answer shards that are built, in order (all of them unless ``max_seconds`` stopped the build).

    Parameters
    ----------
    teachers : name -> HF causal LM sharing ``tokenizer`` (scored in their own dtype, in order)
    tokenizer : the teachers' tokenizer
    spec : :class:`TeacherDataSpec`
    teacher_fingerprints : name -> identity of its weights (``checkpoints.checkpoint_fingerprint``)
    on_file : called with each file's name once it is saved (progress reporting; tests interrupt through it)
    max_seconds : start no new shard after this long (the shards built so far stay valid: a later call with
        the same spec resumes); None = build every shard. Load a partial set with
        ``load_self_data(root, shards=...)``; a complete one gets its manifest and loads as usual.

    The shards hold ``topk_ids`` / ``topk_logprobs`` of shape [A, M, K] (M = len(teachers), in order): what
    :func:`s2d_ext.train.soft.self_data_loss` distils toward, averaging the teachers' KL terms.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = list(teachers)
    if not names:
        raise ValueError("teachers is empty: name at least one model to distil toward")
    if set(names) != set(teacher_fingerprints):
        raise ValueError("teacher_fingerprints must name the same teachers as teachers")
    root = teacher_data_dir(spec.name, cache_dir)
    fingerprint = spec.fingerprint({n: teacher_fingerprints[n] for n in names})
    n_shards = -(-spec.num_windows // spec.shard_size)
    all_shards = [f"answers_{shard:05d}.safetensors" for shard in range(n_shards)]
    if check_self_data(root.name, root.parent, fingerprint=fingerprint) is None:
        say(f"teacher data {spec.name!r}: cache at {root} is complete")
        return all_shards
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).exists():
        (root / MANIFEST).unlink()  # NOTE: the manifest marks completion; an unfinished rebuild has none
    state = Progress(root, fingerprint)
    windows = source_windows(tokenizer, spec)
    if not state.valid(PROMPTS_FILE):
        lines = "".join(json.dumps({k: w[k] for k in ("text", "source")}) + "\n" for w in windows)
        state.record(PROMPTS_FILE, atomic_write(root / PROMPTS_FILE, lambda tmp: tmp.write_text(lines)))
    t_start = time.perf_counter()
    bar = tqdm(total=n_shards, desc="teacher data", disable=not progress, dynamic_ncols=True)
    for shard, name in enumerate(all_shards):
        if not state.valid(name):
            if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
                bar.close()
                built = all_shards[:shard]
                say(
                    f"teacher data {spec.name!r}: stopped by the time budget after {shard} of {n_shards} "
                    f"shards ({shard * spec.shard_size} windows); the same command resumes the rest"
                )
                return built
            chunk = windows[shard * spec.shard_size : (shard + 1) * spec.shard_size]
            tensors = _score_shard(teachers, chunk, spec)
            digest = atomic_write(root / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
            state.record(name, digest)
            if on_file:
                on_file(name)
        bar.update(1)
    bar.close()
    data = load_self_data(root, verify=False)
    manifest = {
        "format": FORMAT_VERSION,
        "kind": "teacher",
        "fingerprint": fingerprint,
        "teachers": names,
        "teacher_fingerprints": dict(teacher_fingerprints),
        "teacher_dtypes": {n: str(next(m.parameters()).dtype) for n, m in teachers.items()},
        "spec": dataclasses.asdict(spec),
        "files": dict(state.files),
        "sequences": data.num_sequences,
        "answer_tokens": data.num_answer_tokens,
        "build_seconds_this_run": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "complete": True,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))
    say(
        f"teacher data {spec.name!r}: {data.num_sequences} windows, {data.num_answer_tokens:,} scored "
        f"positions x {len(names)} teachers at {root} ({manifest['build_seconds_this_run']:.0f} s this run)"
    )
    return all_shards


def _score_shard(teachers, chunk: list[dict], spec: TeacherDataSpec) -> dict[str, torch.Tensor]:
    ids = torch.tensor([w["ids"] for w in chunk], dtype=torch.int64)  # [S, L]
    per_teacher_ids, per_teacher_lp = [], []
    for model in teachers.values():
        parts = [
            teacher_topk(model, ids[lo : lo + spec.batch_size], spec.top_k)
            for lo in range(0, len(ids), spec.batch_size)
        ]
        per_teacher_ids.append(torch.cat([p[0] for p in parts]).flatten(0, 1))  # [S * (L-1), K]
        per_teacher_lp.append(torch.cat([p[1] for p in parts]).flatten(0, 1))
    n, length = ids.shape
    return {
        "tokens": ids.flatten().contiguous(),
        "seq_offsets": torch.arange(0, (n + 1) * length, length, dtype=torch.int64),
        "answer_start": torch.ones(n, dtype=torch.int64),
        "topk_ids": torch.stack(per_teacher_ids, dim=1).contiguous(),  # [A, M, K]
        "topk_logprobs": torch.stack(per_teacher_lp, dim=1).contiguous(),
        "temperature": torch.zeros(n, dtype=torch.float32),
        "finished": torch.ones(n, dtype=torch.uint8),
    }
