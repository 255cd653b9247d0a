"""Building (or resuming) a self-written data set: prompts, then answers, in checksummed shards."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from s2d_ext.train.self_data.cache import Progress, atomic_write, shard_generator
from s2d_ext.train.self_data.decoding import Decoded, decode_batch
from s2d_ext.train.self_data.load import check_self_data, load_self_data
from s2d_ext.train.self_data.prompts import (
    answer_stop_ids,
    chat_prompt_ids,
    docstring_prompts,
    evaluation_prompts,
    normalize_prompt,
    user_header,
)
from s2d_ext.train.self_data.spec import FORMAT_VERSION, MANIFEST, PROMPTS_FILE, SelfDataSpec, self_data_dir


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
    state = Progress(root, fingerprint)
    stop_ids = answer_stop_ids(tokenizer, target)
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
                generator = shard_generator(spec.seed, "magpie", shard)
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
                state.record(name, atomic_write(root / name, lambda tmp, p=payload: tmp.write_text(p)))
                if on_file:
                    on_file(name)
            turns += json.loads((root / name).read_text())
            bar.update(1)
        bar.close()

        # 2. the prompt list: docstrings + filtered Magpie turns, shuffled, temperatures assigned
        if not state.valid(PROMPTS_FILE):
            prompts = _select_prompts(spec, tokenizer, turns)
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
            state.record(PROMPTS_FILE, atomic_write(root / PROMPTS_FILE, lambda tmp: tmp.write_text(lines)))
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

                digest = atomic_write(root / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
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
    atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))
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
    generator = shard_generator(spec.seed, "answers", shard)
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
