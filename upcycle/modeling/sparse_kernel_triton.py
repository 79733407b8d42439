"""The Triton kernel of :mod:`sparse_kernel` (imported only when that kernel runs: triton stays optional)."""

import triton
import triton.language as tl


@triton.jit
def routed_forward(q_ptr, k_ptr, v_ptr, gate_ptr, out_ptr, keep_ptr, rows_ptr, tile_batch_ptr, tile_head_ptr, tile_keys_ptr,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sg_b, sg_t, so_b, so_t, so_h, skeep_b,
                   group, offset, scale,
                   CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.load(tile_batch_ptr + tile)
    head = tl.load(tile_head_ptr + tile)
    keys = tl.load(tile_keys_ptr + tile)
    kv = head // group
    tokens = tl.load(rows_ptr + tile * BM + tl.arange(0, BM))  # [BM], -1 for padding rows
    valid = tokens >= 0
    safe = tl.where(valid, tokens, 0)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + safe[:, None] * sq_t + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    positions = safe + offset
    best = tl.full((BM,), float("-inf"), tl.float32)
    total = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for start in range(0, keys, BN):
        cols = start + tl.arange(0, BN)
        inside = cols < keys
        k = tl.load(k_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * scale  # [BM, BN]
        allowed = inside[None, :] & valid[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= positions[:, None])
        if HAS_KEEP:
            allowed = allowed & (tl.load(keep_ptr + batch * skeep_b + cols, mask=inside, other=0) != 0)[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        safe_best = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - safe_best[:, None])
        rescale = tl.exp(best - safe_best)
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights, v)
        best = new_best
    gate = tl.load(gate_ptr + batch * sg_b + safe * sg_t + head, mask=valid, other=0.0).to(tl.float32)
    result = acc / tl.where(total == 0.0, 1.0, total)[:, None] * gate[:, None]
    tl.store(out_ptr + batch * so_b + safe[:, None] * so_t + head * so_h + dims[None, :], result.to(out_ptr.dtype.element_ty),
             mask=valid[:, None])
