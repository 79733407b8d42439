"""Perplexity of a causal language model: on packed token blocks, or on one stream with sliding windows."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError

if TYPE_CHECKING:
    from upcycle.eval.usage import HeadUsage


def perplexity(model: torch.nn.Module, blocks: torch.LongTensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(sum of next-token cross-entropies / number of predicted tokens) over ``blocks`` [N, seq_len].

    Each block is scored on its own (seq_len - 1 predictions per block); the model runs in eval mode under
    ``torch.no_grad`` on the device of its parameters, and its train/eval mode is restored afterwards.
    """
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        shape = tuple(blocks.shape)
        raise UpcycleError(f"perplexity needs token blocks of shape [N>=1, seq_len>=2], got {shape}: pack more text")
    if batch_size < 1:
        raise UpcycleError(f"batch_size must be at least 1, got {batch_size}: raise it")
    device = next(model.parameters()).device
    batches = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in batches:
                ids = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
    finally:
        model.train(training)
    mean = total / (blocks.shape[0] * (blocks.shape[1] - 1))
    return math.exp(mean) if mean < 709 else math.inf


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: inputs ids[begin:end] predict ids[begin+1:end+1], of which
    ids[first_target:end+1] are scored here (the earlier ones were scored by the previous window)."""
    spans, next_target, begin = [], 1, 0
    while next_target < n:
        end = min(begin + window, n - 1)
        spans.append((begin, end, next_target))
        next_target, begin = end + 1, begin + stride
    return spans


def sliding_window_nll(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    window: int,
    stride: int,
    batch_size: int = 1,
    usage: HeadUsage | None = None,
) -> tuple[float, int]:
    """(summed NLL, number of predicted tokens) of one token stream [N], scored with sliding windows.

    Every token but the first is predicted exactly once (N - 1 predictions), from up to ``window`` tokens of
    context: the model reads windows of ``window`` tokens starting every ``stride`` tokens, and each window
    scores only the tokens that no earlier window scored (the standard Hugging Face method, counted exactly;
    the final window may be shorter). ``stride == window`` is block scoring of blocks of ``window + 1``
    tokens that share their boundary token; a smaller stride gives later tokens more context.
    An active ``HeadUsage`` given as ``usage`` counts each input position once (its mask is set to the
    positions whose next token is scored, then cleared), so every token but the last counts exactly once.
    Runs in eval mode under ``torch.no_grad`` on the model's device; the train/eval mode is restored.
    """
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise UpcycleError(
            "sliding-window perplexity needs a 1-D token stream of >= 2 tokens, "
            f"got shape {tuple(token_ids.shape)}: give more text"
        )
    if window < 1 or not 1 <= stride <= window:
        raise UpcycleError(
            f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}: fix them"
        )
    if batch_size < 1:
        raise UpcycleError(f"batch_size must be at least 1, got {batch_size}: raise it")
    device = next(model.parameters()).device
    ids = token_ids.to(device=device, dtype=torch.long)
    spans = _windows(ids.numel(), window, stride)
    # batches of consecutive windows of equal length (only the last window can be shorter)
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == span[1] - span[0]:
            batches[-1].append(span)
        else:
            batches.append([span])
    training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = torch.stack([ids[b:e] for b, e, _ in batch])  # [B, L]
                labels = torch.stack([ids[b + 1 : e + 1] for b, e, _ in batch]).clone()  # [B, L]
                for row, (b, _, first) in enumerate(batch):
                    labels[row, : first - b - 1] = -100  # already scored by the previous window
                if usage is not None:
                    usage.set_mask(labels != -100)  # [B, L]: position j predicts a scored token
                logits = model(input_ids=inputs, use_cache=False).logits.float()  # [B, L, V]
                total += F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
                ).item()
                count += int((labels != -100).sum())
    finally:
        model.train(training)
        if usage is not None:
            usage.set_mask(None)
    return total, count
