"""Text data: reading documents and packing them into token blocks (the one pipeline of :mod:`upcycle.data.text`,
with the ``data:`` schema :class:`DataSettings`); the ``datasets`` corpus layer (lazy)."""

from upcycle.data.text import DataSettings, pack_tokens, read_documents

_CORPUS = ("Corpus", "DataConfig", "build_corpus", "load_documents")
__all__ = ["DataSettings", "pack_tokens", "read_documents", *_CORPUS]


def __getattr__(name: str):
    if name in _CORPUS:  # imported on first use: `datasets` takes about a second to import
        from upcycle.data import corpus

        return getattr(corpus, name)
    raise AttributeError(f"module 'upcycle.data' has no attribute {name!r}")
