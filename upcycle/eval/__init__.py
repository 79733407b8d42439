"""Evaluation: perplexity (blocks or sliding windows), head usage, model comparison, plots (``upcycle.eval.plots``)."""

from upcycle.eval.evaluate import compare, eval_tokens_from_text, evaluate, format_table, load_model
from upcycle.eval.perplexity import perplexity, sliding_window_nll
from upcycle.eval.usage import HeadUsage

__all__ = ["HeadUsage", "compare", "eval_tokens_from_text", "evaluate", "format_table", "load_model", "perplexity", "sliding_window_nll"]
