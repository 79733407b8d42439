"""Calibration text as token blocks for the methods that look at data (decoders and BERT-style encoders).

:func:`calibration_blocks` is the one entry point (prune-heads, moh, mhe, and the o_proj refit of gqa and prune-heads
use it): the text pipeline of :mod:`upcycle.data.text` on the checkpoint's own tokenizer, capped at its context length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UpcycleError
from ..tokenizer import load_tokenizer
from .text import pack_tokens, read_documents


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
MIX_SEED = 0  # the order in which the blocks of a calibration mix are interleaved


def calibration_texts(value: list[str | Path] | str | Path | None) -> list[str]:
    """The calibration texts of an option's value: a list, one path (the library's spelling for one text) or none."""
    if not value:
        return []
    return [str(value)] if isinstance(value, (str, Path)) else [str(text) for text in value]


def check_calibration(texts: list[str | Path] | str | Path, weights: list[float] | None = None) -> list[float]:
    """The shares of the calibration budget, one per ``--calibration`` text (``weights`` normalised; equal shares
    without them), after one line for a text that does not exist or is not a file or folder, an unknown asset, or
    weights that do not fit the texts. Assets are named, not written."""
    from ..assets import TEXT_ASSETS

    texts, weights = calibration_texts(texts), list(weights or [])
    for text in texts:
        text = str(text)
        if text.startswith("asset:"):
            if text.removeprefix("asset:") not in TEXT_ASSETS:
                known = ", ".join(f"asset:{name}" for name in TEXT_ASSETS)
                raise UpcycleError(f"--calibration {text} is not a text asset; use one of {known}, or a file")
            continue
        path = Path(text).expanduser()
        if not path.exists():
            raise UpcycleError(
                f"--calibration {text} does not exist; pass a text or jsonl file, a folder of them, or asset:NAME"
            )
        if not (path.is_file() or path.is_dir()):
            raise UpcycleError(f"--calibration {text} is not a regular file or folder; pass a .txt/.jsonl file")
    if weights and len(weights) != len(texts):
        raise UpcycleError(
            f"{len(weights)} --calibration-weights for {len(texts)} --calibration texts; give one weight per text, "
            "in the same order, or none (equal shares)"
        )
    if any(not (weight >= 0) or weight == float("inf") for weight in weights) or (weights and sum(weights) <= 0):
        raise UpcycleError(
            f"--calibration-weights {', '.join(map(str, weights))}: give finite weights >= 0 that do not all vanish, "
            "e.g. 0.5 0.5"
        )
    total = sum(weights) if weights else len(texts)
    return [weight / total for weight in weights] if weights else [1 / total] * len(texts)


def calibration_blocks(
    folder: Path,
    config: dict,
    texts: list[str | Path] | str | Path,
    tokens: int,
    seq_len: int,
    encoder: bool,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Packed calibration blocks [N, T] of the calibration texts (files, folders or ``asset:NAME``), each given its
    share of ``tokens`` (``weights``; equal shares without them), interleaved in a fixed pseudo-random order: EOS
    between documents for decoders, ``[CLS] ... [SEP]`` blocks with [SEP] between documents for encoders. A budget
    below one block of ``seq_len`` makes the blocks shorter: every text's share fits at least one."""
    from ..assets import resolve_text

    texts = calibration_texts(texts)
    shares = check_calibration(texts, weights)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise UpcycleError(
            f"--calibration-tokens {tokens} is too few to calibrate on; give at least {MIN_CALIBRATION_TOKENS} "
            "(the default is 16384)"
        )
    budgets = [int(tokens * share) for share in shares if share > 0]
    documents = [read_documents(Path(resolve_text(str(text)))) for text, share in zip(texts, shares) if share > 0]
    length = min(calibration_seq_len(config, seq_len), *budgets)
    if encoder:
        tokenizer = encoder_tokenizer(folder)
        packer, length = SepAsEos(tokenizer), max(length - 2, 2)  # the text between [CLS] and [SEP]
    else:
        tokenizer = packer = load_tokenizer(folder)
    blocks = torch.cat(
        [
            pack_tokens(docs, packer, length, max(budget, length), budget_name="--calibration-tokens")
            for docs, budget in zip(documents, budgets)
        ]
    )
    if len(documents) > 1:
        blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(MIX_SEED))]
    return wrap_cls_sep(blocks, tokenizer) if encoder else blocks


def options_calibration_blocks(reader, options, encoder: bool) -> torch.Tensor:
    """:func:`calibration_blocks` of a method's options (``calibration``, ``calibration_weights``,
    ``calibration_tokens``, ``calibration_seq_len``) on the checkpoint behind ``reader``."""
    return calibration_blocks(
        reader.folder,
        reader.config,
        options.calibration,
        options.calibration_tokens,
        options.calibration_seq_len,
        encoder,
        options.calibration_weights,
    )
