"""Spec-Bench style end-to-end benchmark: speedup and MAT per category, every method in one run.

    python -m s2d_ext bench --family bench --limit 2           # the local nested family
    python -m s2d_ext bench --targets PATH [PATH ...] --draft PATH --exits 6,9,12   # real checkpoints
    python -m s2d_ext bench --target smollm2 --draft DRAFT --limit 3 --batch-sizes 1   # one real target

For every target and every setting (greedy / temperature 1, batch 1 / batch 8) it runs:

``generate``            plain ``target.generate`` (the baseline of every speedup);
``assisted``            transformers' assisted generation with the draft at full depth (batch 1 only:
                        transformers refuses larger batches);
``sd-exit<e>``          vanilla speculative decoding with the draft cut at exit ``e``;
``s2d-paper``           S2D with adaptive exits at the paper's thresholds (0.5, ..., 0.5, 0);
``s2d-calibrated``      S2D with the thresholds, draft length and policy ``Speculator.calibrate`` picked
                        on held-out prompts (not in the evaluated subset), per target and temperature;
                        its candidates include every fixed exit.

``--draft-vocab N`` gives every draft method (sd-exit*, s2d-*, not assisted) the same reduced draft
vocabulary: the N most frequent tokens of the family's training data.

With ``--target`` (one target: an HF folder, a GGUF file, or ``smollm2``) two baselines join them:

``pld``                 prompt-lookup decoding (``generate(prompt_lookup_num_tokens=...)``, Spec-Bench's PLD);
``truncation``          vanilla speculative decoding with the *untrained* first N layers of the model the
                        draft was cut from (N = the draft's depth; that model's own final norm and head):
                        what SoFT starts from. The draft's base when its checkpoint names one among the
                        targets (Qwen2.5-Coder-0.5B for a draft cut from it that serves the 1.5B too),
                        else each target's own layers.

MAT counts emitted tokens per target forward; for the transformers methods (``assisted``, ``pld``) the
target's forwards are counted with a hook.

Speedup is tokens/s over plain decoding of the same target, setting and category, measured in the same
run; every method runs on a prompt before the next prompt starts (``--rounds`` passes, alternating the
method order), so a drifting machine load reaches all methods alike. Results: ``<out>/spec_bench.json``,
``<out>/spec_bench.md`` and PNG plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from s2d_ext._machine import cpu_name

PAPER_THRESHOLD = 0.5
# A small grid keeps calibration to a few minutes on a CPU (every fixed exit is added to the thresholds,
# and each policy doubles the grid); pass a finer one on a GPU. NOTE: 1 is in it because on this CPU a
# verify of 4+ tokens costs 1.7x a decode step and of 2 tokens 1.2x (bench/results/forward_width_cpu.md),
# so with SmolLM2's low acceptance a fixed single draft token is the fastest setting.
CALIBRATION_DRAFT_LENGTHS = (1, 3, 5)
CALIBRATION_THRESHOLDS = (0.05, 0.2)
CALIBRATION_POLICIES = ("fixed", "heuristic")


# --------------------------------------------------------------------------------------------- data
def load_questions(path: Path, per_category: int | None, skip: int = 0) -> list[dict]:
    """Spec-Bench rows (question_id, category, turns), the first ``per_category`` of each category."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no questions")
    taken: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for row in rows:
        category = row["category"]
        seen[category] += 1
        if seen[category] <= skip:
            continue
        if per_category is None or taken[category] < per_category:
            taken[category] += 1
            chosen.append(row)
    return chosen


def encode_prompt(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """Chat template when the tokenizer has one (real chat checkpoints), plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        # NOTE: transformers 5 returns a BatchEncoding here (a mapping, not a dict): list() of it would be
        # its keys, "input_ids" and "attention_mask"
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    # NOTE: keep the prompt's end: that is where generation continues.
    return list(ids)[-max_prompt_tokens:]


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


# ---------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 resets the process's peak resident set size (VmHWM).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------- methods
@dataclass
class RunResult:
    """One method on one batch of prompts."""

    new_tokens: int
    seconds: float
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    exit_histogram: dict[int, int] = field(default_factory=dict)
    time_split: dict[str, float] = field(default_factory=dict)
    acceptance_by_position: list[float] = field(default_factory=list)  # P(draft j accepted | proposed)
    sequences: list[list[int]] = field(default_factory=list)


def _new_token_lists(sequences: torch.Tensor, prompt_width: int, pad_id: int | None) -> list[list[int]]:
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        if pad_id is not None:
            while row and row[-1] == pad_id:
                row.pop()
        rows.append(row)
    return rows


class count_forwards(contextlib.AbstractContextManager):
    """Counts ``model``'s forward calls (a forward hook) while the block runs: ``.calls``."""

    def __init__(self, model):
        self.model, self.calls, self._handle = model, 0, None

    def __enter__(self):
        def hook(*_):
            self.calls += 1

        self._handle = self.model.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def run_generate(target, input_ids, mask, settings, assistant=None, prompt_lookup=0) -> RunResult:
    kwargs = dict(max_new_tokens=settings["max_new_tokens"], pad_token_id=settings["pad_id"])
    if settings["ignore_eos"]:
        kwargs["eos_token_id"] = None
        kwargs["min_new_tokens"] = settings["max_new_tokens"]
    if settings["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=settings["temperature"], top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    if prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    device = target.get_input_embeddings().weight.device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), count_forwards(target) as forwards:
        out = target.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    rows = _new_token_lists(out.cpu(), input_ids.shape[1], settings["pad_id"])
    # NOTE: only drafting methods report MAT: plain decoding is 1 token per forward by construction.
    steps = forwards.calls if (assistant is not None or prompt_lookup) else 0
    return RunResult(new_tokens=sum(len(r) for r in rows), seconds=seconds, steps=steps, sequences=rows)


def run_speculate(
    target, draft, input_ids, mask, settings, thresholds=None, num_draft_tokens=5, draft_length="heuristic"
) -> RunResult:
    import s2d_ext

    device = target.get_input_embeddings().weight.device
    _sync(device)
    start = time.perf_counter()
    out = s2d_ext.speculate(
        target,
        draft,
        input_ids.to(device),
        mask.to(device),
        max_new_tokens=settings["max_new_tokens"],
        num_draft_tokens=num_draft_tokens,
        draft_length=draft_length,
        thresholds=thresholds,
        temperature=settings["temperature"],
        seed=settings["seed"],
        # NOTE: [] (no stop token), not None: None means "the target's generation_config EOS".
        eos_token_id=[] if settings["ignore_eos"] else settings["eos_id"],
        pad_token_id=settings["pad_id"],
        profile=True,  # NOTE: the report shows the draft / target / verify / other split
    )
    _sync(device)
    seconds = time.perf_counter() - start
    stats = out.stats
    rows = _new_token_lists(out.sequences.cpu(), input_ids.shape[1], settings["pad_id"])
    new_tokens = sum(stats.new_tokens)
    drafted, accepted = stats.draft_tokens, stats.accepted_tokens
    return RunResult(
        new_tokens=new_tokens,
        seconds=seconds,
        # NOTE: MAT is per row: a batched step is one target forward for each of its active rows.
        steps=round(sum(n / m for n, m in zip(stats.new_tokens, stats.mat_per_row) if m)),
        drafted=drafted,
        accepted=accepted,
        exit_histogram={int(k): int(v) for k, v in dict(stats.exit_histogram).items()},
        time_split={
            "draft": float(stats.time_draft),
            "target": float(stats.time_target),
            "verify": float(stats.time_verify),
            "other": float(stats.time_other),
        },
        acceptance_by_position=[float(a) for a in stats.acceptance_by_position],
        sequences=rows,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- models
def load_models(args) -> tuple:
    """(tokenizer, {target name: model}, SortedDraft, setup): ``setup`` holds the run's ``kernels``, ``dtype``
    and the line saying which and why (``dtype_line``), and with ``--target`` the targets' ``refs``."""
    from s2d_ext import SortedDraft

    dtype = getattr(torch, args.dtype) if args.dtype else None
    setup = {"kernels": "torch", "dtype": dtype, "dtype_line": None, "refs": {}}
    if getattr(args, "target", None):
        from s2d_ext import checkpoints, compute

        specs = args.target if isinstance(args.target, list) else [args.target]
        refs = [checkpoints.resolve_target(t, args.gguf_file) for t in specs]
        dtype, kernels, line = compute.choose(args.device, dtype, getattr(args, "kernels", None))
        setup.update(kernels=kernels, dtype=dtype, dtype_line=line, refs={ref.name: ref for ref in refs})
        tokenizer = checkpoints.load_tokenizer(refs[0])
        targets = {ref.name: checkpoints.load_target(ref, dtype=dtype, device=args.device) for ref in refs}
        exits = tuple(args.exits) if args.exits else None
        # NOTE: every target may lend the draft its embedding and head (the one it was cut from does).
        draft = checkpoints.load_draft(args.draft, list(targets.values()), exits=exits, dtype=dtype)
        for name, target in targets.items():
            size = int(target.get_output_embeddings().weight.shape[0])
            if size != draft.vocab_size:
                raise ValueError(
                    f"--target {name} has a vocabulary of {size} ids and --draft {args.draft} of "
                    f"{draft.vocab_size}: a draft serves targets that share its tokenizer"
                )
        return tokenizer, targets, draft, setup
    if args.targets:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.targets[0])
        targets = {}
        for path in args.targets:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=args.device_map)
            targets[Path(path).name] = model.eval()
        exits = tuple(args.exits) if args.exits else None
        n_vocab = getattr(args, "draft_vocab", None)
        if n_vocab:
            raise ValueError(
                "--draft-vocab N counts the family's training data; a checkpoint brings its own "
                "draft_vocab.safetensors (soft --draft-vocab N), or pass --draft-vocab 0 for none"
            )
        draft = SortedDraft.from_pretrained(
            args.draft, exits=exits, torch_dtype=dtype, draft_vocab=False if n_vocab == 0 else None
        )
        return tokenizer, targets, draft, setup
    from s2d_ext.train.family import family_draft_vocab, load_family

    tokenizer, targets, draft = load_family(args.family)
    if not isinstance(draft, SortedDraft):
        draft = SortedDraft.from_pretrained(draft)
    n_vocab = getattr(args, "draft_vocab", None)
    if n_vocab is not None:
        vocab = family_draft_vocab(args.family, n_vocab) if n_vocab > 0 else None
        draft = SortedDraft(draft.hf_model, draft.exits, draft.thresholds, draft_vocab=vocab)
    names = getattr(args, "target_names", None)
    if names:
        unknown = sorted(set(names) - set(targets))
        if unknown:
            raise ValueError(f"--target-names: the family has no {unknown} (it has {sorted(targets)})")
        targets = {name: model for name, model in targets.items() if name in names}
    return tokenizer, {name: model.eval() for name, model in targets.items()}, draft, setup


def methods_for(draft, batch_size: int, baselines: bool = False, setup: dict | None = None) -> list[str]:
    names = ["generate"]
    if setup and setup["kernels"] == "invariant":
        names.append("generate-invariant")
    if setup and setup["refs"] and setup["dtype"] != torch.float32:
        names.append("generate-fp32")
    if batch_size == 1:
        names.append("assisted")
        if baselines:
            names.append("pld")
    if baselines:
        names.append("truncation")
    names += [f"sd-exit{e}" for e in draft.exits]
    if len(draft.exits) > 1:
        names += ["s2d-paper", "s2d-calibrated"]
    return names


def paper_thresholds(draft) -> tuple[float, ...]:
    return (PAPER_THRESHOLD,) * (len(draft.exits) - 1) + (0.0,)


# ------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    from s2d_ext import SortedDraft, compute

    torch.manual_seed(args.seed)
    from s2d_ext._machine import DEFAULT_CPU_THREADS

    torch.set_num_threads(args.threads or DEFAULT_CPU_THREADS)
    load_start = os.getloadavg()
    tokenizer, targets, draft, setup = load_models(args)
    if setup["dtype_line"]:
        print(f"s2d bench: {setup['dtype_line']}")
    baselines = bool(getattr(args, "target", None))
    if args.methods:
        runnable = {m for b in args.batch_sizes for m in methods_for(draft, b, baselines, setup)}
        missing = [m for m in args.methods if m not in runnable]
        if missing:
            raise ValueError(
                f"--methods {missing[0]}: not a method of this run (it has {', '.join(sorted(runnable))}; "
                "assisted and pld run at batch size 1, pld and truncation with --target, generate-fp32 with "
                "--target in another dtype, generate-invariant with s2d's kernels)"
            )
    humaneval = getattr(args, "workload", "spec-bench") == "humaneval"
    if humaneval:
        from s2d_ext.bench import humaneval as he

        problems = he.load_problems(args.problems, stride=args.problem_stride)
        # NOTE: calibration takes the problems halfway between the evaluated ones (never one of them)
        held_out = he.load_problems(
            args.calibration_prompts, stride=args.problem_stride, offset=args.problem_stride // 2
        )
        questions = [
            {"question_id": p["task_id"], "category": "humaneval", "turns": [p["prompt"]]} for p in problems
        ]
        calibration = [{"turns": [p["prompt"]]} for p in held_out]
    else:
        problems = []
        questions = load_questions(args.data, args.limit)
        # NOTE: calibration prompts are held out: the next question of each category after the evaluated ones.
        calibration = load_questions(args.data, 1, skip=args.limit or 0)[: args.calibration_prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    # NOTE: HumanEval's prompts are code to complete (no chat template); Spec-Bench's are chat turns.
    encode = (
        (lambda text: raw_prompt(tokenizer, text, args.max_prompt_tokens))
        if humaneval
        else (lambda text: encode_prompt(tokenizer, text, args.max_prompt_tokens))
    )
    encoded = [encode(q["turns"][0]) for q in questions]
    calib_encoded = [encode(q["turns"][0]) for q in calibration]
    kernels = setup["kernels"]
    compute.apply_kernels(draft.hf_model, kernels)
    fixed_exit_drafts = {
        e: SortedDraft.truncate(
            draft.hf_model, e, exits=(e,), draft_vocab=draft.draft_vocab, share_embeddings=True
        )
        for e in draft.exits
    }
    assistant = load_assistant(args, targets, setup, draft)
    fp32_targets: dict = {}

    from tqdm.auto import tqdm

    records = []  # one per (target, setting, method, batch)
    calibrated = {}  # "target T=t" -> the settings calibrate() kept
    calibration_runs = {}  # "target T=t" -> every candidate it timed
    for target_name, target in targets.items():
        device = target.get_input_embeddings().weight.device
        fixed_exit_drafts.pop("truncation", None)
        base = targets.get(draft_base_name(args), target)
        if baselines and draft.num_layers <= base.config.num_hidden_layers:
            # NOTE: the untrained truncation keeps its model's own final norm and head (shared, no copy)
            truncation = SortedDraft.truncate(
                base, draft.num_layers, draft_vocab=draft.draft_vocab, share_embeddings=True
            )
            compute.apply_kernels(truncation.hf_model, kernels)
            fixed_exit_drafts["truncation"] = truncation
        compute.apply_kernels(target, kernels)  # NOTE: calibration and the speculative methods run on these
        for temperature in args.temperatures:
            for batch_size in args.batch_sizes:
                key = f"{target_name} T={temperature:g} B={batch_size}"
                if len(draft.exits) > 1:
                    compute.apply_kernels(target, kernels)
                    calibrated[key], calibration_runs[key] = _calibrate(
                        args, draft, target_name, target, calib_encoded, pad_id, temperature, batch_size
                    )
                settings = dict(
                    max_new_tokens=args.max_new_tokens,
                    temperature=temperature,
                    seed=args.seed,
                    pad_id=pad_id,
                    eos_id=tokenizer.eos_token_id,
                    ignore_eos=args.ignore_eos,
                    prompt_lookup=getattr(args, "prompt_lookup_tokens", 10),
                    kernels=kernels,
                )
                method_names = methods_for(draft, batch_size, baselines, setup)
                if "truncation" in method_names and "truncation" not in fixed_exit_drafts:
                    method_names.remove("truncation")
                if args.methods:
                    method_names = [m for m in method_names if m in args.methods or m == "generate"]
                batches = [
                    list(range(i, min(i + batch_size, len(encoded))))
                    for i in range(0, len(encoded), batch_size)
                ]
                label = f"{target_name} T={temperature} B={batch_size}"
                models = RunModels(
                    target, draft, fixed_exit_drafts, assistant, fp32_targets, setup, target_name
                )
                _warm_up(models, encoded[0], pad_id, settings, method_names)
                # NOTE: every method runs on a prompt before the next prompt starts, in an order that
                # alternates between rounds: on a shared machine the load drifts within minutes, and
                # running the methods one after another would hand each method its own load.
                runs = [(r, rows) for r in range(args.rounds) for rows in batches]
                for round_index, rows in tqdm(runs, desc=label, leave=False):
                    order = method_names if round_index % 2 == 0 else method_names[::-1]
                    input_ids, mask = left_pad([encoded[r] for r in rows], pad_id)
                    for method in order:
                        reset_peak_memory(device)
                        result = _run_method(method, models, input_ids, mask, settings, calibrated.get(key))
                        records.append(
                            dict(
                                target=target_name,
                                temperature=temperature,
                                batch_size=batch_size,
                                method=method,
                                kernels=method_kernels(method, kernels),
                                round=round_index,
                                rows=list(rows),
                                categories=[questions[r]["category"] for r in rows],
                                **{k: v for k, v in asdict(result).items() if k != "sequences"},
                                sequences=result.sequences if temperature == 0 or humaneval else [],
                                peak_memory_mib=peak_memory_mib(device),
                                load_1min=os.getloadavg()[0],
                                draft_exits=_draft_exits(method, draft),
                            )
                        )
                compute.apply_kernels(target, kernels)
    result = dict(
        machine=machine_description(targets),
        load_average={"start": load_start, "end": os.getloadavg(), "cores": os.cpu_count()},
        draft={"layers": draft.num_layers, "exits": list(draft.exits), "thresholds": list(draft.thresholds)},
        cost_model=cost_model(next(iter(targets.values())), draft),
        cost_models={name: cost_model(target, draft) for name, target in targets.items()},
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        run_settings={"kernels": kernels, "dtype": str(setup["dtype"]), "line": setup["dtype_line"]},
        workload="humaneval" if humaneval else "spec-bench",
        calibrated=calibrated,
        calibration=calibration_runs,
        draft_vocab=None if draft.draft_vocab is None else int(draft.draft_vocab.numel()),
        records=records,
    )
    if humaneval:
        result["problems"] = [p["task_id"] for p in problems]
        result["pass_at_1"] = he.pass_at_1_by_method(records, problems, tokenizer)
    return result


@dataclass
class RunModels:
    """The models one target's methods run: the target, the draft and its fixed-exit cuts, the assistant of
    ``assisted``, float32 copies of the targets (made on first use) and the run's setup."""

    target: Any
    draft: Any
    fixed_exit_drafts: dict
    assistant: Any
    fp32_targets: dict
    setup: dict
    target_name: str


def draft_base_name(args) -> str | None:
    """The target name of the model ``--draft`` was cut from, when its checkpoint records one (else None)."""
    from s2d_ext import checkpoints

    if not getattr(args, "draft", None):
        return None
    try:
        record = checkpoints.draft_shares_target(args.draft)
    except FileNotFoundError:
        return None
    return None if record is None else record.get("target_name")


def method_kernels(method: str, kernels: str) -> str:
    """The kernels ``method`` runs on: torch's for ``generate`` (the baseline as a user runs it) and
    ``generate-fp32``, s2d's for ``generate-invariant``, the run's for the rest."""
    if method in ("generate", "generate-fp32"):
        return "torch"
    if method == "generate-invariant":
        return "invariant"
    return kernels


def raw_prompt(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """``text`` as plain tokens (code completion: no chat template), its end kept."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])[-max_prompt_tokens:]


def load_assistant(args, targets: dict, setup: dict, draft):
    """The model ``assisted`` drafts with: ``--assistant`` (one of the targets when it names one), else the
    draft at full depth; on the run's kernels."""
    from s2d_ext import checkpoints, compute

    name = getattr(args, "assistant", None)
    if name is None:
        return draft.hf_model
    ref = checkpoints.resolve_target(name, flag="--assistant")
    model = targets.get(ref.name)
    if model is None:
        model = checkpoints.load_target(ref, dtype=setup["dtype"] or torch.float32, device=args.device)
    return compute.apply_kernels(model, setup["kernels"])


def _calibrate(args, draft, target_name, target, prompts, pad_id, temperature, batch_size):
    """Speculator.calibrate on the held-out prompts at this temperature and batch size: the settings it
    kept, and every candidate it timed."""
    from s2d_ext import Speculator

    spec = Speculator(draft, targets={target_name: target})
    ids, mask = left_pad(prompts, pad_id)
    found = spec.calibrate(
        target_name,
        ids,
        mask,
        max_new_tokens=min(32, args.max_new_tokens),
        num_draft_grid=getattr(args, "calibration_lengths", None) or CALIBRATION_DRAFT_LENGTHS,
        threshold_grid=getattr(args, "calibration_thresholds", None) or CALIBRATION_THRESHOLDS,
        draft_length_grid=getattr(args, "calibration_policies", None) or CALIBRATION_POLICIES,
        rounds=args.calibration_rounds,
        batch_size=batch_size,
        temperature=temperature,
        pad_token_id=pad_id,
        **({"eos_token_id": []} if args.ignore_eos else {}),
    )
    kept = {k: v for k, v in found.items() if k != "results"}
    candidates = [
        {
            "thresholds": r["thresholds"],
            "num_draft_tokens": r["num_draft_tokens"],
            "draft_length": r["draft_length"],
            "fixed_exit": r["fixed_exit"],
            "tokens_per_second": r["tokens_per_second"],
            "runs": len(r["timings"]),
            "spread": (min(r["timings"]), max(r["timings"])),
            "mat": r["mat"],
        }
        for r in found["results"]
    ]
    return kept, candidates


def _draft_exits(method: str, draft) -> list[int] | None:
    """The exits of the draft a method runs (None: a method without our draft's exit statistics)."""
    if method.startswith("sd-exit"):
        return [int(method[len("sd-exit") :])]
    if method == "truncation":
        return [draft.num_layers]
    if method.startswith("s2d-"):
        return list(draft.exits)
    return None


def cost_model(target, draft) -> dict:
    """Weights of the target's and the draft's LM heads in units of one decoder layer's (see the report)."""
    layer = sum(p.numel() for p in target.model.layers[0].parameters())
    hidden = target.config.hidden_size
    draft_rows = int(draft.draft_vocab.numel()) if draft.draft_vocab is not None else draft.vocab_size
    return {
        "target_layers": int(target.config.num_hidden_layers),
        "target_head_layers": target.get_output_embeddings().weight.shape[0] * hidden / layer,
        "draft_head_layers": draft_rows * hidden / layer,
    }


def _warm_up(models: RunModels, prompt, pad_id, settings, methods) -> None:
    """One short run of each kind of path, so one-time costs (allocations, kernel loads, the float32 copy)
    stay out of timings."""
    input_ids, mask = left_pad([prompt], pad_id)
    short = dict(settings, max_new_tokens=4)
    for method in dict.fromkeys(("generate", "generate-fp32", "generate-invariant", "s2d-paper")):
        if method in methods or method == "s2d-paper":
            _run_method(method, models, input_ids, mask, short, None)


def _run_method(method, models: RunModels, input_ids, mask, settings, calibrated) -> RunResult:
    from s2d_ext import compute

    kernels = method_kernels(method, settings["kernels"])
    target, draft = models.target, models.draft
    if method == "generate-fp32":
        fp32 = models.fp32_targets.get(models.target_name)
        if fp32 is None:
            from s2d_ext import checkpoints

            ref = models.setup["refs"][models.target_name]
            device = target.get_input_embeddings().weight.device
            fp32 = models.fp32_targets[models.target_name] = checkpoints.load_target(
                ref, dtype=torch.float32, device=device
            )
        return run_generate(compute.apply_kernels(fp32, "torch"), input_ids, mask, settings)
    if models.setup["refs"]:
        compute.apply_kernels(target, kernels)
    if method in ("generate", "generate-invariant"):
        return run_generate(target, input_ids, mask, settings)
    if method == "assisted":
        return run_generate(target, input_ids, mask, settings, assistant=models.assistant)
    if method == "pld":
        return run_generate(target, input_ids, mask, settings, prompt_lookup=settings["prompt_lookup"])
    if method == "truncation":
        return run_speculate(target, models.fixed_exit_drafts["truncation"], input_ids, mask, settings)
    if method.startswith("sd-exit"):
        return run_speculate(
            target, models.fixed_exit_drafts[int(method[len("sd-exit") :])], input_ids, mask, settings
        )
    if method == "s2d-paper":
        return run_speculate(target, draft, input_ids, mask, settings, thresholds=paper_thresholds(draft))
    if method == "s2d-calibrated":
        calibrated = calibrated or {}
        return run_speculate(
            target,
            draft,
            input_ids,
            mask,
            settings,
            thresholds=calibrated.get("thresholds"),
            num_draft_tokens=calibrated.get("num_draft_tokens", 5),
            draft_length=calibrated.get("draft_length", "heuristic"),
        )
    raise ValueError(f"unknown method {method!r}")


def machine_description(targets) -> dict:
    device = next(iter(targets.values())).get_input_embeddings().weight.device
    described = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
        cpu=cpu_name(),
        threads=torch.get_num_threads(),
        device=str(device),
    )
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    import transformers

    described["transformers"] = transformers.__version__
    return described
