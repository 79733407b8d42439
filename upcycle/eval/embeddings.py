"""Sentence embeddings of encoders (mean pooling, the sentence-transformers recipe) and their agreement."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def sentence_embeddings(
    folder: Path | str, sentences: list[str], tokenizer_folder: Path | str | None = None, max_length: int = 128
) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of the encoder at ``folder``: [N, D]."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # [N, T, D]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [N, T, 1]
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def mean_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two L2-normalised [N, D] embeddings."""
    return (embeddings * reference).sum(dim=-1).mean().item()
