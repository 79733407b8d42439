"""Calibration text as token blocks for the methods that look at data (decoders and BERT-style encoders).

:func:`calibration_blocks` is the one entry point (prune-heads, moh, mhe, and the o_proj refit of gqa and prune-heads
use it): the text pipeline of :mod:`upcycle.data.text` on the checkpoint's own tokenizer, capped at its context length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UpcycleError
from .text import pack_tokens, read_documents


def load_tokenizer(folder: Path):
    """The checkpoint's own tokenizer, or one line saying it is missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UpcycleError(
            f"{folder} has no usable tokenizer for the calibration text ({str(error).splitlines()[0]}); "
            "add the tokenizer files"
        ) from None


class SepAsEos:
    """A BERT tokenizer as ``pack_tokens`` sees it: [SEP] separates documents."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id = tokenizer, tokenizer.sep_token_id

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def wrap_cls_sep(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """[N, T] -> [N, T + 2]: [CLS] tokens [SEP]."""
    column = tokens.new_full((tokens.shape[0], 1), 0)
    return torch.cat([column + tokenizer.cls_token_id, tokens, column + tokenizer.sep_token_id], dim=1)


def calibration_seq_len(config: dict, wanted: int) -> int:
    """``wanted``, capped at the model's context length."""
    return min(wanted, int(config.get("max_position_embeddings") or wanted))


def encoder_tokenizer(folder: Path):
    """A BERT-style tokenizer with [CLS] and [SEP], or one line saying what is missing."""
    tokenizer = load_tokenizer(folder)
    if tokenizer.sep_token_id is None or tokenizer.cls_token_id is None:
        raise UpcycleError(
            f"the tokenizer of {folder} has no [CLS]/[SEP] tokens; pass a BERT checkpoint with its tokenizer"
        )
    return tokenizer


def contrastive_pairs(blocks: torch.Tensor) -> torch.Tensor:
    """Encoder calibration blocks [N, T] (``[CLS] tokens [SEP]``) -> [2N, 2 + (T - 2) // 2]: the first halves of the
    tokens, then the second halves, each again between [CLS] and [SEP] (row i and row N + i are a text and its
    continuation: a positive pair)."""
    cls, sep, tokens = blocks[:, :1], blocks[:, -1:], blocks[:, 1:-1]
    half = tokens.shape[1] // 2
    return torch.cat([torch.cat([cls, part, sep], dim=1) for part in (tokens[:, :half], tokens[:, half : 2 * half])])


MIN_CALIBRATION_TOKENS = 16


def calibration_blocks(
    folder: Path, config: dict, text: Path | str, tokens: int, seq_len: int, encoder: bool
) -> torch.Tensor:
    """Packed calibration blocks [N, T] of the text at ``text``: EOS between documents for decoders;
    ``[CLS] ... [SEP]`` blocks with [SEP] between documents for encoders. A budget of ``tokens`` below one block of
    ``seq_len`` is one shorter block of that many tokens."""
    if tokens < MIN_CALIBRATION_TOKENS:
        raise UpcycleError(
            f"--calibration-tokens {tokens} is too few to calibrate on; give at least {MIN_CALIBRATION_TOKENS} "
            "(the default is 16384)"
        )
    documents = read_documents(Path(text))
    seq_len = calibration_seq_len(config, seq_len)
    if not encoder:
        return pack_tokens(
            documents, load_tokenizer(folder), min(seq_len, tokens), tokens, budget_name="--calibration-tokens"
        )
    tokenizer = encoder_tokenizer(folder)
    length = min(seq_len - 2, tokens)  # the text between [CLS] and [SEP]
    blocks = pack_tokens(documents, SepAsEos(tokenizer), length, tokens, budget_name="--calibration-tokens")
    return wrap_cls_sep(blocks, tokenizer)
