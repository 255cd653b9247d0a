"""``python -m s2d_ext soft``: SoFT (sorted fine-tuning) of a Llama model (:mod:`s2d_ext.train.soft`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2d_ext.cli import UsageError
from s2d_ext.cli._common import (
    DTYPES,
    add_runtime_args,
    apply_runtime,
    checkpoint_folder,
    float_list,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    torch_dtype,
)
from s2d_ext.packaged_models import ALIASES_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "soft",
        help="sorted fine-tuning of a (truncated) Llama-family model",
        description="Sorted fine-tuning: loss = mean over exits of next-token cross-entropy through the "
        "shared final norm and lm_head (+ optional KL toward targets). Writes an HF checkpoint with "
        "config.s2d_exits and config.s2d_thresholds (loadable by SortedDraft.from_pretrained) plus "
        "soft_state.pt for --resume.",
    )
    parser.add_argument(
        "--base",
        required=True,
        help=f"model to cut the draft from: an HF checkpoint folder (with its tokenizer), a .gguf file, "
        f"or {ALIASES_HELP}",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --base folder")
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="keep the first N layers of the base (default: all)"
    )
    parser.add_argument(
        "--exits",
        type=int_list,
        default=None,
        help="exits as layer counts, e.g. 6,9,12 (last == --layers; default: the base's s2d_exits "
        "or the last layer)",
    )
    parser.add_argument(
        "--thresholds",
        type=float_list,
        default=None,
        help="exit thresholds saved in the checkpoint (default: 0.5 ..., 0)",
    )
    parser.add_argument("--data", default=None, help="training text: plain text or JSONL with a text field")
    parser.add_argument(
        "--self-data",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="train on text the base writes itself (Magpie and stdlib docstring prompts, "
        "its answers and distributions; built or resumed first, cached as NAME, default the base's name); "
        "the draft keeps the base's embedding and head, shared and frozen",
    )
    parser.add_argument("--self-data-dir", default=None, help="self-data cache root (~/.cache/s2d_ext)")
    parser.add_argument(
        "--teacher-data",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="train on the standard library's source scored by --teachers (teacher forcing: each teacher's "
        "top-32 next-token distribution at every position; built or resumed first, cached as NAME, default "
        "stdlib-<base>); the draft keeps the base's embedding and head, shared and frozen",
    )
    parser.add_argument(
        "--teachers",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=None,
        metavar="REF[,REF...]",
        help="--teacher-data: the targets to distil toward, e.g. qwen-coder-0.5b,qwen-coder-1.5b (default: "
        "--base); same tokenizer as --base",
    )
    parser.add_argument(
        "--teacher-tokens",
        type=positive_int,
        default=40960,
        help="--teacher-data: scored tokens (40960; windows of --seq-len)",
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=DTYPES,
        default="float32",
        help="--teacher-data: the teachers' dtype while they score (float32: the fast CPU GEMM here)",
    )
    parser.add_argument(
        "--teacher-minutes",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="--teacher-data: start no new shard after this long and train on the shards built (the same "
        "command later resumes the rest)",
    )
    parser.add_argument("--teacher-data-dir", default=None, help="teacher-data cache root (~/.cache/s2d_ext)")
    parser.add_argument(
        "--self-data-prompts",
        type=positive_int,
        default=1536,
        help="--self-data: prompts to write, half Magpie, half docstrings (1536; before filtering)",
    )
    parser.add_argument(
        "--self-data-answer-tokens",
        type=positive_int,
        default=192,
        help="--self-data: answer length cap in tokens (192)",
    )
    parser.add_argument(
        "--kl-weight", type=non_negative_float, default=1.0, help="--self-data: weight of the KL term (1.0)"
    )
    parser.add_argument(
        "--heldout", type=non_negative_int, default=48, help="--self-data: sequences held out (48)"
    )
    parser.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="--self-data: held-out evaluation every N steps",
    )
    parser.add_argument(
        "--norm-lr-scale",
        type=positive_float,
        default=1.0,
        help="--self-data: learning-rate multiplier of the norm weights (1.0)",
    )
    parser.add_argument(
        "--autocast",
        choices=("bfloat16", "float16", "none"),
        default="none",
        help="mixed-precision training (bfloat16: ~3x faster on CPUs with AMX and on GPUs)",
    )
    parser.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="stop training (saved, resumable with --resume) once it has trained this long; building "
        "--self-data first is not counted (it is cached and reported apart)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="--self-data: copy the shared embedding and head into the checkpoint (default: referenced)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--out", required=True, help="output folder (absent, empty, or a SoFT checkpoint)")
    parser.add_argument("--resume", action="store_true", help="continue the SoFT checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a SoFT checkpoint in --out")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per block (256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="blocks per micro-batch (8)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (1)")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (100)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="warm-up steps (10)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="0 disables (1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=non_negative_int, default=0, help="checkpoint every N steps")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="use at most N data tokens")
    parser.add_argument(
        "--distill-target",
        action="append",
        default=[],
        metavar="PATH",
        help="target checkpoint to distil from (repeatable; same tokenizer)",
    )
    parser.add_argument(
        "--distill-weight",
        type=non_negative_float,
        action="append",
        default=[],
        metavar="W",
        help="weight of each --distill-target's KL term (one value, or one per target; 1.0)",
    )
    parser.add_argument("--distill-temperature", type=positive_float, default=1.0)
    parser.add_argument(
        "--exit-weights",
        type=float_list,
        default=None,
        help="weight of each exit's loss, one per exit, e.g. 0.2,0.3,0.5 (default: equal)",
    )
    parser.add_argument(
        "--ce-weight", type=non_negative_float, default=1.0, help="weight of the CE term (1.0)"
    )
    parser.add_argument(
        "--draft-vocab",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also save the N most frequent data tokens as the draft vocabulary (draft_vocab.safetensors)",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser


def _check_args(args) -> tuple[float, ...]:
    """Cheap checks before any model is loaded. Returns the per-target distillation weights."""
    from s2d_ext.checkpoints import resolve_target
    from s2d_ext.train.soft import prepare_output_dir

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if sum(x is not None for x in (args.data, args.self_data, args.teacher_data)) != 1:
        raise UsageError("give exactly one of --data FILE, --self-data and --teacher-data")
    if args.teachers is not None and args.teacher_data is None:
        raise UsageError("--teachers needs --teacher-data")
    resolve_target(args.base, args.gguf_file, flag="--base")
    for teacher in args.teachers or ():
        resolve_target(teacher, flag="--teachers")
    for path in args.distill_target:
        checkpoint_folder("--distill-target", path)
    if args.self_data is not None or args.teacher_data is not None:
        if args.distill_target:
            which = (
                "--self-data distils toward --base itself"
                if args.self_data is not None
                else ("--teacher-data distils toward --teachers")
            )
            raise UsageError(f"{which}; drop --distill-target")
    else:
        data = Path(args.data)
        if not data.is_file():
            raise FileNotFoundError(f"--data {args.data!r} does not exist")
        if data.stat().st_size == 0:
            raise ValueError(f"--data {args.data!r} is empty")
    prepare_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    weights = tuple(args.distill_weight) or (1.0,)
    n_targets = len(args.distill_target)
    if args.distill_weight and not n_targets:
        raise UsageError("--distill-weight needs --distill-target")
    if len(weights) == 1:
        weights = weights * n_targets
    elif len(weights) != n_targets:
        raise UsageError(f"{len(weights)} --distill-weight values for {n_targets} --distill-target paths")
    return weights


def _layers_and_exits(args, config) -> tuple[int, tuple[int, ...]]:
    from s2d_ext.train import soft

    base_layers = int(config.num_hidden_layers)
    layers = args.layers if args.layers is not None else (args.exits[-1] if args.exits else base_layers)
    if layers > base_layers:
        raise ValueError(f"--layers {layers} does not fit the base model's {base_layers} layers")
    exits = args.exits
    if exits is None:
        saved = getattr(config, "s2d_exits", None)
        exits = tuple(saved) if saved and saved[-1] == layers else (layers,)
    try:
        exits = soft.validate_exits(exits, layers, name="--exits")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.thresholds is not None and len(args.thresholds) != len(exits):
        raise UsageError(f"--thresholds has {len(args.thresholds)} values for {len(exits)} exits")
    weights = args.exit_weights
    if weights is not None and (len(weights) != len(exits) or min(weights) < 0 or not sum(weights)):
        raise UsageError(f"--exit-weights needs {len(exits)} weights >= 0, not all 0, got {weights}")
    return layers, exits


def _soft_config(args, exits, distill_weights, extra):
    from s2d_ext.train import soft

    return soft.SoftConfig(
        exits=exits,
        thresholds=args.thresholds,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        ce_weight=args.ce_weight,
        distill_weights=distill_weights,
        distill_temperature=args.distill_temperature,
        save_every=args.save_every,
        draft_vocab=args.draft_vocab,
        norm_lr_scale=getattr(args, "norm_lr_scale", 1.0),
        exit_weights=args.exit_weights,
        extra=extra,
    )


def run(args) -> int:
    distill_weights = _check_args(args)
    apply_runtime(args)

    from transformers import AutoModelForCausalLM

    from s2d_ext import checkpoints
    from s2d_ext.train import soft

    ref = checkpoints.resolve_target(args.base, args.gguf_file, flag="--base")
    dtype = torch_dtype(args.dtype)
    if args.self_data is not None:
        return _run_self_data(args, ref, dtype)
    if args.teacher_data is not None:
        return _run_teacher_data(args, ref, dtype)
    try:
        tokenizer = checkpoints.load_tokenizer(ref)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise FileNotFoundError(f"--base {args.base!r} holds no usable tokenizer ({exc})") from None
    base = checkpoints.load_target(ref, dtype=dtype, device=args.device)
    layers, exits = _layers_and_exits(args, base.config)
    texts = soft.load_texts(args.data, args.text_field)
    blocks = soft.tokenize_blocks(texts, tokenizer, args.seq_len, max_tokens=args.max_tokens)
    print(f"data: {blocks.numel():,} tokens in {blocks.shape[0]} blocks of {blocks.shape[1]}")
    base_layers = int(base.config.num_hidden_layers)
    model = base if layers == base_layers else soft.truncate_model(base, layers, exits, args.thresholds)
    del base
    targets = [
        AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(args.device).eval()
        for p in args.distill_target
    ]
    extra = {"base": str(args.base), "data": str(args.data), "distill_targets": list(args.distill_target)}
    cfg = _soft_config(args, exits, distill_weights, extra)
    result = soft.train_soft(
        model,
        blocks,
        cfg,
        targets=targets,
        out_dir=args.out,
        tokenizer=tokenizer,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    last = result.history[-1] if result.history else None
    ce = " ".join(f"exit {e}: {c:.3f}" for e, c in zip(exits, last["ce"])) if last else "n/a"
    print(f"saved {args.out} after {result.step} steps ({result.tokens_seen:,} tokens); last CE {ce}")
    return 0


def _run_self_data(args, ref, dtype) -> int:
    """SoFT on text the base writes itself: build (or resume) the data, cut the draft, train, save."""
    import time

    from s2d_ext import checkpoints
    from s2d_ext.train import self_data

    tokenizer = checkpoints.load_tokenizer(ref)
    target = checkpoints.load_target(ref, dtype=dtype, device=args.device)
    layers, exits = _layers_and_exits(args, target.config)
    spec = self_data.SelfDataSpec(
        name=args.self_data or ref.name,
        magpie_prompts=args.self_data_prompts // 2,
        docstring_prompts=args.self_data_prompts - args.self_data_prompts // 2,
        max_new_tokens=args.self_data_answer_tokens,
        seed=args.seed,
    )
    fingerprint = checkpoints.checkpoint_fingerprint(ref)
    t0 = time.perf_counter()
    root = self_data.build_self_data(
        target, tokenizer, spec, fingerprint, args.self_data_dir, progress=not args.no_progress
    )
    data_seconds = time.perf_counter() - t0
    extra = {"self_data": str(root)}
    return _train_on_cached_data(args, ref, tokenizer, target, layers, exits, root, data_seconds, extra)


def _run_teacher_data(args, ref, dtype) -> int:
    """SoFT on standard-library source scored by --teachers: build (or resume) the data, cut the draft from
    --base, train toward the teachers' mean KL, save."""
    import gc
    import time

    from s2d_ext import checkpoints
    from s2d_ext.train import teacher_data

    # NOTE: --teacher-minutes counts from here: a budget already spent loads no teacher at all.
    deadline = None if args.teacher_minutes is None else time.perf_counter() + args.teacher_minutes * 60
    tokenizer = checkpoints.load_tokenizer(ref)
    target = checkpoints.load_target(ref, dtype=dtype, device=args.device)
    layers, exits = _layers_and_exits(args, target.config)
    teacher_refs = [checkpoints.resolve_target(t, flag="--teachers") for t in (args.teachers or (args.base,))]
    vocab = int(target.get_output_embeddings().weight.shape[0])
    spec = teacher_data.TeacherDataSpec(
        name=args.teacher_data or f"stdlib-{ref.name}", max_tokens=args.teacher_tokens, seq_len=args.seq_len,
        seed=args.seed,
    )  # fmt: skip
    fingerprints = {t.describe(): checkpoints.checkpoint_fingerprint(t) for t in teacher_refs}
    teacher_dtype = torch_dtype(args.teacher_dtype)
    t0 = time.perf_counter()
    root = teacher_data.teacher_data_dir(spec.name, args.teacher_data_dir)
    teachers = {}
    from s2d_ext.train.self_data import check_self_data

    incomplete = check_self_data(root.name, root.parent, fingerprint=spec.fingerprint(fingerprints))
    if incomplete is not None and (deadline is None or time.perf_counter() < deadline):
        for t in teacher_refs:
            # NOTE: the base in the teachers' dtype is one of them already: no second copy in memory.
            same = t.describe() == ref.describe() and teacher_dtype == dtype and args.device == "cpu"
            teachers[t.describe()] = (
                target if same else checkpoints.load_target(t, dtype=teacher_dtype, device=args.device)
            )
            size = int(teachers[t.describe()].get_output_embeddings().weight.shape[0])
            if size != vocab:
                raise ValueError(
                    f"--teachers {t.describe()} has a vocabulary of {size} ids and --base {args.base} of "
                    f"{vocab}: a draft serves targets that share its tokenizer"
                )
    else:
        teachers = {name: None for name in fingerprints}
    shards = teacher_data.build_teacher_data(
        teachers,
        tokenizer,
        spec,
        fingerprints,
        args.teacher_data_dir,
        progress=not args.no_progress,
        max_seconds=None if deadline is None else deadline - time.perf_counter(),
    )
    if not shards:
        raise ValueError("--teacher-minutes ran out before the first shard of teacher data was built")
    # NOTE: the teachers (7 GB for Qwen2.5-Coder-1.5B in float32) leave memory before training starts.
    teachers.clear()
    del teachers
    gc.collect()
    data_seconds = time.perf_counter() - t0
    extra = {"teacher_data": str(root), "teachers": list(fingerprints)}
    # NOTE: the draft vocabulary is counted on the whole standard library (millions of tokens), not only the
    # scored windows (tens of thousands): ids that never occur in them still come up when the draft runs.
    return _train_on_cached_data(
        args, ref, tokenizer, target, layers, exits, root, data_seconds, extra,
        vocab_counts=lambda vocab_size: teacher_data.stdlib_token_counts(tokenizer, vocab_size),
        shards=shards,
    )  # fmt: skip


def _train_on_cached_data(
    args, ref, tokenizer, target, layers, exits, root, data_seconds, extra, vocab_counts=None, shards=None
) -> int:
    """Cut the draft from ``target``, train it on the cached data set at ``root`` (self-written or teacher-
    forced: :class:`~s2d_ext.train.self_data.SelfData`), save it. ``vocab_counts(V)``: the token counts a
    draft vocabulary is chosen by (default: the answers trained on)."""
    from s2d_ext import checkpoints
    from s2d_ext.train import self_data, soft

    data = self_data.load_self_data(root, shards=shards)
    n = data.num_sequences
    if args.heldout >= n:
        raise ValueError(f"--heldout {args.heldout} leaves nothing to train on ({n} sequences)")
    # NOTE: the prompts are shuffled when the data set is built, so the last ones are a fair held-out set.
    train_idx, heldout_idx = list(range(n - args.heldout)), list(range(n - args.heldout, n))
    print(
        f"data: {n} answers ({data.num_answer_tokens:,} answer tokens) at {root}; "
        f"training on {len(train_idx)}, {len(heldout_idx)} held out"
    )
    draft = soft.cut_draft(target, layers, exits, args.thresholds)
    draft_vocab = None
    if args.draft_vocab:
        from s2d_ext.draft.draft_vocab import most_frequent_tokens, save_draft_vocab

        vocab_size = int(target.get_output_embeddings().weight.shape[0])
        if args.draft_vocab > vocab_size:
            raise ValueError(f"--draft-vocab {args.draft_vocab} exceeds the --base vocabulary ({vocab_size})")
        # NOTE: counted on the answers trained on (never the held-out ones): what the draft has to predict
        counts = data.answer_tokens(train_idx) if vocab_counts is None else vocab_counts(vocab_size)
        draft_vocab = most_frequent_tokens(counts, vocab_size, args.draft_vocab)
        source = "answer" if vocab_counts is None else "standard-library"
        print(f"draft vocabulary: the {args.draft_vocab} most frequent {source} tokens")
    cfg = _soft_config(
        args,
        exits,
        (),
        {
            "base": ref.describe(),
            **extra,
            "data_fingerprint": data.manifest.get("fingerprint"),
            "data_shards": n,
        },
    )
    # NOTE: the budget is the training's: the data is built once and cached (on the 2-core CPU SmolLM2
    # writes its 1362 answers in about 66 minutes), and a budget that counted it would leave a first run
    # nothing to train with.
    remaining = None if args.time_budget is None else args.time_budget * 60

    def save(model, folder):
        checkpoints.save_draft(model, folder, target_ref=ref, standalone=args.standalone)
        tokenizer.save_pretrained(folder)
        if draft_vocab is not None:
            save_draft_vocab(folder, draft_vocab)

    result = soft.train_soft_self_data(
        draft,
        data,
        cfg,
        train_indices=train_idx,
        heldout_indices=heldout_idx,
        draft_vocab=draft_vocab,
        kl_weight=args.kl_weight,
        autocast=None if args.autocast == "none" else args.autocast,
        max_seconds=remaining,
        eval_every=args.eval_every,
        save_fn=save,
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    record = soft.read_training_record(args.out)
    last = record.get("evals", [{}])[-1]
    agree = " ".join(f"exit {e}: {a:.3f}" for e, a in zip(exits, last.get("agreement", [])))
    status = "finished" if result.step >= args.steps else "stopped by --time-budget (continue with --resume)"
    print(
        f"saved {args.out} after {result.step}/{args.steps} steps, {status}; data {data_seconds:.0f} s, "
        f"training {record['train_seconds']:.0f} s; held-out top-1 agreement with the base: {agree or 'n/a'}"
    )
    return 0
