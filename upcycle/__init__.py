"""upcycle: rewrite dense Hugging Face checkpoints into more efficient or more capable forms.

Importing upcycle registers the upcycled model classes with transformers' Auto classes,
so converted folders load without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from . import modeling  # noqa: E402,F401  (registers the Auto classes)
