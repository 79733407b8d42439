"""Head-sparse attention, Triton forward kernel (work in progress: forward only, not yet dispatched).

Routed heads only: the queries each (sequence, head) selected are packed into tiles of
``BLOCK_M`` rows; each row keeps its token index, so its position drives the causal mask, and a
tile reads the key blocks up to its last position only. Online softmax in fp32, output times
the gate, written back to ``[B, T, h, d]``. Shared heads go through SDPA as in the torch path.
Triton is imported lazily; on the CPU the kernel runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_M, BLOCK_N = 16, 16


def pack_tiles(gates: torch.Tensor, routed_heads: list[int], causal: bool, offset: int, keys: int, block: int = BLOCK_M):
    """Tiles of selected (sequence, routed head) query rows: rows [tiles * block] (token or -1), and per tile
    its sequence, head and how many keys it reads (up to its last position when causal)."""
    rows, batches, heads, reads = [], [], [], []
    for head in routed_heads:
        for item in range(gates.shape[0]):
            selected = gates[item, :, head].nonzero().squeeze(-1)
            for start in range(0, selected.numel(), block):
                tile = selected[start:start + block]
                rows.append(F.pad(tile, (0, block - tile.numel()), value=-1))
                batches.append(item)
                heads.append(head)
                reads.append(int(tile[-1]) + offset + 1 if causal else keys)
    device = gates.device
    if not rows:
        return None
    return (torch.cat(rows).to(torch.int32), torch.tensor(batches, dtype=torch.int32, device=device),
            torch.tensor(heads, dtype=torch.int32, device=device), torch.tensor(reads, dtype=torch.int32, device=device))


def head_sparse_attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gates: torch.Tensor,
                                 key_padding: torch.Tensor | None, shared_heads: list[int], routed_heads: list[int],
                                 causal: bool, scaling: float | None = None) -> torch.Tensor:
    """Like :func:`sparse_attention.head_sparse_attention` (forward only), with a key-padding mask [B, S]
    (True: a real key) instead of a 4-D mask. Returns [B, T, h, d]."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group, offset = heads // kv_heads, keys - length
    scale = scaling if scaling is not None else dim ** -0.5
    output = query.new_zeros(batch, length, heads, dim)
    if shared_heads:
        from .sparse_attention import head_sparse_attention

        keep = None if key_padding is None else key_padding[:, None, None, :].expand(batch, 1, length, keys)
        output += head_sparse_attention(query, key, value, gates, keep, shared_heads, [], causal, scaling)
    packed = pack_tiles(gates, routed_heads, causal, offset, keys)
    if packed is None:
        return output
    from .sparse_kernel_triton import routed_forward

    rows, tile_batch, tile_head, tile_keys = packed
    query, key, value, gates = query.contiguous(), key.contiguous(), value.contiguous(), gates.contiguous()
    keep = key_padding.to(torch.int8).contiguous() if key_padding is not None else torch.ones(1, dtype=torch.int8, device=query.device)
    routed_forward[(tile_batch.numel(),)](
        query, key, value, gates, output, keep, rows, tile_batch, tile_head, tile_keys,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        gates.stride(0), gates.stride(1), output.stride(0), output.stride(1), output.stride(2),
        keep.stride(0) if key_padding is not None else 0,
        group, offset, scale,
        CAUSAL=causal, HAS_KEEP=key_padding is not None, D=dim, BM=BLOCK_M, BN=BLOCK_N)
    return output
