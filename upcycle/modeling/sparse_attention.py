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

from dataclasses import dataclass

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


def _as_index(indices: list[int], device: torch.device) -> slice | torch.Tensor:
    """A consecutive run of indices as a slice (views, no copies), else an index tensor."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, device=device)


def _shared_layout(
    shared_heads: list[int], group: int, device: torch.device
) -> tuple[slice | torch.Tensor, slice | torch.Tensor, bool]:
    """(query heads, KV heads, whether SDPA's GQA applies) for the one SDPA call of the shared heads.

    When the shared heads are whole KV groups each KV head is read once (SDPA's GQA); otherwise every
    shared head gets its own copy of its KV head.
    """
    kv_of_shared = sorted({head // group for head in shared_heads})
    if sorted(shared_heads) == [head for kv in kv_of_shared for head in range(kv * group, (kv + 1) * group)]:
        return _as_index(sorted(shared_heads), device), _as_index(kv_of_shared, device), group > 1
    return (
        _as_index(list(shared_heads), device),
        torch.tensor([head // group for head in shared_heads], device=device),
        False,
    )


def head_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    attention_mask: torch.Tensor | None,
    shared_heads: list[int],
    routed_heads: list[int],
    causal: bool,
    scaling: float | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
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
        heads_index, kv_index, gqa = _shared_layout(shared_heads, group, query.device)
        mask = None if keep is None else keep if keep.shape[1] == 1 else keep[:, heads_index]
        if causal and length > 1 and (mask is not None or offset):  # SDPA's is_causal aligns queries to the first keys
            causal_mask = (
                torch.arange(keys, device=query.device)[None, :]
                <= torch.arange(offset, keys, device=query.device)[:, None]
            )
            mask = causal_mask if mask is None else mask & causal_mask
        dense = F.scaled_dot_product_attention(
            query[:, heads_index],
            key[:, kv_index],
            value[:, kv_index],
            attn_mask=None if mask is None else _additive(mask, query.dtype),
            is_causal=causal and mask is None and length > 1,
            scale=scaling,
            enable_gqa=gqa,
        )  # [B, s, T, d]
        output[:, :, heads_index] = dense.transpose(1, 2) * gates[:, :, heads_index, None]
    if length == 1 and routed_heads and (keep is None or keep.shape[1] == 1):
        _decode_step(query, key, value, gates, keep, routed_heads, group, scaling, output)
        return output
    windows = _routed_windows(gates, routed_heads, group, kv_heads, chunk)
    if not windows:
        return output
    # One gather of every window's queries and one scatter of every output: per-window indexing would make
    # the backward allocate a full-size gradient of query (and key, value) for each window.
    items = torch.cat([torch.full((w.tokens.numel(),), w.item, device=query.device) for w in windows])
    heads_index = torch.cat([w.heads[:, None].expand_as(w.tokens).flatten() for w in windows])
    tokens = torch.cat([w.tokens.flatten() for w in windows])
    valid = torch.cat([w.valid.flatten() for w in windows])
    queries = query[items, heads_index, tokens].split([w.tokens.numel() for w in windows])  # each [r * n, d]
    key_rows = [item.unbind(0) for item in key.unbind(0)]  # [B][g] -> [S, d]
    value_rows = [item.unbind(0) for item in value.unbind(0)]
    key_positions = torch.arange(keys, device=query.device)
    attended = []
    for window, queries_here in zip(windows, queries):
        routed, most = window.tokens.shape
        mask, last = _window_mask(
            keep,
            window.item,
            window.heads,
            window.tokens,
            window.start,
            min(window.start + chunk, length),
            offset,
            keys,
            causal,
            key_positions,
            query.dtype,
        )
        attended.append(
            F.scaled_dot_product_attention(
                queries_here.view(1, routed, most, dim),
                key_rows[window.item][window.kv][:last].expand(1, routed, last, dim),
                value_rows[window.item][window.kv][:last].expand(1, routed, last, dim),
                attn_mask=None if mask is None else mask[None],
                scale=scaling,
            ).view(-1, dim)
        )  # [r * n, d]
    items, heads_index, tokens = items[valid], heads_index[valid], tokens[valid]
    output[items, tokens, heads_index] = torch.cat(attended)[valid] * gates[items, tokens, heads_index, None]
    return output


@dataclass
class _Window:
    """One SDPA call of the routed heads of KV head ``kv`` in sequence ``item``, positions from ``start``: the
    selected token indices per head, padded with the window's first token (tokens, valid: [r, n])."""

    item: int
    kv: int
    start: int
    heads: torch.Tensor  # [r]
    tokens: torch.Tensor
    valid: torch.Tensor


def _routed_windows(
    gates: torch.Tensor, routed_heads: list[int], group: int, kv_heads: int, chunk: int
) -> list[_Window]:
    """The routed heads' windows that hold at least one selected token."""
    windows = []
    batch, length = gates.shape[:2]
    for kv in range(kv_heads):
        heads = torch.tensor(
            [head for head in routed_heads if head // group == kv], device=gates.device, dtype=torch.long
        )
        if not heads.numel():
            continue
        for item in range(batch):
            for start in range(0, length, chunk):  # position windows: every routed head of this KV head in one call
                selected = gates[item, start : start + chunk][:, heads].T != 0  # [r, w]
                counts = selected.sum(dim=1)  # [r]
                most = int(counts.max())
                if not most:
                    continue
                order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :most]  # selected first
                valid = torch.arange(most, device=gates.device)[None, :] < counts[:, None]  # [r, n]
                windows.append(_Window(item, kv, start, heads, torch.where(valid, order + start, start), valid))
    return windows


def _decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    keep: torch.Tensor | None,
    routed_heads: list[int],
    group: int,
    scaling: float | None,
    output: torch.Tensor,
) -> None:
    """The routed heads of a one-token step (decode with a KV cache), in one SDPA call, into ``output``.

    The single query of a sequence sees the same keys in every head, so the routed heads a token
    selected within one KV group become rows of one query block against that KV head, read once:
    queries [B, m, n, d] for the m KV heads with routed heads and at most n selected heads each.
    """
    batch = query.shape[0]
    device = query.device
    kv_list = sorted({head // group for head in routed_heads})
    table = [[head for head in routed_heads if head // group == kv] for kv in kv_list]
    width = max(len(heads) for heads in table)
    heads = torch.tensor([row + row[:1] * (width - len(row)) for row in table], device=device)  # [m, w], padded
    real = torch.tensor([[i < len(row) for i in range(width)] for row in table], device=device)  # [m, w]
    selected = (gates[:, 0][:, heads] != 0) & real  # [B, m, w]
    counts = selected.sum(dim=-1)  # [B, m]
    most = int(counts.max())
    if not most:
        return
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[
        ..., :most
    ]  # selected first: [B, m, n]
    rows = heads[torch.arange(len(kv_list), device=device)[:, None], order]  # head of each row: [B, m, n]
    valid = torch.arange(most, device=device) < counts[..., None]  # [B, m, n]
    items = torch.arange(batch, device=device)[:, None, None].expand_as(rows)
    kv_index = _as_index(kv_list, device)
    mask = None if keep is None else _additive(keep[:, :, -1:], query.dtype)  # [B, 1, 1, S]: padding only
    attended = F.scaled_dot_product_attention(
        query[items, rows, 0], key[:, kv_index], value[:, kv_index], attn_mask=mask, scale=scaling
    )  # [B, m, n, d]
    item_index, head_index = items[valid], rows[valid]
    output[item_index, 0, head_index] = attended[valid] * gates[item_index, 0, head_index, None]


def _window_mask(
    keep: torch.Tensor | None,
    item: int,
    heads: torch.Tensor,
    tokens: torch.Tensor,
    start: int,
    end: int,
    offset: int,
    keys: int,
    causal: bool,
    key_positions: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, int]:
    """The additive mask [r, n, S'] of one window's gathered queries (tokens [r, n]) and the keys it reads (S').

    Causal: the window reads keys up to its last position; keys before its first position are seen by all of
    its queries, so only the window's own keys are masked. A one-position window (a decode step) needs no
    causal mask at all, and without padding no mask is built.
    """
    last = end + offset if causal else keys
    first = start + offset  # keys before this position: visible to every query of the window
    needs_causal = causal and last - first > 1
    if keep is None and not needs_causal:
        return None, last
    if keep is None:
        mask = torch.zeros(*tokens.shape, last, dtype=dtype, device=tokens.device)  # [r, n, S']
        visible = key_positions[first:last] <= (tokens + offset)[..., None]  # [r, n, w]
        mask[..., first:] = _additive(visible, dtype)
        return mask, last
    rows = keep[item, 0][tokens] if keep.shape[1] == 1 else keep[item, heads[:, None], tokens]  # [r, n, S]
    visible = rows[..., :last]
    if needs_causal:
        visible = visible & (key_positions[:last] <= (tokens + offset)[..., None])
    return _additive(visible, dtype), last
