"""Text data: reading documents and packing them into token blocks."""

from upcycle.data.text import pack_tokens, read_documents

__all__ = ["pack_tokens", "read_documents"]
