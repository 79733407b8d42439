"""Evaluation: perplexity (blocks or sliding windows), recovery against a reference model, head usage, model
comparison, plots (``upcycle.eval.plots``)."""

from upcycle.eval.evaluate import (
    compare,
    eval_tokens_from_text,
    evaluate,
    evaluate_corpora,
    format_recovery_table,
    format_table,
    load_model,
    recovery,
)
from upcycle.eval.perplexity import perplexity, sliding_window_nll
from upcycle.eval.usage import HeadUsage

__all__ = [
    "HeadUsage",
    "compare",
    "eval_tokens_from_text",
    "evaluate",
    "evaluate_corpora",
    "format_recovery_table",
    "format_table",
    "load_model",
    "perplexity",
    "recovery",
    "sliding_window_nll",
]
