"""Evaluation: perplexity on held-out text."""

from upcycle.eval.perplexity import perplexity

__all__ = ["perplexity"]
