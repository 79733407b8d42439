"""Perplexity of a causal language model on packed token blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError


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
