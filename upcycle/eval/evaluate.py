"""Evaluate saved models (dense or converted) on token streams: perplexity, speed, head usage, and recovery against a
reference."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from upcycle.checkpoint.source import local_name as _local_name
from upcycle.errors import UpcycleError
from upcycle.eval.perplexity import sliding_window_nll
from upcycle.eval.usage import HeadUsage
from upcycle.tables import figure_text
from upcycle.tokenizer import load_tokenizer


def eval_tokens_from_text(
    path: str | Path, tokenizer, max_tokens: int | None = None, *, budget_name: str = "max_tokens"
) -> torch.LongTensor:
    """One token stream [N] from the documents in ``path`` (``read_documents``): tokenised without special tokens,
    EOS between documents, truncated to ``max_tokens``. ``tokenizer`` is a tokenizer or a folder holding one;
    ``budget_name`` is how the caller's user gave ``max_tokens`` (``--tokens``), for the message."""
    from upcycle.data.text import _token_stream, read_documents

    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    check_token_budget(max_tokens, budget_name)
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


def check_token_budget(max_tokens: int | None, budget_name: str = "max_tokens") -> None:
    """Refuse a budget of fewer than 2 tokens (nothing would be predicted); ``budget_name``: the flag (``--tokens``)
    or parameter it came from."""
    if max_tokens is not None and max_tokens < 2:
        given = f"{budget_name} {max_tokens}" if budget_name.startswith("--") else f"{budget_name}={max_tokens}"
        raise UpcycleError(
            f"{given} leaves nothing to predict (a corpus needs 2 tokens or more); give {budget_name} 2 or more"
        )


def max_positions(folder: str | Path) -> int | None:
    """The ``max_position_embeddings`` of a model folder's config.json (or of its ``text_config``), when it says
    one."""
    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    value = config.get("max_position_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_model(model_path: str | Path, device: str | None = None, dtype: str | None = None) -> torch.nn.Module:
    """A dense or converted causal LM in eval mode on ``device`` (None: CUDA if available) in ``dtype`` (``float32``,
    ``bfloat16``, ``float16``; None or ``auto``: bf16 on CUDA, fp32 elsewhere)."""
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the Auto classes: converted folders load without remote code)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise UpcycleError(f"--device {device} is not a device; give cpu, cuda, cuda:N or mps") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UpcycleError(f"--device {device}: this torch sees no CUDA device; use --device cpu")
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UpcycleError(f"--dtype {dtype} is unknown; choose float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if not Path(model_path).expanduser().is_dir():
        raise UpcycleError(f"model folder {model_path} does not exist: give a saved or converted model folder")
    from ..checkpoint.load import check_pickled_weights

    check_pickled_weights(Path(model_path).expanduser())  # a .bin that weights_only refuses: one line, never unpickled
    try:
        model = AutoModelForCausalLM.from_pretrained(Path(model_path).expanduser(), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UpcycleError(
            f"cannot load {model_path} as a causal LM "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): give a model folder"
        ) from e
    return model.to(device).eval()


def evaluate(
    model_path: str | Path,
    token_ids: torch.LongTensor,
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    attention: str = "auto",
    dtype: str | None = None,
) -> dict:
    """Sliding-window perplexity (``stride`` None: ``window``), predicted tokens per second and head usage.

    ``attention`` chooses how head-gated attention runs (auto, torch: skip unselected heads, masked: all heads).
    ``head_usage`` is [layers][heads] fractions of the N - 1 scored positions that used each head (None for a
    dense model); ``active_fraction`` is their mean (1.0 for dense). ``seconds`` times the scoring only.
    """
    return _evaluate_streams(
        model_path,
        [token_ids],
        window=window,
        stride=stride,
        batch_size=batch_size,
        device=device,
        attention=attention,
        dtype=dtype,
    )[0]


def evaluate_corpora(
    model_path: str | Path,
    corpora: Mapping[str, torch.LongTensor],
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    attention: str = "auto",
    dtype: str | None = None,
) -> list[dict]:
    """``evaluate`` on every corpus (name -> token stream [N]) with the model loaded once: one row per corpus,
    in order, each with ``data``: the corpus name."""
    rows = _evaluate_streams(
        model_path,
        list(corpora.values()),
        window=window,
        stride=stride,
        batch_size=batch_size,
        device=device,
        attention=attention,
        dtype=dtype,
    )
    return [row | {"data": name} for name, row in zip(corpora, rows)]


def _evaluate_streams(
    model_path: str | Path,
    streams: list[torch.LongTensor],
    *,
    window: int,
    stride: int | None,
    batch_size: int,
    device: str | None,
    attention: str,
    dtype: str | None = None,
) -> list[dict]:
    """Load the model once and score each token stream [N] on its own (head usage counted per stream)."""
    model = load_model(model_path, device, dtype)
    from ..modeling.gated_attention import set_attention_backend

    try:
        set_attention_backend(model, attention)
    except ValueError as error:  # kernel asked for without Triton or CUDA
        raise UpcycleError(str(error)) from None
    try:
        method = (getattr(model.config, "upcycle", None) or {}).get("method", "dense")
        rows = [
            {"model": str(model_path), "method": method} | _score(model, ids, window, stride or window, batch_size)
            for ids in streams
        ]
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _score(model: torch.nn.Module, token_ids: torch.LongTensor, window: int, stride: int, batch_size: int) -> dict:
    """One stream's perplexity, speed and head usage with a loaded model (the fields of ``evaluate`` but model and
    method)."""
    with HeadUsage(model) as usage:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        nll, tokens = sliding_window_nll(model, token_ids, window, stride, batch_size, usage=usage)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - start
    fraction = usage.fraction()
    active = usage.active_fraction()
    mean = nll / tokens
    return {
        "perplexity": math.exp(mean) if mean < 709 else math.inf,
        "nll": nll,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.inf,
        "head_usage": fraction.tolist() if fraction.numel() else None,
        "active_fraction": 1.0 if active is None else active,
        "window": window,
        "stride": stride,
    }


def recovery(
    model_path: str | Path,
    reference_path: str | Path,
    corpora: Mapping[str, torch.LongTensor],
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    attention: str = "auto",
    dtype: str | None = None,
) -> dict:
    """How much of ``reference_path``'s quality ``model_path`` keeps: each model loaded once (one at a time) and
    scored on every corpus (name -> token stream [N], e.g. held-out text of kinds the tuning never saw).

    Returns ``{"results": rows, "recovery": block}``, the format of ``upcycle eval --json`` (write it with
    ``json_text``): ``rows`` are ``evaluate_corpora``'s rows of the model, then of the reference;
    ``block`` is ``{"model": model_path, "reference": reference_path, "corpora": {name: {"perplexity",
    "reference_perplexity", "ratio", "tokens"}}, "mean_ratio"}``, where ratio = perplexity / reference
    perplexity (1.0: full recovery, above 1: worse) and mean_ratio is the ratios' geometric mean.
    """
    if not corpora:
        raise UpcycleError("recovery needs at least one corpus: give a name -> token stream mapping")
    kwargs = {
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "device": device,
        "attention": attention,
        "dtype": dtype,
    }
    rows = evaluate_corpora(model_path, corpora, **kwargs)
    reference_rows = evaluate_corpora(reference_path, corpora, **kwargs)
    return {
        "results": rows + reference_rows,
        "recovery": recovery_block(model_path, reference_path, list(corpora), rows, reference_rows),
    }


def recovery_block(
    model_path: str | Path, reference_path: str | Path, names: list[str], rows: list[dict], reference_rows: list[dict]
) -> dict:
    """The ``recovery`` entry from ``evaluate_corpora``'s rows of a model and of its reference (same corpora, in
    order)."""
    block = {
        name: {
            "perplexity": a["perplexity"],
            "reference_perplexity": b["perplexity"],
            "ratio": a["perplexity"] / b["perplexity"],
            "tokens": a["tokens"],
        }
        for name, a, b in zip(names, rows, reference_rows)
    }
    ratios = [entry["ratio"] for entry in block.values()]
    mean_ratio = (
        math.nan
        if any(math.isnan(r) or r <= 0 for r in ratios)
        else math.exp(math.fsum(map(math.log, ratios)) / len(ratios))
    )
    return {"model": str(model_path), "reference": str(reference_path), "corpora": block, "mean_ratio": mean_ratio}


def compare(model_paths: list[str | Path], token_ids: torch.LongTensor, **kwargs) -> list[dict]:
    """``evaluate`` each model on the same tokens (one model in memory at a time)."""
    return [evaluate(path, token_ids, **kwargs) for path in model_paths]


def _name(result: dict) -> str:
    """A row label: the result's ``name`` if set, else the model folder's name (its Hub id in the Hugging Face
    cache)."""
    return str(result.get("name") or _local_name(str(result["model"])))


def _columns(rows: list[tuple[str, ...]], left: int) -> list[str]:
    """``rows`` (the header first) as aligned text columns: the first ``left`` left-aligned, the others
    right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def _head_usage_lines(name: str, usage: list[list[float]], scope: str = "") -> list[str]:
    """Per-layer head usage [layers][heads] in % of tokens."""
    lines = [
        f"\nhead usage of {name} (% of tokens per head{scope})",
        "layer " + " ".join(f"{h:>3}" for h in range(len(usage[0]))),
    ]
    return lines + [f"{i:>5} " + " ".join(f"{round(100 * f):>3}" for f in layer) for i, layer in enumerate(usage)]


def format_table(results: list[dict]) -> str:
    """Plain-text table (one row per model), the perplexity ratio when there are two, and per-layer head usage in %."""
    rows = [("model", "method", "perplexity", "tokens", "tok/s", "active")]
    rows += [
        (
            _name(r),
            r["method"],
            figure_text(r["perplexity"]),
            str(r["tokens"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['active_fraction']:.3f}",
        )
        for r in results
    ]
    lines = _columns(rows, 2)
    if len(results) == 2:
        a, b = results
        ratio = b["perplexity"] / a["perplexity"] if a["perplexity"] else math.inf
        lines.append(f"\nperplexity ratio {_name(b)} / {_name(a)}: {ratio:.3f}x")
    for r in results:
        if r.get("head_usage"):
            lines += _head_usage_lines(_name(r), r["head_usage"])
    return "\n".join(lines)


def format_recovery_table(evaluation: dict) -> str:
    """``evaluation`` (``recovery``'s result, or ``{"results": rows, "recovery": None}`` from ``evaluate_corpora``) as
    text: one row per corpus (corpus, tokens, perplexity; with a recovery block also the reference's perplexity and
    the ratio, and their geometric mean over several corpora), then tokens/s, active heads and head usage per model,
    pooled over the corpora."""
    rows, block = evaluation["results"], evaluation.get("recovery")
    if block:
        corpora = block["corpora"]
        table = [("corpus", "tokens", "perplexity", "compare", "ratio")]
        table += [
            (
                name,
                str(c["tokens"]),
                figure_text(c["perplexity"]),
                figure_text(c["reference_perplexity"]),
                figure_text(c["ratio"]),
            )
            for name, c in corpora.items()
        ]
        if len(corpora) > 1:
            table.append(("geometric mean", "", "", "", figure_text(block["mean_ratio"])))
        lines = [
            f"perplexity of {_local_name(block['model'])}; compare: {_local_name(block['reference'])}",
            *_columns(table, 1),
            "ratio = perplexity / compare's perplexity: 1.00 is full recovery, above 1 is worse",
        ]
    else:
        lines = _columns(
            [
                ("corpus", "tokens", "perplexity"),
                *((str(r["data"]), str(r["tokens"]), figure_text(r["perplexity"])) for r in rows),
            ],
            1,
        )
    groups: list[
        list[dict]
    ] = []  # one per model: consecutive rows of one model, each corpus once (a model compared with itself twice)
    for row in rows:
        if (
            groups
            and groups[-1][0]["model"] == row["model"]
            and all(r.get("data") != row.get("data") for r in groups[-1])
        ):
            groups[-1].append(row)
        else:
            groups.append([row])
    summary, usage_lines = [("model", "method", "tokens", "tok/s", "active")], []
    for group in groups:
        tokens = torch.tensor([r["tokens"] for r in group], dtype=torch.float64)  # [C]
        seconds = sum(r["seconds"] for r in group)
        active = sum(r["active_fraction"] * r["tokens"] for r in group) / tokens.sum().item()
        speed = f"{tokens.sum().item() / seconds:.1f}" if seconds > 0 else "inf"
        summary.append((_name(group[0]), group[0]["method"], str(int(tokens.sum())), speed, f"{active:.3f}"))
        if group[0].get("head_usage"):
            usage = torch.tensor([r["head_usage"] for r in group], dtype=torch.float64)  # [C, layers, heads]
            pooled = (usage * tokens[:, None, None]).sum(0) / tokens.sum()  # [layers, heads]
            usage_lines += _head_usage_lines(
                _name(group[0]), pooled.tolist(), ", all corpora" if len(group) > 1 else ""
            )
    return "\n".join([*lines, "", *_columns(summary, 2), *usage_lines])
