"""Training data a chat target writes itself, with no download: prompts, answers and the target's own
next-token distributions, for distilling a draft (SoFT) toward it.

Prompts come from two sources, neither of which is an evaluation set:

* **Magpie** (arXiv 2406.08464): the target is given only its chat template's *user header* (the template
  rendered up to where a user message would start, system prompt included) and samples the user turn itself
  (temperature 1). Turns that do not end, are too short or too long, or repeat are dropped.
* **Standard-library docstrings**: questions built from the first paragraph of the docstrings of public
  functions and classes of the running interpreter's standard library (parsed with ``ast``, nothing is
  imported), through a few fixed question templates.

No prompt equal to a Spec-Bench question (any turn, compared after collapsing whitespace and case) is kept:
:func:`evaluation_prompts` lists them and the build filters them out, and the tests check it.

The target then answers every prompt through its chat template: a fixed share greedily, the rest sampled at
temperatures in 0.7-1 (``SelfDataSpec.temperatures`` cycles over the prompts). For every answer token the
build records the target's top-``top_k`` next-token log-probabilities (temperature 1, the distribution a
draft is distilled toward) at the position that predicts it.

Cache: ``<root>/<name>/`` (``root`` = ``--cache-dir``, else ``$S2D_SELF_DATA_DIR``, else
``~/.cache/s2d_ext/self_data``), like the model family: every shard is written under a temporary name and
renamed into place, with a ``.json`` sidecar holding its SHA-256 and the build's fingerprint (spec + target
weights); ``manifest.json`` is written last. An interrupted build resumes at the first missing or damaged
shard; a finished one is verified and reused. Deterministic for a given seed, target, torch version and
thread count (each shard draws from its own seeded generator).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.jsonl"
FORMAT_VERSION = 1  # NOTE: bump when the build procedure changes (part of the fingerprint)

__all__ = [
    "SelfData",
    "SelfDataSpec",
    "build_self_data",
    "check_self_data",
    "docstring_prompts",
    "evaluation_prompts",
    "load_self_data",
    "normalize_prompt",
    "self_data_dir",
    "user_header",
]

#: question templates over a docstring entry: {module}, {name} (qualified) and {doc} (first paragraph)
DOCSTRING_TEMPLATES = (
    "What does `{name}` from Python's `{module}` module do?",
    "Explain in plain words what this Python documentation says: {doc}",
    "Write a short Python example that uses `{module}.{name}` and explain it.",
    "When would I use `{module}.{name}` in Python? Its documentation says: {doc}",
    "Summarize the following documentation of `{module}.{name}`: {doc}",
)


@dataclass(frozen=True)
class SelfDataSpec:
    """Everything that decides a self-written data set (with the target's weights: its fingerprint).

    ``temperatures`` cycles over the prompts: with ``(0.0, 0.0, 0.7, 1.0)`` half the answers are greedy,
    a quarter sampled at 0.7 and a quarter at 1.0.
    """

    name: str = "smollm2"
    magpie_prompts: int = 768  # user turns sampled (before filtering)
    docstring_prompts: int = 768
    temperatures: tuple[float, ...] = (0.0, 0.0, 0.7, 1.0)
    max_new_tokens: int = 192  # answer length cap
    max_user_tokens: int = 96  # Magpie user turn cap
    max_prompt_tokens: int = 320  # prompts longer than this (chat template included) are dropped
    top_k: int = 32  # recorded target log-probabilities per answer token
    shard_size: int = 64  # prompts per shard (the unit of resumption)
    batch_size: int = 64  # rows decoded together
    seed: int = 0
    dtype: str = "bfloat16"  # the target's dtype while it writes (NOTE: 2.5x faster than float32 on AMX CPUs)

    def fingerprint(self, target_fingerprint: str) -> str:
        payload = dataclasses.asdict(self)
        payload["format"] = FORMAT_VERSION
        payload["target"] = target_fingerprint
        payload["torch"] = torch.__version__.split("+")[0]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def self_data_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $S2D_SELF_DATA_DIR or ~/.cache/s2d_ext/self_data>/<name>``."""
    root = (
        cache_dir or os.environ.get("S2D_SELF_DATA_DIR") or Path.home() / ".cache" / "s2d_ext" / "self_data"
    )
    return Path(root).expanduser() / name


# ---------------------------------------------------------------------------------------------- prompts
def normalize_prompt(text: str) -> str:
    """Whitespace collapsed, case folded: two prompts that differ only so count as equal."""
    return " ".join(text.split()).casefold()


def evaluation_prompts(path: str | os.PathLike | None = None) -> set[str]:
    """Every turn of every Spec-Bench question (normalised): text no training prompt may equal."""
    if path is None:
        from s2d_ext.bench.arguments import DEFAULT_DATA

        path = DEFAULT_DATA
    out = set()
    for line in Path(path).read_text().splitlines():
        if line.strip():
            for turn in json.loads(line)["turns"]:
                out.add(normalize_prompt(turn))
    return out


def _first_paragraph(doc: str, max_chars: int = 400) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    para = " ".join(para.split())
    return para[:max_chars].rsplit(" ", 1)[0] if len(para) > max_chars else para


def docstring_entries() -> list[tuple[str, str, str]]:
    """(module, qualified name, first docstring paragraph) of public functions and classes of the stdlib,
    in a fixed order (sorted files, source order). Files are parsed, never imported."""
    from s2d_ext.train.family.corpus import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    entries = []
    for path in stdlib_files():
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if any(p.startswith("_") for p in parts):
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc:
                para = _first_paragraph(doc)
                if len(para) >= 30:
                    entries.append((module, node.name, para))
    return entries


def docstring_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` questions from stdlib docstrings: entries drawn without replacement with ``seed`` (repeating
    only when the stdlib has fewer), each through a template drawn with the same generator."""
    entries = docstring_entries()
    if not entries or n <= 0:
        return []
    rng = random.Random(seed)
    order = []
    while len(order) < n:
        batch = list(range(len(entries)))
        rng.shuffle(batch)
        order += batch
    out = []
    for index in order[:n]:
        module, name, doc = entries[index]
        template = DOCSTRING_TEMPLATES[rng.randrange(len(DOCSTRING_TEMPLATES))]
        out.append(template.format(module=module, name=name, doc=doc))
    return out


def user_header(tokenizer) -> list[int]:
    """The chat template's token ids up to where a user message's text starts (Magpie's "pre-query").

    NOTE: rendered from the template itself (a user message holding a marker, cut at the marker), so the
    system prompt a template inserts by default is part of it, exactly as at evaluation time.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template: Magpie prompts need one")
    marker = "\u2063S2D-USER-TURN\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise ValueError("the chat template does not show the user message verbatim; cannot find its header")
    return list(tokenizer(text.split(marker, 1)[0], add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A user turn through the chat template with the generation prompt (as the bench encodes prompts)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _stop_ids(tokenizer, model) -> list[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the target has no EOS token: answers would never end")
    return sorted(ids)


# ----------------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """One row of :func:`decode_batch`: its new tokens, whether it stopped at EOS, the recorded top-k."""

    tokens: list[int]
    finished: bool
    topk_ids: torch.Tensor | None  # [n, K] int32: top-k of the distribution that predicted tokens[i]
    topk_logprobs: torch.Tensor | None  # [n, K] float32


@torch.no_grad()
def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperatures: Sequence[float],
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
    top_k_record: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[Decoded]:
    """Decode left-padded ``prompts`` together over a KV cache, each row at its own temperature (0 = argmax;
    else a sample from softmax(logits / T) drawn with ``generator``), until a stop id or ``max_new_tokens``.

    With ``top_k_record > 0`` it records, for every emitted token, the top-k of the *unscaled* (T=1)
    log-softmax that predicted it. Finished rows leave the batch (their cache rows are dropped).
    """
    from s2d_ext import _cache_compat

    device = model.get_input_embeddings().weight.device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    temps = torch.tensor([float(t) for t in temperatures], dtype=torch.float32, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    cache = _cache_compat.new_cache(model)
    cache_kw = _cache_compat.cache_keyword(model)

    alive = torch.arange(batch, device=device)  # [R] original row of each cache row
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [R] cache rows still writing
    tokens: list[list[int]] = [[] for _ in range(batch)]
    rec_ids: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    rec_lp: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = [False] * batch
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    step_ids, step_pos = input_ids, position_ids
    for step in range(max_new_tokens):
        with autocast:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
        logits = out.logits[:, -1].float()  # [R, V]
        t = temps[alive]
        nxt = logits.argmax(-1)
        if bool((t > 0).any()):
            probs = torch.softmax(logits / t.clamp(min=1e-6)[:, None], dim=-1)
            sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
            nxt = torch.where(t > 0, sampled, nxt)
        if top_k_record:
            top_lp, top_ids = torch.log_softmax(logits, dim=-1).topk(top_k_record, dim=-1)
            top_lp, top_ids = top_lp.cpu(), top_ids.to(torch.int32).cpu()
        stopped = active & torch.isin(nxt, stops)
        for r, (orig, tok, live, stop) in enumerate(
            zip(alive.tolist(), nxt.tolist(), active.tolist(), stopped.tolist())
        ):
            if not live:
                continue
            tokens[orig].append(tok)
            if top_k_record:
                rec_ids[orig].append(top_ids[r])
                rec_lp[orig].append(top_lp[r])
            finished[orig] = stop
        active = active & ~stopped
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        # NOTE: finished rows leave once they are a quarter of the batch: fewer rows, cheaper steps.
        if int((~active).sum()) >= max(1, active.numel() // 4):
            rows = active.nonzero().squeeze(1)
            cache.batch_select_indices(rows)
            alive, active, mask, step_pos, nxt = (
                alive[rows],
                active[rows],
                mask[rows],
                step_pos[rows],
                nxt[rows],
            )
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt[:, None]
    result = []
    for row in range(batch):
        ids = torch.stack(rec_ids[row]) if top_k_record and rec_ids[row] else None
        lps = torch.stack(rec_lp[row]) if top_k_record and rec_lp[row] else None
        result.append(Decoded(tokens=tokens[row], finished=finished[row], topk_ids=ids, topk_logprobs=lps))
    return result


# ----------------------------------------------------------------------------------------- cache helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> str:
    """``write(tmp)`` then rename ``tmp`` to ``path``; returns the file's SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    digest = _sha256(tmp)
    os.replace(tmp, path)
    return digest


class _Progress:
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
        return name in self.files and path.is_file() and _sha256(path) == self.files[name]

    def record(self, name: str, digest: str) -> None:
        self.files[name] = digest
        payload = json.dumps({"fingerprint": self.fingerprint, "files": self.files}, indent=1)
        _atomic_write(self.path, lambda tmp: tmp.write_text(payload))


def _shard_generator(seed: int, stage: str, index: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{stage}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------------------- build
def build_self_data(
    target,
    tokenizer,
    spec: SelfDataSpec,
    target_fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> Path:
    """Build (or resume, or verify) the data set of ``spec`` written by ``target``; returns its folder.

    Parameters
    ----------
    target : HF causal LM with a chat tokenizer (writes through a copy in ``spec.dtype``; left unchanged)
    tokenizer : its tokenizer (needs a chat template and an EOS token)
    spec : :class:`SelfDataSpec`
    target_fingerprint : identifies the target's weights (:func:`s2d_ext.checkpoints.checkpoint_fingerprint`)
    on_file : called with each file's name once it is saved (progress reporting; tests interrupt through it)
    """
    from tqdm.auto import tqdm

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = self_data_dir(spec.name, cache_dir)
    fingerprint = spec.fingerprint(target_fingerprint)
    if check_self_data(spec.name, cache_dir, fingerprint=fingerprint) is None:
        say(f"self data {spec.name!r}: cache at {root} is complete")
        return root
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).exists():
        (root / MANIFEST).unlink()  # NOTE: the manifest marks completion; an unfinished rebuild has none
    state = _Progress(root, fingerprint)
    stop_ids = _stop_ids(tokenizer, target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # NOTE: the target writes in spec.dtype through a copy: casting it in place and back would round its
    # float32 weights to bfloat16 for good (and the draft cut from it afterwards would differ).
    dtype = getattr(torch, spec.dtype)
    writer = (
        target if target.get_input_embeddings().weight.dtype == dtype else copy.deepcopy(target).to(dtype)
    )
    if writer is not target:
        writer.eval()
    t_start = time.perf_counter()
    try:
        # 1. Magpie user turns, shard by shard
        header = user_header(tokenizer)
        n_magpie = -(-spec.magpie_prompts // spec.shard_size) if spec.magpie_prompts > 0 else 0
        turns: list[dict] = []
        bar = tqdm(total=n_magpie, desc="Magpie prompts", disable=not progress, dynamic_ncols=True)
        for shard in range(n_magpie):
            name = f"magpie_{shard:05d}.json"
            if not state.valid(name):
                rows = min(spec.shard_size, spec.magpie_prompts - shard * spec.shard_size)
                generator = _shard_generator(spec.seed, "magpie", shard)
                decoded = []
                for lo in range(0, rows, spec.batch_size):
                    b = min(spec.batch_size, rows - lo)
                    decoded += decode_batch(
                        writer,
                        [header] * b,
                        max_new_tokens=spec.max_user_tokens,
                        temperatures=[1.0] * b,
                        stop_ids=stop_ids,
                        pad_id=pad_id,
                        generator=generator,
                    )
                items = [
                    {
                        "text": tokenizer.decode(d.tokens, skip_special_tokens=True).strip(),
                        "finished": d.finished,
                    }
                    for d in decoded
                ]
                payload = json.dumps(items, ensure_ascii=False, indent=0)
                state.record(name, _atomic_write(root / name, lambda tmp, p=payload: tmp.write_text(p)))
                if on_file:
                    on_file(name)
            turns += json.loads((root / name).read_text())
            bar.update(1)
        bar.close()

        # 2. the prompt list: docstrings + filtered Magpie turns, shuffled, temperatures assigned
        if not state.valid(PROMPTS_FILE):
            prompts = _select_prompts(spec, tokenizer, turns)
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
            state.record(PROMPTS_FILE, _atomic_write(root / PROMPTS_FILE, lambda tmp: tmp.write_text(lines)))
            if on_file:
                on_file(PROMPTS_FILE)
        prompts = [json.loads(line) for line in (root / PROMPTS_FILE).read_text().splitlines()]

        # 3. answers with the target's top-k distributions
        n_answer = -(-len(prompts) // spec.shard_size)
        bar = tqdm(total=n_answer, desc="answers", disable=not progress, dynamic_ncols=True)
        for shard in range(n_answer):
            name = f"answers_{shard:05d}.safetensors"
            if not state.valid(name):
                chunk = prompts[shard * spec.shard_size : (shard + 1) * spec.shard_size]
                tensors = _answer_shard(writer, tokenizer, spec, chunk, shard, stop_ids, pad_id)
                from safetensors.torch import save_file

                digest = _atomic_write(root / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
                state.record(name, digest)
                if on_file:
                    on_file(name)
            bar.update(1)
        bar.close()
    finally:
        del writer

    data = load_self_data(root, verify=False)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "target_fingerprint": target_fingerprint,
        "spec": dataclasses.asdict(spec),
        "files": dict(state.files),
        "prompts": len(prompts),
        "prompt_sources": _count(p["source"] for p in prompts),
        "magpie_turns_sampled": len(turns),
        "sequences": data.num_sequences,
        "answer_tokens": data.num_answer_tokens,
        "finished_answers": int(data.finished.sum()),
        "build_seconds_this_run": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "complete": True,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    _atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))
    say(
        f"self data {spec.name!r}: {data.num_sequences} answers, {data.num_answer_tokens:,} answer tokens at "
        f"{root} ({manifest['build_seconds_this_run']:.0f} s this run)"
    )
    return root


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _select_prompts(spec: SelfDataSpec, tokenizer, turns: list[dict]) -> list[dict]:
    """Docstring questions + usable Magpie turns, minus evaluation prompts and repeats, shuffled; every
    prompt gets its answer temperature (cycling over ``spec.temperatures``)."""
    banned = evaluation_prompts()
    seen: set[str] = set()
    chosen = []
    candidates = [("docstring", text) for text in docstring_prompts(spec.docstring_prompts, spec.seed)]
    for turn in turns:
        text = turn["text"]
        # NOTE: a turn that hit the length cap is cut mid-sentence; a very short one is rarely a request.
        if turn["finished"] and 12 <= len(text) <= 1500 and any(c.isalpha() for c in text):
            candidates.append(("magpie", text))
    for source, text in candidates:
        key = normalize_prompt(text)
        if key in banned or key in seen:
            continue
        if len(chat_prompt_ids(tokenizer, text)) > spec.max_prompt_tokens:
            continue
        seen.add(key)
        chosen.append({"source": source, "text": text})
    random.Random(spec.seed).shuffle(chosen)
    for index, item in enumerate(chosen):
        item["id"] = index
        item["temperature"] = float(spec.temperatures[index % len(spec.temperatures)])
    return chosen


def _answer_shard(target, tokenizer, spec, chunk, shard, stop_ids, pad_id) -> dict[str, torch.Tensor]:
    generator = _shard_generator(spec.seed, "answers", shard)
    encoded = [chat_prompt_ids(tokenizer, p["text"]) for p in chunk]
    # NOTE: rows of similar length decode together (less padding); the order is fixed, so is the output.
    order = sorted(range(len(chunk)), key=lambda i: (len(encoded[i]), i))
    answers: dict[int, Decoded] = {}
    for lo in range(0, len(order), spec.batch_size):
        rows = order[lo : lo + spec.batch_size]
        decoded = decode_batch(
            target,
            [encoded[i] for i in rows],
            max_new_tokens=spec.max_new_tokens,
            temperatures=[chunk[i]["temperature"] for i in rows],
            stop_ids=stop_ids,
            pad_id=pad_id,
            generator=generator,
            top_k_record=spec.top_k,
        )
        for i, d in zip(rows, decoded):
            answers[i] = d
    tokens, offsets, starts, top_ids, top_lp = [], [0], [], [], []
    for i in range(len(chunk)):
        d = answers[i]
        tokens += encoded[i] + d.tokens
        offsets.append(len(tokens))
        starts.append(len(encoded[i]))
        top_ids.append(d.topk_ids)
        top_lp.append(d.topk_logprobs)
    return {
        "tokens": torch.tensor(tokens, dtype=torch.int32),
        "seq_offsets": torch.tensor(offsets, dtype=torch.int64),
        "answer_start": torch.tensor(starts, dtype=torch.int64),
        "prompt_id": torch.tensor([p["id"] for p in chunk], dtype=torch.int64),
        "temperature": torch.tensor([p["temperature"] for p in chunk], dtype=torch.float32),
        "finished": torch.tensor([answers[i].finished for i in range(len(chunk))], dtype=torch.uint8),
        "topk_ids": torch.cat(top_ids).contiguous(),
        "topk_logprobs": torch.cat(top_lp).float().contiguous(),
    }


# -------------------------------------------------------------------------------------------------- load
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
        if _sha256(path) != digest:
            return f"{file}: checksum mismatch"
    return None


def load_self_data(root: str | os.PathLike, *, verify: bool = True) -> SelfData:
    """Load a built data set folder (checksums verified unless ``verify=False``)."""
    from safetensors.torch import load_file

    root = Path(root)
    manifest: dict[str, Any] = {}
    if verify:
        reason = check_self_data(root.name, root.parent)
        if reason is not None:
            raise FileNotFoundError(f"self data at {str(root)!r} is not complete or is damaged ({reason})")
        manifest = json.loads((root / MANIFEST).read_text())
    prompts = [json.loads(line) for line in (root / PROMPTS_FILE).read_text().splitlines() if line.strip()]
    shards = sorted(root.glob("answers_*.safetensors"))
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
        prompts=prompts,
        manifest=manifest,
    )
