"""upcycle: rewrite dense Hugging Face checkpoints into more efficient or more capable forms.

Importing upcycle makes the upcycled model types known to transformers' Auto classes, so converted folders load
without ``trust_remote_code``; the model classes themselves (and torch) are imported on the first such load
(``upcycle.auto_registration``), so the command line starts fast.
"""

__version__ = "0.1.0"

from .auto_registration import install as _install_auto_classes  # noqa: E402

_install_auto_classes()
