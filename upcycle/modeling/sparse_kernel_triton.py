"""The Triton kernels of :mod:`sparse_kernel` (imported only when the kernel runs: triton stays optional).

A *tile* is up to ``BM`` selected query rows of one (sequence, routed head), in position order;
``rows`` holds each row's token index (-1 for padding rows). ``packed`` buffers ([tiles * BM, ...])
are indexed by tile row. Matrix products take the inputs' dtype and accumulate in fp32 (fp32 inputs: exact products,
``PRECISION`` "ieee", as SDPA without TF32).
"""

try:  # inside try: transformers' remote-code import check skips it, so trust_remote_code loads without triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the head-sparse Triton kernel needs triton: pip install triton") from error


@triton.jit
def _scores(
    q,
    k,
    tokens,
    valid,
    cols,
    inside,
    keep_ptr,
    batch,
    skeep_b,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scaled scores [BM, BN] of one query tile against one key block, -inf where not allowed."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    allowed = inside[None, :] & valid[:, None]
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= (tokens + offset)[:, None])
    if HAS_KEEP:
        allowed = allowed & (tl.load(keep_ptr + batch * skeep_b + cols, mask=inside, other=0) != 0)[None, :]
    return tl.where(allowed, scores, float("-inf"))


@triton.jit
def routed_forward(
    q_ptr,
    k_ptr,
    v_ptr,
    gate_ptr,
    out_ptr,
    packed_out_ptr,
    lse_ptr,
    keep_ptr,
    rows_ptr,
    tile_batch_ptr,
    tile_head_ptr,
    tile_keys_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sg_b,
    sg_t,
    so_b,
    so_t,
    so_h,
    skeep_b,
    group,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """One tile: online softmax over the key blocks it can see; writes gated rows to ``out`` [B, T, h, D],
    ungated rows and their log-sum-exp to the packed buffers (for the backward)."""
    # indices in int64: batch x heads x positions x width can pass 2**31 elements, and int32 offsets would wrap
    tile = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)  # last tiles read the most keys: first
    batch = tl.load(tile_batch_ptr + tile).to(tl.int64)
    head = tl.load(tile_head_ptr + tile).to(tl.int64)
    keys = tl.load(tile_keys_ptr + tile)
    kv = head // group
    slots = tile * BM + tl.arange(0, BM)
    tokens = tl.load(rows_ptr + slots)  # [BM], -1 for padding rows
    valid = tokens >= 0
    tokens = tl.where(valid, tokens, 0).to(tl.int64)
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + batch * sq_b + head * sq_h + tokens[:, None] * sq_t + dims[None, :], mask=valid[:, None], other=0.0
    )
    best = tl.full((BM,), float("-inf"), tl.float32)
    total = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for start in range(0, keys, BN):
        cols = (start + tl.arange(0, BN)).to(tl.int64)
        inside = cols < keys
        k = tl.load(
            k_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
        )
        scores = _scores(
            q, k, tokens, valid, cols, inside, keep_ptr, batch, skeep_b, offset, scale, CAUSAL, HAS_KEEP, PRECISION
        )
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        safe_best = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - safe_best[:, None])  # [BM, BN]
        rescale = tl.exp(best - safe_best)
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    seen = total > 0.0  # a row whose keys are all masked has no output
    result = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, tl.where(best == float("-inf"), 0.0, best) + tl.log(tl.where(seen, total, 1.0)), float("inf"))
    tl.store(lse_ptr + slots, lse)
    tl.store(packed_out_ptr + slots[:, None] * D + dims[None, :], result.to(packed_out_ptr.dtype.element_ty))
    gate = tl.load(gate_ptr + batch * sg_b + tokens * sg_t + head, mask=valid, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + batch * so_b + tokens[:, None] * so_t + head * so_h + dims[None, :],
        (result * gate[:, None]).to(out_ptr.dtype.element_ty),
        mask=valid[:, None],
    )


@triton.jit
def routed_backward_query(
    q_ptr,
    k_ptr,
    v_ptr,
    dq_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    keep_ptr,
    rows_ptr,
    tile_batch_ptr,
    tile_head_ptr,
    tile_keys_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    skeep_b,
    group,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """dQ of one tile: ``grad`` is the packed gradient of the ungated output (upstream gradient times the gate),
    ``delta`` its row-wise product with the ungated output. Writes the tile's rows of dq [B, h, T, D]."""
    tile = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)  # int64 indices, as in routed_forward
    batch = tl.load(tile_batch_ptr + tile).to(tl.int64)
    head = tl.load(tile_head_ptr + tile).to(tl.int64)
    keys = tl.load(tile_keys_ptr + tile)
    kv = head // group
    slots = tile * BM + tl.arange(0, BM)
    tokens = tl.load(rows_ptr + slots)
    valid = tokens >= 0
    tokens = tl.where(valid, tokens, 0).to(tl.int64)
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + batch * sq_b + head * sq_h + tokens[:, None] * sq_t + dims[None, :], mask=valid[:, None], other=0.0
    )
    grad = tl.load(grad_ptr + slots[:, None] * D + dims[None, :])
    lse = tl.load(lse_ptr + slots)
    delta = tl.load(delta_ptr + slots)
    dq = tl.zeros((BM, D), tl.float32)
    for start in range(0, keys, BN):
        cols = (start + tl.arange(0, BN)).to(tl.int64)
        inside = cols < keys
        k = tl.load(
            k_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
        )
        scores = _scores(
            q, k, tokens, valid, cols, inside, keep_ptr, batch, skeep_b, offset, scale, CAUSAL, HAS_KEEP, PRECISION
        )
        probs = tl.exp(scores - lse[:, None])  # [BM, BN], 0 where masked
        dprobs = tl.dot(grad, tl.trans(v), input_precision=PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        dq_ptr + batch * sq_b + head * sq_h + tokens[:, None] * sq_t + dims[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=valid[:, None],
    )


@triton.jit
def routed_backward_key_value(
    q_ptr,
    k_ptr,
    v_ptr,
    dk_ptr,
    dv_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    keep_ptr,
    rows_ptr,
    first_tile_ptr,
    end_tile_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    skeep_b,
    sf_b,
    sf_h,
    se_b,
    keys,
    heads,
    group,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """dK, dV of one key block of one (sequence, KV head): loops over the tiles of the routed query heads
    that read this KV head, from the first tile that sees the block (``first_tile`` [B, h, blocks]) to the
    head's last (``end_tile`` [B, h]). Writes the block's rows of dk, dv [B, g, S, D] (routed heads' share)."""
    block = tl.program_id(0).to(tl.int64)  # int64 indices, as in routed_forward
    batch = (tl.program_id(1) // (heads // group)).to(tl.int64)
    kv = (tl.program_id(1) % (heads // group)).to(tl.int64)
    dims = tl.arange(0, D)
    cols = block * BN + tl.arange(0, BN)
    inside = cols < keys
    k = tl.load(
        k_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
    )
    v = tl.load(
        v_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :], mask=inside[:, None], other=0.0
    )
    dk = tl.zeros((BN, D), tl.float32)
    dv = tl.zeros((BN, D), tl.float32)
    for member in range(0, group):
        head = kv * group + member
        first = tl.load(first_tile_ptr + batch * sf_b + head * sf_h + block).to(tl.int64)
        end = tl.load(end_tile_ptr + batch * se_b + head).to(tl.int64)
        for tile in range(first, end):
            slots = tile * BM + tl.arange(0, BM)
            tokens = tl.load(rows_ptr + slots)
            valid = tokens >= 0
            tokens = tl.where(valid, tokens, 0).to(tl.int64)
            q = tl.load(
                q_ptr + batch * sq_b + head * sq_h + tokens[:, None] * sq_t + dims[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            grad = tl.load(grad_ptr + slots[:, None] * D + dims[None, :])
            lse = tl.load(lse_ptr + slots)
            delta = tl.load(delta_ptr + slots)
            scores = _scores(
                q, k, tokens, valid, cols, inside, keep_ptr, batch, skeep_b, offset, scale, CAUSAL, HAS_KEEP, PRECISION
            )
            probs = tl.exp(scores - lse[:, None])  # [BM, BN]
            dv += tl.dot(tl.trans(probs.to(grad.dtype)), grad, input_precision=PRECISION)
            dprobs = tl.dot(grad, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
            dscores = probs * (dprobs - delta[:, None])
            dk += tl.dot(tl.trans(dscores.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(
        dk_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=inside[:, None],
    )
    tl.store(
        dv_ptr + batch * sk_b + kv * sk_h + cols[:, None] * sk_t + dims[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=inside[:, None],
    )
