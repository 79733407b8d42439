"""Head-sparse attention in plain torch: only the (token, head) pairs whose gate is non-zero are computed.

Shared (always-on) heads go through one SDPA call over all their tokens. Each routed head's
selected queries are gathered per sequence, keep their positions for the causal and padding
masks, and go through SDPA in position-ordered chunks, each chunk reading only the keys up to
its last query's position (later keys are masked for all of its queries anyway). Outputs are
multiplied by the gates, so gradients reach queries, keys, values and gates as in the masked
reference. Used on the CPU and wherever the Triton kernel is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 256  # routed queries per SDPA call


def _keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [B, 1|h, T, S] mask as booleans (True: may attend); additive float masks are converted."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as an additive float mask (0 or -inf): SDPA on the CPU runs these faster."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def head_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gates: torch.Tensor,
                          attention_mask: torch.Tensor | None, shared_heads: list[int], routed_heads: list[int],
                          causal: bool, scaling: float | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Attention of the gated (token, head) pairs only.

    query: [B, h, T, d]; key, value: [B, g, S, d] (S >= T: the last T key positions are the queries');
    gates: [B, T, h], zero where a token skips a routed head; attention_mask: None or [B, 1|h, T, S].
    Returns [B, T, h, d], zero for skipped pairs.
    """
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    offset = keys - length  # position of query t is offset + t
    keep = _keep_mask(attention_mask)
    gates = gates.to(query.dtype)
    output = query.new_zeros(batch, length, heads, dim)
    if shared_heads:
        index = torch.tensor(shared_heads, device=query.device)
        kv_index = index // group
        mask = None if keep is None else keep if keep.shape[1] == 1 else keep[:, index]
        if causal and (mask is not None or offset):  # SDPA's is_causal aligns queries to the first keys: spell it out
            causal_mask = torch.arange(keys, device=query.device)[None, :] <= torch.arange(offset, keys, device=query.device)[:, None]
            mask = causal_mask if mask is None else mask & causal_mask
        dense = F.scaled_dot_product_attention(
            query[:, index], key[:, kv_index], value[:, kv_index], attn_mask=None if mask is None else _additive(mask, query.dtype),
            is_causal=causal and mask is None and length > 1, scale=scaling)  # [B, s, T, d]
        output[:, :, index] = dense.transpose(1, 2) * gates[:, :, index, None]
    key_positions = torch.arange(keys, device=query.device)
    for head in routed_heads:
        kv = head // group
        for item in range(batch):
            selected = gates[item, :, head].nonzero().squeeze(-1)  # [n] token indices, ascending
            for start in range(0, selected.numel(), chunk):
                tokens = selected[start:start + chunk]  # [c]
                last = int(tokens[-1]) + offset + 1 if causal else keys  # keys past the chunk's last query are never seen
                mask = torch.ones(tokens.numel(), last, dtype=torch.bool, device=query.device)  # [c, S']
                if causal:
                    mask &= key_positions[:last] <= (tokens + offset)[:, None]
                if keep is not None:
                    mask &= keep[item, 0 if keep.shape[1] == 1 else head][tokens, :last]
                attended = F.scaled_dot_product_attention(
                    query[item, head, tokens][None, None], key[item, kv, :last][None, None], value[item, kv, :last][None, None],
                    attn_mask=_additive(mask, query.dtype)[None, None], scale=scaling)[0, 0]  # [c, d]
                output[item, tokens, head] = attended * gates[item, tokens, head, None]
    return output
