"""Evaluate saved models (dense or converted) on one token stream: perplexity, speed and head usage."""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.eval.perplexity import sliding_window_nll
from upcycle.eval.usage import HeadUsage


def eval_tokens_from_text(path: str | Path, tokenizer, max_tokens: int | None = None) -> torch.LongTensor:
    """One token stream [N] from the documents in ``path`` (``read_documents``): tokenised without special tokens,
    EOS between documents, truncated to ``max_tokens``. ``tokenizer`` is a tokenizer or a folder holding one."""
    from upcycle.data.text import _token_stream, read_documents

    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if max_tokens is not None and max_tokens < 2:
        raise UpcycleError(f"max_tokens={max_tokens} leaves nothing to predict: give at least 2")
    if tokenizer.eos_token_id is None:
        raise UpcycleError("the tokenizer has no EOS token to separate documents: set tokenizer.eos_token")
    tokens: list[int] = []
    for ids in _token_stream(read_documents(path), tokenizer, tokenizer.eos_token_id):
        tokens.extend(ids)
        if max_tokens is not None and len(tokens) >= max_tokens:
            break
    if len(tokens) < 2:
        raise UpcycleError(f"{path} gives {len(tokens)} token(s), too few to evaluate: give more text")
    return torch.tensor(tokens[:max_tokens], dtype=torch.long)


def load_model(model_path: str | Path, device: str | None = None) -> torch.nn.Module:
    """A dense or converted causal LM in eval mode: fp32 on CPU, bf16 on CUDA (``device`` None: CUDA if available)."""
    import upcycle  # noqa: F401  (registers the Auto classes: converted folders load without remote code)
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if not Path(model_path).expanduser().is_dir():
        raise UpcycleError(f"model folder {model_path} does not exist: give a saved or converted model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(Path(model_path).expanduser(), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UpcycleError(f"cannot load {model_path} as a causal LM ({str(e).splitlines()[0] if str(e) else type(e).__name__}): give a model folder") from e
    return model.to(device).eval()


def evaluate(
    model_path: str | Path, token_ids: torch.LongTensor, *, window: int = 512, stride: int | None = None,
    batch_size: int = 1, device: str | None = None, attention: str = "auto",
) -> dict:
    """Sliding-window perplexity (``stride`` None: ``window``), predicted tokens per second and head usage.

    ``attention`` chooses how head-gated attention runs (auto, torch: skip unselected heads, masked: all heads).
    ``head_usage`` is [layers][heads] fractions of the N - 1 scored positions that used each head (None for a
    dense model); ``active_fraction`` is their mean (1.0 for dense). ``seconds`` times the scoring only.
    """
    model = load_model(model_path, device)
    from ..modeling.gated_attention import set_attention_backend

    try:
        set_attention_backend(model, attention)
    except ValueError as error:  # kernel asked for without Triton or CUDA
        raise UpcycleError(str(error)) from None
    try:
        method = (getattr(model.config, "upcycle", None) or {}).get("method", "dense")
        with HeadUsage(model) as usage:
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            start = time.perf_counter()
            nll, tokens = sliding_window_nll(model, token_ids, window, stride or window, batch_size, usage=usage)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            seconds = time.perf_counter() - start
        fraction = usage.fraction()
        active = usage.active_fraction()
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mean = nll / tokens
    return {
        "model": str(model_path), "method": method, "perplexity": math.exp(mean) if mean < 709 else math.inf,
        "nll": nll, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds if seconds > 0 else math.inf,
        "head_usage": fraction.tolist() if fraction.numel() else None, "active_fraction": 1.0 if active is None else active,
        "window": window, "stride": stride or window,
    }


def compare(model_paths: list[str | Path], token_ids: torch.LongTensor, **kwargs) -> list[dict]:
    """``evaluate`` each model on the same tokens (one model in memory at a time)."""
    return [evaluate(path, token_ids, **kwargs) for path in model_paths]


def _name(result: dict) -> str:
    """A row label: the result's ``name`` if set, else the model folder's name."""
    return str(result.get("name") or Path(result["model"]).name or result["model"])


def format_table(results: list[dict]) -> str:
    """Plain-text table (one row per model), the perplexity ratio when there are two, and per-layer head usage in %."""
    rows = [("model", "method", "perplexity", "tokens", "tok/s", "active")]
    rows += [(_name(r), r["method"], f"{r['perplexity']:.3f}", str(r["tokens"]), f"{r['tokens_per_second']:.1f}", f"{r['active_fraction']:.3f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(results) == 2:
        a, b = results
        ratio = b["perplexity"] / a["perplexity"] if a["perplexity"] else math.inf
        lines.append(f"\nperplexity ratio {_name(b)} / {_name(a)}: {ratio:.3f}x")
    for r in results:
        if r.get("head_usage"):
            heads = len(r["head_usage"][0])
            lines.append(f"\nhead usage of {_name(r)} (% of tokens per head)")
            lines.append("layer " + " ".join(f"{h:>3}" for h in range(heads)))
            lines += [f"{i:>5} " + " ".join(f"{round(100 * f):>3}" for f in layer) for i, layer in enumerate(r["head_usage"])]
    return "\n".join(lines)
