"""Head-sparse attention in plain torch: only the (token, head) pairs whose gate is non-zero are computed.

Shared (always-on) heads go through one SDPA call over all their tokens. The routed heads that
read one KV head are done together, per sequence and per window of ``chunk`` positions: each
head's selected queries in the window are gathered (padded to the longest head, padding dropped),
keep their positions for the causal and padding masks, and read only the keys up to the window's
end (later keys are masked for all of its queries anyway). Outputs are
multiplied by the gates, so gradients reach queries, keys, values and gates as in the masked
reference. Used on the CPU and wherever the Triton kernel is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 256  # positions per window of routed queries


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
        whole_groups = sorted(shared_heads) == [h for kv in sorted(set(shared_heads[i] // group for i in range(len(shared_heads))))
                                                for h in range(kv * group, (kv + 1) * group)]
        gqa = {}
        if whole_groups:  # the shared heads are whole KV groups: read each KV head once (SDPA's GQA), no copies
            index = torch.tensor(sorted(shared_heads), device=query.device)
            kv_index = torch.tensor(sorted(set(h // group for h in shared_heads)), device=query.device)
            gqa = {"enable_gqa": True} if group > 1 else {}
        mask = None if keep is None else keep if keep.shape[1] == 1 else keep[:, index]
        if causal and (mask is not None or offset):  # SDPA's is_causal aligns queries to the first keys: spell it out
            causal_mask = torch.arange(keys, device=query.device)[None, :] <= torch.arange(offset, keys, device=query.device)[:, None]
            mask = causal_mask if mask is None else mask & causal_mask
        dense = F.scaled_dot_product_attention(
            query[:, index], key[:, kv_index], value[:, kv_index], attn_mask=None if mask is None else _additive(mask, query.dtype),
            is_causal=causal and mask is None and length > 1, scale=scaling, **gqa)  # [B, s, T, d]
        output[:, :, index] = dense.transpose(1, 2) * gates[:, :, index, None]
    key_positions = torch.arange(keys, device=query.device)
    for kv in range(kv_heads):
        heads_here = torch.tensor([head for head in routed_heads if head // group == kv], device=query.device, dtype=torch.long)
        if not heads_here.numel():
            continue
        for item in range(batch):
            for start in range(0, length, chunk):  # position windows: every routed head of this KV head in one call
                window = gates[item, start:start + chunk][:, heads_here].T != 0  # [r, w]
                counts = window.sum(dim=1)  # [r]
                most = int(counts.max())
                if not most:
                    continue
                # selected token indices per head, padded with the window's first token (rows dropped below): [r, n]
                order = torch.sort((~window).to(torch.int8), dim=1, stable=True).indices[:, :most]
                valid = torch.arange(most, device=query.device)[None, :] < counts[:, None]  # [r, n]
                tokens = torch.where(valid, order + start, start)  # [r, n]
                last = min(start + chunk, length) + offset if causal else keys  # later keys are never seen by the window
                mask = torch.ones(tokens.shape[0], most, last, dtype=torch.bool, device=query.device)  # [r, n, S']
                if causal:
                    mask &= key_positions[:last] <= (tokens + offset)[..., None]
                if keep is not None:
                    rows = keep[item, 0][tokens] if keep.shape[1] == 1 else keep[item, heads_here[:, None], tokens]  # [r, n, S]
                    mask &= rows[..., :last]
                attended = F.scaled_dot_product_attention(
                    query[item, heads_here[:, None], tokens][None],  # [1, r, n, d]
                    key[item, kv, :last][None, None].expand(1, heads_here.numel(), last, dim),
                    value[item, kv, :last][None, None].expand(1, heads_here.numel(), last, dim),
                    attn_mask=_additive(mask, query.dtype)[None], scale=scaling)[0]  # [r, n, d]
                head_index = heads_here[:, None].expand_as(tokens)[valid]
                token_index = tokens[valid]
                output[item, token_index, head_index] = attended[valid] * gates[item, token_index, head_index, None]
    return output
