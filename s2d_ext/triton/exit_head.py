"""Triton exit head, registered as ``torch.ops.s2d.exit_head_triton``.

Three launches, never writing the [N, V] logits:

1. ``_rms_norm_kernel``: one program per row writes ``normed`` [N, d] in ``hidden.dtype`` (exactly
   the reference's rounded tensor, so bf16/f16 rows can feed tensor-core dots without error).
2. ``_head_partial_kernel``: grid (vocab chunks, row blocks); each program streams its chunk of
   ``lm_head_weight`` in [BLOCK_V, BLOCK_D] tiles, ``tl.dot``s them with the row block (float32
   accumulation; "ieee" precision for float32 so no TF32 rounding) and keeps, per row, the online
   state (max, its smallest id, sum of exp((logit - max) / t)).
3. ``_merge_kernel``: merges the chunks of each row in id order (deterministic) and writes the
   token, confidence = 1 / sum and logsumexp = max / t + log(sum).

See csrc/include/s2d/exit_head_common.h for the same state on the C++/CUDA side.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# NOTE: a tl.constexpr: compiled Triton refuses plain Python globals inside @triton.jit (the
# interpreter accepts them, so CPU tests cannot catch it).
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_to_bf16(x):
    """float32 -> nearest-even bfloat16 value, still float32 (the interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rms_norm_kernel(
    hidden_ptr,  # [N, d]
    weight_ptr,  # [d]
    normed_ptr,  # [N, d] out, hidden.dtype
    dim,
    eps,
    BLOCK_D: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sum_squares = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        h = tl.load(hidden_ptr + row * dim + cols, mask=cols < dim, other=0.0).to(tl.float32)
        sum_squares += h * h
    inv_rms = 1.0 / tl.sqrt(tl.sum(sum_squares, axis=0) / dim + eps)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        raw = tl.load(hidden_ptr + row * dim + cols, mask=mask, other=0.0)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # NOTE: two roundings to the input dtype, as transformers' LlamaRMSNorm does them.
        if IS_BF16:
            scaled = _round_to_bf16(raw.to(tl.float32) * inv_rms)
            product = _round_to_bf16(scaled * w)
        else:
            scaled = (raw.to(tl.float32) * inv_rms).to(raw.dtype).to(tl.float32)
            product = scaled * w
        tl.store(normed_ptr + row * dim + cols, product.to(raw.dtype), mask=mask)


@triton.jit
def _head_partial_kernel(
    normed_ptr,  # [N, d]
    weight_ptr,  # [V, d]
    temperature_ptr,  # [N] float32
    part_max_ptr,  # [C, N] float32 out
    part_arg_ptr,  # [C, N] int32 out
    part_sum_ptr,  # [C, N] float32 out
    rows,
    dim,
    vocab,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    chunk = tl.program_id(0)
    row_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    temp = tl.load(temperature_ptr + row_ids, mask=row_mask, other=1.0)
    t = tl.where(temp > 0, temp, 1.0)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_N,), dtype=tl.int32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile_start in range(0, CHUNK, BLOCK_V):
        vocab_ids = chunk * CHUNK + tile_start + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_ids < vocab
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d_start in range(0, dim, BLOCK_D):
            cols = d_start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            x = tl.load(
                normed_ptr + row_ids[:, None].to(tl.int64) * dim + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                weight_ptr + vocab_ids[:, None].to(tl.int64) * dim + cols[None, :],
                mask=vocab_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        # Sanitise (NaN -> -inf, +inf -> float32 max) and mask the vocabulary tail.
        logits = tl.where(acc != acc, float("-inf"), acc)
        logits = tl.where(logits > FLOAT32_MAX, FLOAT32_MAX, logits)
        logits = tl.where(vocab_mask[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], vocab_ids[None, :], 2147483647), axis=1)
        new_max = tl.maximum(run_max, tile_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp((run_max - safe_max) / t))
        terms = tl.exp((logits - safe_max[:, None]) / t[:, None])
        tile_sum = tl.sum(tl.where(logits == float("-inf"), 0.0, terms), axis=1)
        run_sum = run_sum * old_scale + tile_sum
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        run_max = new_max
    out = chunk * rows + row_ids
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_arg_ptr + out, run_arg, mask=row_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=row_mask)


@triton.jit
def _merge_kernel(
    part_max_ptr,  # [C, N]
    part_arg_ptr,  # [C, N]
    part_sum_ptr,  # [C, N]
    temperature_ptr,  # [N]
    tokens_ptr,  # [N] int64 out
    confidence_ptr,  # [N] float32 out
    lse_ptr,  # [N] float32 out
    rows,
    num_chunks,
    inv_vocab,  # 1 / V (a dead row's confidence)
    log_vocab,  # log V (a dead row's logsumexp)
    BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    temp = tl.load(temperature_ptr + row_ids, mask=row_mask, other=1.0)
    t = tl.where(temp > 0, temp, 1.0)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_N,), dtype=tl.int32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for chunk in range(0, num_chunks):
        part_max = tl.load(part_max_ptr + chunk * rows + row_ids, mask=row_mask, other=float("-inf"))
        part_arg = tl.load(part_arg_ptr + chunk * rows + row_ids, mask=row_mask, other=0)
        part_sum = tl.load(part_sum_ptr + chunk * rows + row_ids, mask=row_mask, other=0.0)
        new_max = tl.maximum(run_max, part_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp((run_max - safe_max) / t))
        part_scale = tl.where(part_max == float("-inf"), 0.0, tl.exp((part_max - safe_max) / t))
        run_sum = run_sum * old_scale + part_sum * part_scale
        run_arg = tl.where(part_max > run_max, part_arg, run_arg)
        run_max = new_max
    dead = run_max == float("-inf")
    token = tl.where(dead, 0, run_arg).to(tl.int64)
    safe_sum = tl.where(dead, 1.0, run_sum)
    confidence = tl.where(dead, inv_vocab, 1.0 / safe_sum)
    lse = tl.where(dead, log_vocab, run_max / t + tl.log(safe_sum))
    tl.store(tokens_ptr + row_ids, token, mask=row_mask)
    tl.store(confidence_ptr + row_ids, confidence, mask=row_mask)
    tl.store(lse_ptr + row_ids, lse, mask=row_mask)


@torch.library.custom_op("s2d::exit_head_triton", mutates_args=())
def exit_head_triton(
    hidden: torch.Tensor,  # [N, d]
    norm_weight: torch.Tensor,  # [d]
    lm_head_weight: torch.Tensor,  # [V, d]
    eps: float,
    temperature: torch.Tensor,  # [N] float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton exit head; arguments already validated, contiguous (see s2d_ext.ops.exit_head)."""
    rows, dim = hidden.shape
    vocab = lm_head_weight.shape[0]
    device = hidden.device
    tokens = torch.empty((rows,), dtype=torch.int64, device=device)
    confidence = torch.empty((rows,), dtype=torch.float32, device=device)
    lse = torch.empty((rows,), dtype=torch.float32, device=device)
    if rows == 0:
        return tokens, confidence, lse
    interpreting = _interpreting()
    normed = torch.empty_like(hidden)
    block_d_norm = min(triton.next_power_of_2(dim), 1024)
    _rms_norm_kernel[(rows,)](
        hidden, norm_weight, normed, dim, eps, BLOCK_D=block_d_norm, IS_BF16=hidden.dtype == torch.bfloat16
    )

    # NOTE: the interpreter runs programs one after another, so it gets few, large tiles.
    block_n = 16 if interpreting or rows <= 16 else 32
    block_v = 128 if interpreting else 64
    block_d = min(max(triton.next_power_of_2(dim), 16), 128 if interpreting else 64)
    chunk = max(block_v, 512 if not interpreting else 1024)
    chunk = min(chunk, max(block_v, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, chunk)
    part_max = torch.empty((num_chunks, rows), dtype=torch.float32, device=device)
    part_arg = torch.empty((num_chunks, rows), dtype=torch.int32, device=device)
    part_sum = torch.empty((num_chunks, rows), dtype=torch.float32, device=device)
    dot_f32 = hidden.dtype == torch.float32 or interpreting
    grid = (num_chunks, triton.cdiv(rows, block_n))
    _head_partial_kernel[grid](
        normed,
        lm_head_weight,
        temperature,
        part_max,
        part_arg,
        part_sum,
        rows,
        dim,
        vocab,
        CHUNK=chunk,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        DOT_F32=dot_f32,
    )
    merge_block = 64
    _merge_kernel[(triton.cdiv(rows, merge_block),)](
        part_max,
        part_arg,
        part_sum,
        temperature,
        tokens,
        confidence,
        lse,
        rows,
        num_chunks,
        1.0 / vocab,
        math.log(vocab),
        BLOCK_N=merge_block,
    )
    return tokens, confidence, lse


@exit_head_triton.register_fake
def _(hidden, norm_weight, lm_head_weight, eps, temperature):
    rows = hidden.shape[0]
    return (
        hidden.new_empty((rows,), dtype=torch.int64),
        hidden.new_empty((rows,), dtype=torch.float32),
        hidden.new_empty((rows,), dtype=torch.float32),
    )
