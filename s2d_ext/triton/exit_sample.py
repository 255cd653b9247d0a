"""Triton sampled drafting, registered as ``torch.ops.s2d.exit_sample_triton`` and
``torch.ops.s2d.sample_logits_triton`` (same arguments as ``torch.ops.s2d.exit_sample`` /
``sample_logits``; spec: :mod:`s2d_ext.ops.exit_sample_reference`).

``exit_sample_triton``: the final RMSNorm (``triton.exit_head._rms_norm_kernel``, in the hidden dtype), the
head as one float32-output matmul over the head rows (tensor cores on a GPU; the logits of a sampled row
are needed whole: q is written out), then the sampling kernel. ``sample_logits_triton``: the sampling kernel
on given logits. The top-k / top-p threshold, when a row uses one, is torch's sort-based composition
(:func:`verify_reference.logit_threshold`, as ``s2d_ext.ops.verify`` computes it for every backend).

``_sample_kernel``, one program per row: the raw max / smallest argmax, the kept sum-exp of the scores
(confidence = 1 / sum), the exit decision; then, only if the row fires, its probs row is zeroed and q
scattered into it, and a sampled row runs the two-level exponential race over the q it wrote (block sums
of 64 ids, one Philox draw per block on ``STREAM_DRAFT | STREAM_BLOCK_FLAG``, then one per id of the
winning block on ``STREAM_DRAFT``). NOTE: the race reads back what the program stored, so a barrier
separates the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from s2d_ext.triton.exit_head import _rms_norm_kernel
from s2d_ext.triton.philox import STREAM_BLOCK_FLAG, STREAM_DRAFT, philox_uniform

FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
RACE_MAX_UNIFORM = tl.constexpr(0.99999994039535522)  # 1 - 2**-24, see verify_reference.exponential_race
RACE_BLOCK = tl.constexpr(64)
STREAM_DRAFT_BLOCK = tl.constexpr(STREAM_DRAFT.value | STREAM_BLOCK_FLAG.value)


@triton.jit
def _sanitize(x):
    x = tl.where(x != x, float("-inf"), x)
    return tl.where(x > FLOAT32_MAX, FLOAT32_MAX, x)


@triton.jit
def _scores(raw, greedy, temperature, dead):
    """Processed scores of sanitised raw logits: raw (greedy), raw / T (IEEE), 0 in a dead row."""
    scaled = _sanitize(tl.math.div_rn(raw, tl.where(greedy, 1.0, temperature)))
    return tl.where(dead, 0.0, tl.where(greedy, raw, scaled))


@triton.jit
def _sample_kernel(
    logits_ptr,  # [N, Vh] float32
    vocab_ids_ptr,  # [Vh] int64 (or a dummy)
    temperature_ptr,  # [N] float32
    min_logit_ptr,  # [N] float32 (or a dummy)
    threshold_ptr,  # [N] float32
    seeds_ptr,  # [N] int64
    offsets_ptr,  # [N] int64
    positions_ptr,  # [N] int64
    probs_ptr,  # [M, V] float32, written at fired rows
    probs_rows_ptr,  # [N] int64
    tokens_ptr,  # [N] int64 out
    confidence_ptr,  # [N] float32 out
    fired_ptr,  # [N] int8 out
    head_vocab,
    vocab,
    probs_count,  # M
    HAS_IDS: tl.constexpr,
    HAS_MIN_LOGIT: tl.constexpr,
    BLOCK: tl.constexpr,
    RACE_TILE: tl.constexpr,  # blocks of 64 ids per stage-1 tile
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * head_vocab
    temperature = tl.load(temperature_ptr + row)
    greedy = ~(temperature > 0.0)
    # 1. the raw max and its smallest head row.
    raw_max = float("-inf")
    arg = 0
    for start in range(0, head_vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        raw = _sanitize(tl.load(base + cols, mask=cols < head_vocab, other=float("-inf")))
        tile_max = tl.max(raw, axis=0)
        tile_arg = tl.min(tl.where(raw == tile_max, cols, 2147483647), axis=0)
        arg = tl.where(tile_max > raw_max, tile_arg, arg)
        raw_max = tl.maximum(raw_max, tile_max)
    dead = raw_max == float("-inf")
    # NOTE: division by T > 0 is monotone, so the largest score is the scaled largest logit.
    scaled_max = _sanitize(tl.math.div_rn(raw_max, tl.where(greedy, 1.0, temperature)))
    top = tl.where(dead, 0.0, tl.where(greedy, raw_max, scaled_max))
    min_logit = float("-inf")
    if HAS_MIN_LOGIT:
        min_logit = tl.where(greedy, float("-inf"), tl.load(min_logit_ptr + row))
    # 2. the kept sum-exp: confidence = 1 / sum, the top's own term being 1.
    total = 0.0
    for start in range(0, head_vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_range = cols < head_vocab
        raw = _sanitize(tl.load(base + cols, mask=in_range, other=float("-inf")))
        s = _scores(raw, greedy, temperature, dead)
        kept = in_range & (s >= min_logit) & (s != float("-inf"))
        total += tl.sum(tl.where(kept, tl.exp(s - top), 0.0), axis=0)
    confidence = 1.0 / total
    fired = confidence >= tl.load(threshold_ptr + row)
    tl.store(confidence_ptr + row, confidence)
    tl.store(fired_ptr + row, fired.to(tl.int8))
    if HAS_IDS:
        token = tl.load(vocab_ids_ptr + arg)
    else:
        token = arg.to(tl.int64)
    # NOTE: without value checks a probs row outside [0, M) writes nothing and an id outside [0, V) is
    # never written (csrc/include/s2d/exit_sample_common.h): memory outside the buffers stays untouched.
    probs_row = tl.load(probs_rows_ptr + row)
    if fired & (probs_row >= 0) & (probs_row < probs_count):
        q_row = probs_ptr + probs_row * vocab
        # 3. the probs row becomes q.
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(q_row + cols, tl.zeros((BLOCK,), dtype=tl.float32), mask=cols < vocab)
        tl.debug_barrier()
        if greedy:
            tl.store(q_row + token, 1.0, mask=(token >= 0) & (token < vocab))
        else:
            for start in range(0, head_vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_range = cols < head_vocab
                raw = _sanitize(tl.load(base + cols, mask=in_range, other=float("-inf")))
                s = _scores(raw, greedy, temperature, dead)
                kept = in_range & (s >= min_logit) & (s != float("-inf"))
                q = tl.where(kept, tl.math.div_rn(tl.exp(s - top), total), 0.0)
                if HAS_IDS:
                    ids = tl.load(vocab_ids_ptr + cols, mask=in_range, other=0)
                else:
                    ids = cols.to(tl.int64)
                tl.store(q_row + ids, q, mask=kept & (ids >= 0) & (ids < vocab))
            tl.debug_barrier()
            # 4. the race over the q just written: stage 1 over blocks of 64 ids, ties to the
            # smallest block (strict > across tiles), stage 2 inside the winning block.
            seed = tl.load(seeds_ptr + row)
            offset = tl.load(offsets_ptr + row)
            position = tl.load(positions_ptr + row)
            num_blocks = (vocab + RACE_BLOCK - 1) // RACE_BLOCK
            best_key = float("-inf")
            best_block = 0
            for block_start in range(0, num_blocks, RACE_TILE):
                blocks = block_start + tl.arange(0, RACE_TILE)
                cols = blocks[:, None] * RACE_BLOCK + tl.arange(0, RACE_BLOCK)[None, :]
                w = tl.load(q_row + cols, mask=cols < vocab, other=0.0)
                sums = tl.sum(w, axis=1)
                u = philox_uniform(seed, offset, STREAM_DRAFT_BLOCK, position, blocks)
                exponential = -tl.log(tl.minimum(u, RACE_MAX_UNIFORM))
                key = tl.where((blocks < num_blocks) & (sums > 0.0), tl.math.div_rn(sums, exponential), -1.0)
                tile_key = tl.max(key, axis=0)
                tile_block = tl.min(tl.where(key == tile_key, blocks, 2147483647), axis=0)
                best_block = tl.where(tile_key > best_key, tile_block, best_block)
                best_key = tl.maximum(best_key, tile_key)
            cols = best_block * RACE_BLOCK + tl.arange(0, RACE_BLOCK)
            in_range = cols < vocab
            w = tl.load(q_row + cols, mask=in_range, other=0.0)
            u = philox_uniform(seed, offset, STREAM_DRAFT, position, cols)
            exponential = -tl.log(tl.minimum(u, RACE_MAX_UNIFORM))
            key = tl.where(in_range, tl.math.div_rn(w, exponential), float("-inf"))
            top_key = tl.max(key, axis=0)
            token = tl.min(tl.where(key == top_key, cols, vocab), axis=0).to(tl.int64)
    tl.store(tokens_ptr + row, token)


def _launch_sample(logits, temperature, top_k, top_p, seeds, offsets, positions, threshold, vocab_ids,
                   probs, probs_rows, filters):  # fmt: skip
    rows, head_vocab = logits.shape
    device = logits.device
    tokens = torch.empty((rows,), dtype=torch.int64, device=device)
    confidence = torch.empty((rows,), dtype=torch.float32, device=device)
    fired = torch.empty((rows,), dtype=torch.int8, device=device)
    if rows == 0:
        return tokens, confidence, fired.bool()
    logits = logits.float().contiguous()
    min_logit = None
    if filters:
        # NOTE: imported here: s2d_ext.ops loads the native libraries, which the Triton compile check
        # (tools/triton_compile_check.py, kernels only) must not need.
        from s2d_ext.ops.logit_filters import logit_threshold

        min_logit = logit_threshold(logits[:, None, :], temperature, top_k, top_p)[:, 0].contiguous()
    interpreting = device.type != "cuda"
    _sample_kernel[(rows,)](
        logits,
        vocab_ids if vocab_ids is not None else tokens,
        temperature,
        min_logit if min_logit is not None else confidence,
        threshold,
        seeds,
        offsets,
        positions,
        probs,
        probs_rows,
        tokens,
        confidence,
        fired,
        head_vocab,
        probs.shape[1],
        probs.shape[0],
        HAS_IDS=vocab_ids is not None,
        HAS_MIN_LOGIT=min_logit is not None,
        BLOCK=4096 if interpreting else 1024,
        RACE_TILE=64 if interpreting else 16,
    )
    return tokens, confidence, fired.bool()


@torch.library.custom_op("s2d::sample_logits_triton", mutates_args=("probs",))
def sample_logits_triton(
    logits: torch.Tensor,  # [N, Vh]
    temperature: torch.Tensor,  # [N] float32
    top_k: torch.Tensor,  # [N] int64
    top_p: torch.Tensor,  # [N] float32
    seeds: torch.Tensor,  # [N] int64
    offsets: torch.Tensor,  # [N] int64
    positions: torch.Tensor,  # [N] int64
    threshold: torch.Tensor,  # [N] float32
    vocab_ids: torch.Tensor | None,  # [Vh] int64
    probs: torch.Tensor,  # [M, V] float32, written in place
    probs_rows: torch.Tensor,  # [N] int64
    filters: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton sample_logits; arguments already validated (see s2d_ext.ops.exit_sample)."""
    return _launch_sample(
        logits, temperature, top_k, top_p, seeds, offsets, positions, threshold, vocab_ids, probs,
        probs_rows, filters,
    )  # fmt: skip


def head_logits(normed: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """``normed @ lm_head_weight.T`` as float32 [N, Vh], accumulated in float32 (the reference's logits)."""
    if normed.dtype != torch.float32 and normed.device.type == "cuda":
        # NOTE: bf16 / f16 operands on the tensor cores with a float32 result: the products are exact in
        # float32, so only the summation order differs from the reference.
        return torch.mm(normed, lm_head_weight.t(), out_dtype=torch.float32)
    return normed.float() @ lm_head_weight.float().t()


@torch.library.custom_op("s2d::exit_sample_triton", mutates_args=("probs",))
def exit_sample_triton(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [Vh, d]
    eps: float,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    positions: torch.Tensor,
    threshold: torch.Tensor,
    vocab_ids: torch.Tensor | None,
    probs: torch.Tensor,
    probs_rows: torch.Tensor,
    filters: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton exit_sample; arguments already validated (see s2d_ext.ops.exit_sample)."""
    rows, dim = hidden.shape
    normed = torch.empty_like(hidden)
    if rows:
        _rms_norm_kernel[(rows,)](
            hidden,
            norm_weight,
            normed,
            dim,
            eps,
            BLOCK_D=min(triton.next_power_of_2(dim), 1024),
            IS_BF16=hidden.dtype == torch.bfloat16,
        )
    return _launch_sample(
        head_logits(normed, lm_head_weight), temperature, top_k, top_p, seeds, offsets, positions,
        threshold, vocab_ids, probs, probs_rows, filters,
    )  # fmt: skip


def _fake(rows: int, like: torch.Tensor):
    return (
        like.new_empty((rows,), dtype=torch.int64),
        like.new_empty((rows,), dtype=torch.float32),
        like.new_empty((rows,), dtype=torch.bool),
    )


@sample_logits_triton.register_fake
def _(logits, *rest):
    return _fake(logits.shape[0], logits)


@exit_sample_triton.register_fake
def _(hidden, *rest):
    return _fake(hidden.shape[0], hidden)
