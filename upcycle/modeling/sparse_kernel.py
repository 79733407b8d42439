"""Head-sparse attention with Triton kernels, forward and backward.

Routed heads: the queries each (sequence, head) selected are packed into tiles of ``BM`` rows in
position order; each row keeps its token index, so its position drives the causal mask, and a
tile reads only the key blocks up to its last position. Online softmax in fp32, output times the
gate. The backward recomputes the probabilities from the saved log-sum-exp (FlashAttention-2
style): one kernel per query tile for dQ, one per (key block, sequence, KV head) for dK and dV,
which walks the tiles of the KV head's routed query heads that can see the block; gate gradients
are the row-wise product of the upstream gradient with the ungated output. Shared heads go
through SDPA (flash/cuDNN on CUDA). Triton is imported lazily; on the CPU the kernels run under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sparse_attention import head_sparse_attention

logger = logging.getLogger(__name__)
SELF_CHECK_ENV = "UPCYCLE_KERNEL_SELF_CHECK"  # 0: trust the kernel without the first-use check
# largest error allowed, relative to the largest reference value, by input dtype (the kernel accumulates in fp32)
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}
REPORT_URL = "https://github.com/upcycle-ml/upcycle/issues"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings; ``rows`` (query rows per tile) also fixes the packing."""

    rows: int = 64
    keys: int = 64
    warps: int = 4
    stages: int = 2
    backward_warps: int = 8


INTERPRETER_CONFIG = KernelConfig(rows=16, keys=16, warps=1, stages=1, backward_warps=1)


def default_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_CONFIG
    return KernelConfig()


def kernel_environment_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` at all (None when it can): triton missing, or not CUDA (and not the
    interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 to emulate it on the CPU)"
    return None


def kernel_unavailable_reason(query: torch.Tensor) -> str | None:
    """Why the kernel cannot run on ``query`` (None when it can): the environment (:func:`kernel_environment_reason`),
    a head width that is not a power of two >= 16, or a dtype other than fp32/fp16/bf16."""
    reason = kernel_environment_reason(query.device)
    if reason:
        return reason
    width = query.shape[-1]
    if width < 16 or width & (width - 1):
        return f"the Triton kernel needs a head width that is a power of two >= 16, not {width}"
    if query.dtype not in SELF_CHECK_TOLERANCE:
        return f"the Triton kernel takes fp32, fp16 or bf16, not {str(query.dtype).removeprefix('torch.')}"
    return None


@dataclass
class Tiles:
    """Packed routed query rows. rows [N * BM] token index or -1; batch, head, keys [N] (keys: how many keys the
    tile reads); start, end [B, h]: each (sequence, head)'s tiles (empty for heads that are not routed)."""

    rows: torch.Tensor
    batch: torch.Tensor
    head: torch.Tensor
    keys: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    count: int


def pack_tiles(
    gates: torch.Tensor, routed_heads: list[int], causal: bool, offset: int, keys: int, block: int
) -> Tiles | None:
    """Tiles of the selected (sequence, routed head) query rows, in position order; None when nothing is selected."""
    batch, length, heads = gates.shape
    device = gates.device
    routed = torch.tensor(sorted(routed_heads), device=device, dtype=torch.long)  # tiles in [B, h] order (first_tiles)
    selected = (gates[:, :, routed] != 0).permute(0, 2, 1).reshape(-1, length)  # [B * R, T]
    counts = selected.sum(dim=1)  # [B * R]
    tiles_per_pair = (counts + block - 1) // block
    ends = tiles_per_pair.cumsum(0)
    starts = ends - tiles_per_pair
    total = int(ends[-1]) if ends.numel() else 0
    if not total:
        return None
    pair, token = selected.nonzero(as_tuple=True)  # sorted by pair, then position
    rank = torch.arange(pair.numel(), device=device) - (counts.cumsum(0) - counts)[pair]
    tile = starts[pair] + rank // block
    rows = torch.full((total * block,), -1, dtype=torch.int32, device=device)
    rows[tile * block + rank % block] = token.to(torch.int32)
    tile_pair = torch.repeat_interleave(torch.arange(counts.numel(), device=device), tiles_per_pair, output_size=total)
    if causal:
        last = torch.zeros(total, dtype=torch.long, device=device).scatter_reduce_(0, tile, token, "amax")
        tile_keys = last + offset + 1
    else:
        tile_keys = torch.full((total,), keys, dtype=torch.long, device=device)
    start = torch.zeros(batch, heads, dtype=torch.int32, device=device)
    end = torch.zeros(batch, heads, dtype=torch.int32, device=device)
    start[:, routed] = starts.view(batch, -1).to(torch.int32)
    end[:, routed] = ends.view(batch, -1).to(torch.int32)
    return Tiles(
        rows,
        (tile_pair // routed.numel()).to(torch.int32),
        routed[tile_pair % routed.numel()].to(torch.int32),
        tile_keys.to(torch.int32),
        start,
        end,
        total,
    )


def first_tiles(tiles: Tiles, keys: int, block: int) -> torch.Tensor:
    """[B, h, key blocks]: for each (sequence, head) and key block, the first of its tiles that reads the block
    (tiles are in position order, so the ones that see a block are a suffix of the head's tiles)."""
    batch, heads = tiles.start.shape
    blocks = torch.arange(0, keys, block, device=tiles.keys.device)  # [K]
    # keys read, made increasing across (sequence, head) segments: pair * (keys + 1) + tile keys
    tile_pair = torch.repeat_interleave(
        torch.arange(batch * heads, device=blocks.device),
        (tiles.end - tiles.start).flatten().long(),
        output_size=tiles.count,
    )
    ordered = tile_pair * (keys + 1) + tiles.keys.long()
    wanted = torch.arange(batch * heads, device=blocks.device)[:, None] * (keys + 1) + blocks[None, :]  # [B*h, K]
    first = torch.searchsorted(ordered, wanted.flatten(), right=True).view(batch, heads, -1)
    return torch.maximum(first, tiles.start[..., None].long()).to(torch.int32).contiguous()


def _row_index(tiles: Tiles, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed row: (valid, batch, token, head) as long tensors (token 0 on padding rows)."""
    valid = tiles.rows >= 0
    return (
        valid,
        tiles.batch.long().repeat_interleave(block),
        tiles.rows.long().clamp_min(0),
        tiles.head.long().repeat_interleave(block),
    )


def _precision(query: torch.Tensor) -> str:
    return "ieee" if query.dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16 inputs


class RoutedAttention(torch.autograd.Function):
    """The routed heads' gated attention: [B, T, h, d], zero outside the selected (token, routed head) pairs."""

    @staticmethod
    def forward(
        ctx, query, key, value, gates, key_padding, tiles: Tiles, causal: bool, scale: float, config: KernelConfig
    ):
        from .sparse_kernel_triton import routed_forward

        batch, heads, length, dim = query.shape
        query, key, value, gates = query.contiguous(), key.contiguous(), value.contiguous(), gates.contiguous()
        output = query.new_zeros(batch, length, heads, dim)
        packed = query.new_empty(tiles.count * config.rows, dim)  # ungated rows, for the backward
        lse = torch.empty(tiles.count * config.rows, dtype=torch.float32, device=query.device)
        keep = (
            key_padding.to(torch.int8).contiguous() if key_padding is not None else lse.new_zeros(1, dtype=torch.int8)
        )
        group, offset = heads // key.shape[1], key.shape[2] - length
        routed_forward[(tiles.count,)](
            query,
            key,
            value,
            gates,
            output,
            packed,
            lse,
            keep,
            tiles.rows,
            tiles.batch,
            tiles.head,
            tiles.keys,
            query.stride(0),
            query.stride(1),
            query.stride(2),
            key.stride(0),
            key.stride(1),
            key.stride(2),
            gates.stride(0),
            gates.stride(1),
            output.stride(0),
            output.stride(1),
            output.stride(2),
            keep.stride(0) if key_padding is not None else 0,
            group,
            offset,
            scale,
            CAUSAL=causal,
            HAS_KEEP=key_padding is not None,
            PRECISION=_precision(query),
            D=dim,
            BM=config.rows,
            BN=config.keys,
            num_warps=config.warps,
            num_stages=config.stages,
        )
        ctx.save_for_backward(query, key, value, gates, keep, packed, lse)
        ctx.settings = (tiles, causal, scale, config, key_padding is not None)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        from .sparse_kernel_triton import routed_backward_key_value, routed_backward_query

        query, key, value, gates, keep, packed, lse = ctx.saved_tensors
        tiles, causal, scale, config, has_keep = ctx.settings
        batch, heads, length, dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        group, offset = heads // kv_heads, keys - length
        valid, row_batch, row_token, row_head = _row_index(tiles, config.rows)
        upstream = grad_output[row_batch, row_token, row_head].float() * valid[:, None]  # [N * BM, d]
        row_gate = gates[row_batch, row_token, row_head].float()
        grad_gate = (upstream * packed.float()).sum(dim=1)  # d out / d gate, per row
        grad = (upstream * row_gate[:, None]).to(query.dtype).contiguous()  # gradient of the ungated output
        delta = (grad_gate * row_gate).contiguous()  # rowsum(grad * ungated output)
        grad_query = torch.zeros_like(query)
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
        common = dict(
            CAUSAL=causal, HAS_KEEP=has_keep, PRECISION=_precision(query), D=dim, BM=config.rows, BN=config.keys
        )
        keep_stride = keep.stride(0) if has_keep else 0
        routed_backward_query[(tiles.count,)](
            query,
            key,
            value,
            grad_query,
            grad,
            lse,
            delta,
            keep,
            tiles.rows,
            tiles.batch,
            tiles.head,
            tiles.keys,
            query.stride(0),
            query.stride(1),
            query.stride(2),
            key.stride(0),
            key.stride(1),
            key.stride(2),
            keep_stride,
            group,
            offset,
            scale,
            num_warps=config.warps,
            num_stages=config.stages,
            **common,
        )
        first = (
            first_tiles(tiles, keys, config.keys)
            if causal
            else tiles.start[..., None].expand(batch, heads, -(-keys // config.keys)).contiguous()
        )
        routed_backward_key_value[(-(-keys // config.keys), batch * kv_heads)](
            query,
            key,
            value,
            grad_key,
            grad_value,
            grad,
            lse,
            delta,
            keep,
            tiles.rows,
            first,
            tiles.end,
            query.stride(0),
            query.stride(1),
            query.stride(2),
            key.stride(0),
            key.stride(1),
            key.stride(2),
            keep_stride,
            first.stride(0),
            first.stride(1),
            tiles.end.stride(0),
            keys,
            heads,
            group,
            offset,
            scale,
            num_warps=config.backward_warps,
            num_stages=config.stages,
            **common,
        )
        grad_gates = None
        if ctx.needs_input_grad[3]:
            grad_gates = torch.zeros(gates.shape, dtype=torch.float32, device=gates.device)
            grad_gates[row_batch[valid], row_token[valid], row_head[valid]] = grad_gate[valid]
            grad_gates = grad_gates.to(gates.dtype)
        return grad_query, grad_key, grad_value, grad_gates, None, None, None, None, None


def head_sparse_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    key_padding: torch.Tensor | None,
    shared_heads: list[int],
    routed_heads: list[int],
    causal: bool,
    scaling: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Like :func:`sparse_attention.head_sparse_attention`, differentiable, with a key-padding mask [B, S]
    (True: a real key) instead of a 4-D mask. query [B, h, T, d]; key, value [B, g, S, d]; gates [B, T, h].
    Returns [B, T, h, d], zero for skipped pairs."""
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    config = config or default_config(query.device)
    scale = scaling if scaling is not None else dim**-0.5
    gates = gates.to(query.dtype)
    output = None
    if shared_heads:
        keep = None if key_padding is None else key_padding[:, None, None, :].expand(batch, 1, length, keys)
        output = head_sparse_attention(query, key, value, gates, keep, shared_heads, [], causal, scaling)
    tiles = (
        pack_tiles(gates.detach(), routed_heads, causal, keys - length, keys, config.rows) if routed_heads else None
    )
    if tiles is None:
        return output if output is not None else query.new_zeros(batch, length, heads, dim)
    routed = RoutedAttention.apply(query, key, value, gates, key_padding, tiles, causal, scale, config)
    return routed if output is None else output + routed


_VERDICTS: dict[tuple, str | None] = {}


def self_check(
    device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, padding: bool, backward: bool
) -> str | None:
    """Whether the kernel can be trusted for calls of this kind: None when a small case through it matches the masked
    reference (outputs, and with ``backward`` the gradients of q, k, v and the gates), else why not (a compile or
    launch error, or the largest mismatch). Run once per kind and process; ``UPCYCLE_KERNEL_SELF_CHECK=0`` skips it.
    The case uses the same kernel variant (dtype, head width, causal, padding) as the call, so it compiles nothing the
    call would not."""
    if os.environ.get(SELF_CHECK_ENV, "1") == "0":
        return None
    kind = (str(device), dtype, head_dim, causal, padding, backward)
    if kind not in _VERDICTS:
        started = time.perf_counter()
        try:
            verdict = _compare_with_reference(device, dtype, head_dim, causal, padding, backward)
        except Exception as error:  # compile and launch errors: any of them means the kernel is not usable here
            text = " ".join(str(error).split())
            verdict = f"{type(error).__name__}: {text[:200]}"
        _VERDICTS[kind] = verdict
        logger.debug(
            "head-sparse kernel self-check %s: %s in %.3f s", kind, verdict or "passed", time.perf_counter() - started
        )
    return _VERDICTS[kind]


def masked_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    key_padding: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Every head through SDPA, times its gates: [B, T, h, d] (the path the kernel must equal)."""
    batch, heads, length, _ = query.shape
    keys = key.shape[2]
    group = heads // key.shape[1]
    keep = torch.ones(batch, 1, length, keys, dtype=torch.bool, device=query.device)
    if causal:
        keep = keep & torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
    if key_padding is not None:
        keep = keep & key_padding[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=keep, scale=scale
    )  # [B, h, T, d]
    return out.transpose(1, 2) * gates[..., None]


def _compare_with_reference(
    device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, padding: bool, backward: bool
) -> str | None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length = 2, 4, 2, 40
    shared, routed = [0], [1, 2, 3]

    def sample(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    query, key = sample(batch, heads, length, head_dim), sample(batch, kv_heads, length, head_dim)
    value = sample(batch, kv_heads, length, head_dim)
    choice = torch.rand(batch, length, len(routed), generator=generator).argsort(-1) < 2  # top-2 of 3 routed heads
    gates = torch.cat(
        [torch.ones(batch, length, 1), choice * (0.5 + torch.rand(choice.shape, generator=generator))], -1
    )
    key_padding = None
    if padding:
        key_padding = torch.ones(batch, length, dtype=torch.bool)
        key_padding[1, length - 7 :] = False  # right padding: every query still sees a real key
    weights = sample(batch, length, heads, head_dim)
    scale = head_dim**-0.5
    inputs = [t.to(device, dtype).requires_grad_(backward) for t in (query, key, value, gates)]
    exact = [t.to(device, torch.float32).requires_grad_(backward) for t in (query, key, value, gates)]
    padding_on_device = None if key_padding is None else key_padding.to(device)
    with torch.enable_grad() if backward else torch.no_grad():
        got = head_sparse_attention_kernel(*inputs, padding_on_device, shared, routed, causal=causal, scaling=scale)
        expected = masked_reference(*exact, padding_on_device, causal, scale)
        pairs = [("output", got.float(), expected)]
        if backward:
            weights = weights.to(device)
            got_grads = torch.autograd.grad((got.float() * weights).sum(), inputs)
            expected_grads = torch.autograd.grad((expected * weights).sum(), exact)
            names = ("query gradient", "key gradient", "value gradient")
            pairs += [(n, g.float(), e) for n, g, e in zip(names, got_grads, expected_grads)]
            chosen = exact[3] != 0  # a skipped (token, head) pair has no output, so no gate gradient on this path
            pairs.append(("gate gradient", got_grads[3].float()[chosen], expected_grads[3][chosen]))
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 4e-2)
    for name, got_value, expected_value in pairs:
        error = ((got_value - expected_value).abs().max() / expected_value.abs().max().clamp_min(1e-6)).item()
        if not error <= tolerance:  # also catches NaN
            return f"{name} differs from the masked reference by {error:.2e} (relative; tolerance {tolerance:.0e})"
    return None
