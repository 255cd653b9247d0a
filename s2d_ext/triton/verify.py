"""Triton verify kernel, registered as ``torch.ops.s2d.verify_triton`` (same arguments as
``torch.ops.s2d.verify``; spec: :mod:`s2d_ext.ops.verify_reference`).

Three launches, never materialising probabilities:

1. ``_position_stats_kernel``, grid (B, K+1): one program per (row, position) up to the row's
   bonus position streams the logits once: max / sum-exp of the processed scores, the smallest
   argmax, and p(draft token). Positions are independent, so they all run in parallel (a GPU
   has no reason to wait for the previous position's accept test).
2. ``_race_kernel``, grid (B, chunks): every program replays the row's accept decisions from the
   stats (K Philox draws, cheap), then runs stage 1 of the two-level exponential race
   (``verify_reference.exponential_race``) over its vocabulary chunk at the emitting position: the
   sums of the weights over blocks of ``RACE_BLOCK`` = 64 ids, one Philox draw per block (stream
   ``STREAM_SAMPLE | STREAM_BLOCK_FLAG``, index = block number), and the chunk's best
   (key, block) for the residual race and for the plain-p race, plus whether any residual block
   sum is > 0. A chunk is a multiple of 64 ids, so no block straddles two chunks.
3. ``_finish_kernel``, grid (B): merges the chunks (ties to the smallest block), picks the
   residual race unless its mass is all zero (then p), runs stage 2 (the per-id race, stream
   ``STREAM_SAMPLE``, index = id) over the 64 ids of the winning block, weights recomputed from
   the logits at the emitting position exactly as in stage 1, and writes the outputs.

Every intermediate buffer's shape depends only on the input shapes and the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from s2d_ext.triton.philox import STREAM_ACCEPT, STREAM_BLOCK_FLAG, STREAM_SAMPLE, philox_uniform

# NOTE: tl.constexpr, not plain floats: compiled Triton (3.9 checked) refuses non-constexpr globals in
# @jit functions; the interpreter does not check, so the CPU tests cannot catch it.
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
RACE_MAX_UNIFORM = tl.constexpr(0.99999994039535522)  # 1 - 2**-24, see verify_reference.exponential_race
RACE_BLOCK = tl.constexpr(64)  # ids per block of the race's first stage (verify_reference.RACE_BLOCK)
STREAM_SAMPLE_BLOCK = tl.constexpr(STREAM_SAMPLE.value | STREAM_BLOCK_FLAG.value)


@triton.jit
def _processed_scores(logits, divisor, min_logit):
    """logits / T, NaN -> -inf, +inf -> float32 max, below min_logit -> -inf (float32)."""
    s = logits.to(tl.float32)
    # NOTE: an IEEE division (div_rn), as in the reference and the C++/CUDA kernels: Triton's `/` is
    # approximate on a GPU, and the top-k/top-p threshold is itself a processed score, so a score one
    # ulp low dropped the boundary token (seen on an H100: bf16, top-k 10, T = 1.3). A divisor of 1
    # (greedy rows, T = 1) divides exactly, so it is skipped.
    if divisor != 1.0:
        s = tl.math.div_rn(s, divisor)
    s = tl.where(s != s, float("-inf"), s)
    s = tl.where(s == float("inf"), FLOAT32_MAX, s)
    return tl.where(s < min_logit, float("-inf"), s)


@triton.jit
def _row_setup(
    temperature_ptr,
    min_logit_ptr,
    num_draft_ptr,
    row,
    position,
    positions,
    num_spec,
    HAS_MIN_LOGIT: tl.constexpr,
):
    temperature = tl.load(temperature_ptr + row)
    greedy = ~(temperature > 0.0)
    divisor = tl.where(greedy, 1.0, temperature)
    min_logit = float("-inf")
    if HAS_MIN_LOGIT:
        threshold = tl.load(min_logit_ptr + row * positions + position)
        min_logit = tl.where(greedy, float("-inf"), threshold)
    num_draft = tl.load(num_draft_ptr + row)
    num_draft = tl.minimum(tl.maximum(num_draft, 0), num_spec)
    return greedy, divisor, min_logit, num_draft


@triton.jit
def _position_stats_kernel(
    logits_ptr,  # [B, K+1, V]
    tokens_ptr,  # [B, K] int64
    temperature_ptr,  # [B] f32
    min_logit_ptr,  # [B, K+1] f32 (or a dummy)
    num_draft_ptr,  # [B] int64
    stats_ptr,  # [B, K+1, 3] f32 out: max, sum-exp, p(draft token)
    argmax_ptr,  # [B, K+1] int32 out
    vocab,
    num_spec,
    HAS_MIN_LOGIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    position = tl.program_id(1).to(tl.int64)
    positions = num_spec + 1
    greedy, divisor, min_logit, num_draft = _row_setup(
        temperature_ptr, min_logit_ptr, num_draft_ptr, row, position, positions, num_spec, HAS_MIN_LOGIT
    )
    if position <= num_draft:
        base = logits_ptr + (row * positions + position) * vocab
        running_max = float("-inf")
        running_sum = 0.0
        best_index = 0
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
            s = _processed_scores(x, divisor, min_logit)
            s = tl.where(cols < vocab, s, float("-inf"))
            block_max = tl.max(s, axis=0)
            block_index = tl.min(tl.where(s == block_max, cols, vocab), axis=0)
            best_index = tl.where(block_max > running_max, block_index, best_index)
            new_max = tl.maximum(running_max, block_max)
            # NOTE: subtract a finite max so that -inf - -inf never makes a NaN.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            scale = tl.exp(running_max - safe_max)
            terms = tl.exp(s - safe_max)
            running_sum = running_sum * scale + tl.sum(terms, axis=0)
            running_max = new_max
        dead = running_max == float("-inf")
        best_index = tl.where(dead, 0, best_index)
        p_token = 0.0
        if position < num_draft:
            token = tl.load(tokens_ptr + row * num_spec + position)
            valid = (token >= 0) & (token < vocab)
            safe_token = tl.where(valid, token, 0)
            x_token = tl.load(base + safe_token)
            s_token = _processed_scores(x_token, divisor, min_logit)
            finite_max = tl.where(dead, 0.0, running_max)
            finite_sum = tl.where(dead, 1.0, running_sum)
            p_live = tl.where(s_token == float("-inf"), 0.0, tl.exp(s_token - finite_max) / finite_sum)
            p_token = tl.where(dead, 1.0 / vocab, p_live)
            p_token = tl.where(valid, p_token, 0.0)
        out = stats_ptr + (row * positions + position) * 3
        tl.store(out, running_max)
        tl.store(out + 1, tl.where(dead, vocab * 1.0, running_sum))
        tl.store(out + 2, p_token)
        tl.store(argmax_ptr + row * positions + position, best_index.to(tl.int32))


@triton.jit
def _emit_position(
    tokens_ptr,
    draft_probs_ptr,
    stats_ptr,
    argmax_ptr,
    seed,
    offset,
    greedy,
    row,
    num_draft,
    vocab,
    num_spec,
    HAS_Q: tl.constexpr,
):
    """Replays the accept tests: the first rejected position, or num_draft if all accepted."""
    positions = num_spec + 1
    emit = num_draft
    for j in range(0, num_spec):
        still = (j < num_draft) & (emit == num_draft)
        token = tl.load(tokens_ptr + row * num_spec + j)
        valid = (token >= 0) & (token < vocab)
        p_token = tl.load(stats_ptr + (row * positions + j) * 3 + 2, mask=still, other=0.0)
        q_token = 1.0
        if HAS_Q:
            q_token = tl.load(
                draft_probs_ptr + (row * num_spec + j) * vocab + tl.where(valid, token, 0),
                mask=still & valid,
                other=1.0,
            )
        u = philox_uniform(seed, offset, STREAM_ACCEPT, j, 0)
        accept_sampled = valid & (u * q_token < p_token)
        argmax = tl.load(argmax_ptr + row * positions + j, mask=still, other=-1)
        accept_greedy = token == argmax.to(tl.int64)
        accept = tl.where(greedy, accept_greedy, accept_sampled)
        emit = tl.where(still & ~accept, j, emit)
    return emit


@triton.jit
def _row_decision(
    tokens_ptr,
    draft_probs_ptr,
    temperature_ptr,
    num_draft_ptr,
    seeds_ptr,
    offsets_ptr,
    stats_ptr,
    argmax_ptr,
    row,
    vocab,
    num_spec,
    HAS_Q: tl.constexpr,
):
    """A row's settings (greedy, num_draft clamped to 0..K, Philox seed and offset) and its
    emitting position, as the race and finish kernels both need them."""
    greedy = ~(tl.load(temperature_ptr + row) > 0.0)
    num_draft = tl.minimum(tl.maximum(tl.load(num_draft_ptr + row), 0), num_spec)
    seed = tl.load(seeds_ptr + row)
    offset = tl.load(offsets_ptr + row)
    emit = _emit_position(
        tokens_ptr,
        draft_probs_ptr,
        stats_ptr,
        argmax_ptr,
        seed,
        offset,
        greedy,
        row,
        num_draft,
        vocab,
        num_spec,
        HAS_Q,
    )
    return greedy, num_draft, seed, offset, emit


@triton.jit
def _emit_setup(
    logits_ptr,
    tokens_ptr,
    draft_probs_ptr,
    temperature_ptr,
    min_logit_ptr,
    num_draft_ptr,
    stats_ptr,
    row,
    emit,
    num_draft,
    vocab,
    num_spec,
    HAS_Q: tl.constexpr,
    HAS_MIN_LOGIT: tl.constexpr,
):
    """What the race needs to recompute the weights of any id at the emitting position.

    Returns (divisor, min_logit, recovered, dead, safe_max, running_sum, drop, logits row
    pointer, q row pointer). ``drop`` is the point-mass draft token removed from p (argmax
    drafting, recovered, token in range) or -1.
    """
    positions = num_spec + 1
    _, divisor, min_logit, _ = _row_setup(
        temperature_ptr, min_logit_ptr, num_draft_ptr, row, emit, positions, num_spec, HAS_MIN_LOGIT
    )
    recovered = emit < num_draft
    stats = stats_ptr + (row * positions + emit) * 3
    running_max = tl.load(stats)
    running_sum = tl.load(stats + 1)
    dead = running_max == float("-inf")
    safe_max = tl.where(dead, 0.0, running_max)  # no -inf - -inf NaN where the position is dead
    drop = tl.full((), -1, tl.int64)
    if not HAS_Q:
        draft_position = tl.minimum(emit, num_spec - 1)
        token = tl.load(tokens_ptr + row * num_spec + draft_position, mask=recovered, other=-1)
        drop = tl.where(recovered & (token >= 0) & (token < vocab), token, -1).to(tl.int64)
    base = logits_ptr + (row * positions + emit) * vocab
    q_base = draft_probs_ptr + (row * num_spec + tl.minimum(emit, num_spec - 1)) * vocab
    return divisor, min_logit, recovered, dead, safe_max, running_sum, drop, base, q_base


@triton.jit
def _race_weights(
    base,
    q_base,
    cols,
    in_range,
    divisor,
    min_logit,
    recovered,
    dead,
    safe_max,
    running_sum,
    drop,
    vocab,
    HAS_Q: tl.constexpr,
):
    """The race weights of ids ``cols``: (p, residual), both 0 where ``~in_range``.

    The residual is max(0, p - q) (draft_probs given), p without ``drop`` (argmax drafting), and
    p itself where the position is a bonus (then q is not read and ``drop`` is -1).
    """
    x = tl.load(base + cols, mask=in_range, other=float("-inf"))
    s = _processed_scores(x, divisor, min_logit)
    p_live = tl.where(s == float("-inf"), 0.0, tl.exp(s - safe_max) / running_sum)
    p = tl.where(dead, 1.0 / vocab, p_live)
    # NOTE: zero outside the range explicitly: a dead position makes p uniform everywhere, and
    # the block sums must only add real ids.
    p = tl.where(in_range, p, 0.0)
    if HAS_Q:
        # NOTE: the interpreter rejects a tensor & scalar-bool mask; broadcast explicitly.
        q_mask = in_range & ((cols * 0 + recovered.to(tl.int32)) > 0)
        q = tl.load(q_base + cols, mask=q_mask, other=0.0)
        diff = p - q
        residual = tl.where(diff > 0.0, diff, 0.0)
    else:
        residual = tl.where(cols == drop, 0.0, p)
    return p, residual


@triton.jit
def _race_kernel(
    logits_ptr,  # [B, K+1, V]
    tokens_ptr,  # [B, K] int64
    draft_probs_ptr,  # [B, K, V] f32 (or a dummy)
    temperature_ptr,  # [B]
    min_logit_ptr,  # [B, K+1]
    num_draft_ptr,  # [B]
    seeds_ptr,  # [B] int64
    offsets_ptr,  # [B] int64
    stats_ptr,  # [B, K+1, 3]
    argmax_ptr,  # [B, K+1]
    partial_key_ptr,  # [B, C, 2] f32 out: best residual block key, best p block key
    partial_block_ptr,  # [B, C, 2] int32 out: their block numbers
    partial_live_ptr,  # [B, C] int32 out: 1 where some residual block sum of the chunk is > 0
    vocab,
    num_spec,
    chunk_size,
    HAS_Q: tl.constexpr,
    HAS_MIN_LOGIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Stage 1 of the race over one chunk (a multiple of RACE_BLOCK ids, so no block straddles
    two chunks): the best block key for the residual race (A) and for the p race (B)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    greedy, num_draft, seed, offset, emit = _row_decision(
        tokens_ptr,
        draft_probs_ptr,
        temperature_ptr,
        num_draft_ptr,
        seeds_ptr,
        offsets_ptr,
        stats_ptr,
        argmax_ptr,
        row,
        vocab,
        num_spec,
        HAS_Q,
    )
    best_a = float("-inf")
    best_b = float("-inf")
    block_a = 0
    block_b = 0
    live_a = 0
    if not greedy:
        divisor, min_logit, recovered, dead, safe_max, running_sum, drop, base, q_base = _emit_setup(
            logits_ptr,
            tokens_ptr,
            draft_probs_ptr,
            temperature_ptr,
            min_logit_ptr,
            num_draft_ptr,
            stats_ptr,
            row,
            emit,
            num_draft,
            vocab,
            num_spec,
            HAS_Q,
            HAS_MIN_LOGIT,
        )
        chunk_start = chunk * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, vocab)
        for start in range(chunk_start, chunk_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_range = cols < chunk_end
            p, residual = _race_weights(
                base,
                q_base,
                cols,
                in_range,
                divisor,
                min_logit,
                recovered,
                dead,
                safe_max,
                running_sum,
                drop,
                vocab,
                HAS_Q,
            )
            # NOTE: start is a multiple of RACE_BLOCK, so row i of the reshape is block start/64 + i.
            sums_b = tl.sum(tl.reshape(p, (BLOCK_V // RACE_BLOCK, RACE_BLOCK)), axis=1)
            sums_a = tl.sum(tl.reshape(residual, (BLOCK_V // RACE_BLOCK, RACE_BLOCK)), axis=1)
            blocks = start // RACE_BLOCK + tl.arange(0, BLOCK_V // RACE_BLOCK)
            u = philox_uniform(seed, offset, STREAM_SAMPLE_BLOCK, emit, blocks)
            exponential = -tl.log(tl.minimum(u, RACE_MAX_UNIFORM))
            real = blocks * RACE_BLOCK < chunk_end
            # NOTE: IEEE divisions, as in the other backends, so near-tied keys order the same way.
            key_b = tl.where(real, tl.math.div_rn(sums_b, exponential), float("-inf"))
            key_a = tl.where(real, tl.math.div_rn(sums_a, exponential), float("-inf"))
            tile_b = tl.max(key_b, axis=0)
            tile_a = tl.max(key_a, axis=0)
            # ties: the smallest block of the tile, and an earlier tile wins (strict >)
            tile_block_b = tl.min(tl.where(key_b == tile_b, blocks, 2147483647), axis=0)
            tile_block_a = tl.min(tl.where(key_a == tile_a, blocks, 2147483647), axis=0)
            block_b = tl.where(tile_b > best_b, tile_block_b, block_b)
            block_a = tl.where(tile_a > best_a, tile_block_a, block_a)
            best_b = tl.maximum(best_b, tile_b)
            best_a = tl.maximum(best_a, tile_a)
            live_a = tl.maximum(live_a, (tl.max(sums_a, axis=0) > 0.0).to(tl.int32))
    out = (row * num_chunks + chunk) * 2
    tl.store(partial_key_ptr + out, best_a)
    tl.store(partial_key_ptr + out + 1, best_b)
    tl.store(partial_block_ptr + out, block_a)
    tl.store(partial_block_ptr + out + 1, block_b)
    tl.store(partial_live_ptr + row * num_chunks + chunk, live_a)


@triton.jit
def _finish_kernel(
    logits_ptr,  # [B, K+1, V]
    tokens_ptr,  # [B, K]
    draft_probs_ptr,  # [B, K, V] (or a dummy)
    temperature_ptr,  # [B]
    min_logit_ptr,  # [B, K+1] (or a dummy)
    num_draft_ptr,  # [B]
    seeds_ptr,  # [B]
    offsets_ptr,  # [B]
    stats_ptr,  # [B, K+1, 3]
    argmax_ptr,  # [B, K+1]
    partial_key_ptr,  # [B, C, 2]
    partial_block_ptr,  # [B, C, 2]
    partial_live_ptr,  # [B, C]
    out_tokens_ptr,  # [B, K+1] int64 out
    num_accepted_ptr,  # [B] int32 out
    vocab,
    num_spec,
    num_chunks,
    HAS_Q: tl.constexpr,
    HAS_MIN_LOGIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Merges the chunks' best blocks, runs stage 2 (the race inside the winning block) and
    writes the outputs."""
    row = tl.program_id(0).to(tl.int64)
    positions = num_spec + 1
    greedy, num_draft, seed, offset, emit = _row_decision(
        tokens_ptr,
        draft_probs_ptr,
        temperature_ptr,
        num_draft_ptr,
        seeds_ptr,
        offsets_ptr,
        stats_ptr,
        argmax_ptr,
        row,
        vocab,
        num_spec,
        HAS_Q,
    )
    # Stage 1, merged: the best block over chunks, ties to the smallest block. A sentinel block
    # past the vocabulary (never stored by a chunk) only reads masked ids below.
    num_blocks = (vocab + RACE_BLOCK - 1) // RACE_BLOCK
    chunks = tl.arange(0, BLOCK_C)
    chunk_mask = chunks < num_chunks
    base = (row * num_chunks + chunks) * 2
    key_a = tl.load(partial_key_ptr + base, mask=chunk_mask, other=float("-inf"))
    key_b = tl.load(partial_key_ptr + base + 1, mask=chunk_mask, other=float("-inf"))
    block_a = tl.load(partial_block_ptr + base, mask=chunk_mask, other=0)
    block_b = tl.load(partial_block_ptr + base + 1, mask=chunk_mask, other=0)
    live = tl.load(partial_live_ptr + row * num_chunks + chunks, mask=chunk_mask, other=0)
    top_a = tl.max(key_a, axis=0)
    top_b = tl.max(key_b, axis=0)
    pick_a = tl.min(tl.where((key_a == top_a) & chunk_mask, block_a, num_blocks), axis=0)
    pick_b = tl.min(tl.where((key_b == top_b) & chunk_mask, block_b, num_blocks), axis=0)
    # NOTE: greedy rows skip nothing here (their partials are -inf / block 0): the stage-2 race
    # below is 64 ids, cheaper than a branch, and its result is discarded for them.
    divisor, min_logit, recovered, dead, safe_max, running_sum, drop, logits_row, q_row = _emit_setup(
        logits_ptr,
        tokens_ptr,
        draft_probs_ptr,
        temperature_ptr,
        min_logit_ptr,
        num_draft_ptr,
        stats_ptr,
        row,
        emit,
        num_draft,
        vocab,
        num_spec,
        HAS_Q,
        HAS_MIN_LOGIT,
    )
    # The residual race unless the residual is all zero (then the race runs on p, both stages).
    use_residual = recovered & (tl.max(live, axis=0) > 0)
    block = tl.where(use_residual, pick_a, pick_b)
    # Stage 2: the per-id race inside the winning block, weights recomputed as the chunk did.
    cols = block * RACE_BLOCK + tl.arange(0, RACE_BLOCK)
    in_range = cols < vocab
    p, residual = _race_weights(
        logits_row,
        q_row,
        cols,
        in_range,
        divisor,
        min_logit,
        recovered,
        dead,
        safe_max,
        running_sum,
        drop,
        vocab,
        HAS_Q,
    )
    weights = tl.where(use_residual, residual, p)
    u = philox_uniform(seed, offset, STREAM_SAMPLE, emit, cols)
    exponential = -tl.log(tl.minimum(u, RACE_MAX_UNIFORM))
    key = tl.where(in_range, tl.math.div_rn(weights, exponential), float("-inf"))
    top = tl.max(key, axis=0)
    sampled = tl.min(tl.where(key == top, cols, vocab), axis=0)
    sampled = tl.where(sampled < vocab, sampled, 0)  # never an id outside [0, V)
    argmax = tl.load(argmax_ptr + row * positions + emit)
    emitted = tl.where(greedy, argmax, sampled).to(tl.int64)
    cols_k = tl.arange(0, BLOCK_K)
    drafts = tl.load(tokens_ptr + row * num_spec + cols_k, mask=cols_k < num_spec, other=-1)
    out = tl.where(cols_k < emit, drafts, tl.where(cols_k == emit, emitted, -1))
    tl.store(out_tokens_ptr + row * positions + cols_k, out, mask=cols_k < positions)
    tl.store(num_accepted_ptr + row, emit.to(tl.int32))


def _num_chunks(batch: int, vocab: int, block_v: int, device: torch.device) -> int:
    blocks = triton.cdiv(vocab, block_v)
    if device.type != "cuda":
        return min(2, blocks)  # the interpreter: still exercise the chunk merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(4 * sms, batch), 64))


@torch.library.custom_op("s2d::verify_triton", mutates_args=())
def verify_triton(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_tokens: torch.Tensor,  # [B, K] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] f32
    num_draft: torch.Tensor,  # [B] int64
    temperature: torch.Tensor,  # [B] f32
    min_logit: torch.Tensor | None,  # [B, K+1] f32
    seeds: torch.Tensor,  # [B] int64
    offsets: torch.Tensor,  # [B] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``s2d_ext.ops.verify`` (arguments already validated and normalised)."""
    batch, positions, vocab = target_logits.shape
    num_spec = positions - 1
    device = target_logits.device
    out_tokens = torch.empty((batch, positions), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int32, device=device)
    if batch == 0:
        return out_tokens, num_accepted
    logits = target_logits.contiguous()
    tokens = draft_tokens.contiguous()
    has_q = draft_probs is not None
    has_min_logit = min_logit is not None
    q = draft_probs.contiguous() if has_q else logits  # dummy pointer when absent
    threshold = min_logit.contiguous() if has_min_logit else temperature
    interpreting = device.type != "cuda"
    block_v = 256 if interpreting else 2048
    stats = torch.empty((batch, positions, 3), dtype=torch.float32, device=device)
    argmax = torch.empty((batch, positions), dtype=torch.int32, device=device)
    _position_stats_kernel[(batch, positions)](
        logits,
        tokens,
        temperature,
        threshold,
        num_draft,
        stats,
        argmax,
        vocab,
        num_spec,
        HAS_MIN_LOGIT=has_min_logit,
        BLOCK_V=block_v,
        num_warps=8,
    )
    num_chunks = _num_chunks(batch, vocab, block_v, device)
    # NOTE: a multiple of block_v, itself a multiple of RACE_BLOCK: race blocks never straddle chunks.
    chunk_size = triton.cdiv(triton.cdiv(vocab, num_chunks), block_v) * block_v
    num_chunks = triton.cdiv(vocab, chunk_size)
    partial_key = torch.empty((batch, num_chunks, 2), dtype=torch.float32, device=device)
    partial_block = torch.empty((batch, num_chunks, 2), dtype=torch.int32, device=device)
    partial_live = torch.empty((batch, num_chunks), dtype=torch.int32, device=device)
    _race_kernel[(batch, num_chunks)](
        logits,
        tokens,
        q,
        temperature,
        threshold,
        num_draft,
        seeds,
        offsets,
        stats,
        argmax,
        partial_key,
        partial_block,
        partial_live,
        vocab,
        num_spec,
        chunk_size,
        HAS_Q=has_q,
        HAS_MIN_LOGIT=has_min_logit,
        BLOCK_V=block_v,
        num_warps=8,
    )
    _finish_kernel[(batch,)](
        logits,
        tokens,
        q,
        temperature,
        threshold,
        num_draft,
        seeds,
        offsets,
        stats,
        argmax,
        partial_key,
        partial_block,
        partial_live,
        out_tokens,
        num_accepted,
        vocab,
        num_spec,
        num_chunks,
        HAS_Q=has_q,
        HAS_MIN_LOGIT=has_min_logit,
        BLOCK_C=triton.next_power_of_2(num_chunks),
        BLOCK_K=triton.next_power_of_2(positions),
        num_warps=1,
    )
    return out_tokens, num_accepted


@verify_triton.register_fake
def _(target_logits, draft_tokens, draft_probs, num_draft, temperature, min_logit, seeds, offsets):
    batch, positions, _ = target_logits.shape
    return (
        target_logits.new_empty((batch, positions), dtype=torch.int64),
        target_logits.new_empty((batch,), dtype=torch.int32),
    )
