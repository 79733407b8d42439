"""Upcycled model types in transformers' Auto classes, without importing transformers or torch at ``import upcycle``.

``import upcycle`` calls :func:`install`. Once transformers' Auto modules are imported (before or after), their
mappings list upcycle's model types (``upcycle_llama``, ``upcycle_bert``, ...) as pending entries: the first lookup
of one, by a folder's ``model_type`` or by an upcycled config class, imports ``upcycle.modeling`` and registers the
real config and model classes of every family (``modeling_upcycle.register_auto_classes``). So
``AutoModelForCausalLM.from_pretrained(converted)`` after ``import upcycle`` loads without ``trust_remote_code``, and
a command that never touches a model (``upcycle --help``) never imports torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

# family -> (config class, {Auto class: model class}) of the runtime (modeling/modeling_upcycle.py defines them; the
# names are here so that a conversion writes its auto_map without importing transformers' modeling code)
RUNTIME_CLASSES: dict[str, tuple[str, dict[str, str]]] = {
    "llama": ("UpcycleLlamaConfig", {"AutoModelForCausalLM": "UpcycleLlamaForCausalLM"}),
    "mistral": ("UpcycleMistralConfig", {"AutoModelForCausalLM": "UpcycleMistralForCausalLM"}),
    "qwen2": ("UpcycleQwen2Config", {"AutoModelForCausalLM": "UpcycleQwen2ForCausalLM"}),
    "qwen3": ("UpcycleQwen3Config", {"AutoModelForCausalLM": "UpcycleQwen3ForCausalLM"}),
    "bert": ("UpcycleBertConfig", {"AutoModel": "UpcycleBertModel", "AutoModelForMaskedLM": "UpcycleBertForMaskedLM"}),
    "clip": (
        "UpcycleCLIPConfig",
        {"AutoModel": "UpcycleCLIPModel", "AutoModelForZeroShotImageClassification": "UpcycleCLIPModel"},
    ),
}
MODEL_TYPES = tuple(f"upcycle_{family}" for family in RUNTIME_CLASSES)
# the mappings register_auto_classes writes into, by module: only those need pending entries
MAPPINGS = {
    "transformers.models.auto.configuration_auto": ("CONFIG_MAPPING",),
    "transformers.models.auto.modeling_auto": (
        "MODEL_MAPPING",
        "MODEL_FOR_CAUSAL_LM_MAPPING",
        "MODEL_FOR_MASKED_LM_MAPPING",
        "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING",
    ),
}


def register_now() -> None:
    """Import the runtime and register its classes (what the first pending lookup does)."""
    from upcycle.modeling.modeling_upcycle import register_auto_classes

    register_auto_classes()


class PendingEntries(dict):
    """A mapping's ``_extra_content`` that also answers for upcycle's model types before they are registered: keys
    are model types (the config mapping) or config classes (the model mappings; matched by ``model_type``)."""

    def __init__(self, entries: dict, register: Callable[[], None] = register_now):
        super().__init__(entries)
        self._register = register
        self._pending = True

    def _is_pending(self, key: object) -> bool:
        return self._pending and getattr(key, "model_type", key) in MODEL_TYPES and not super().__contains__(key)

    def resolve(self) -> None:
        """Register upcycle's classes (once; ``register_auto_classes`` writes into this dict)."""
        if self._pending:
            self._pending = False
            self._register()

    def __contains__(self, key: object) -> bool:
        if self._is_pending(key):
            self.resolve()
        return super().__contains__(key)

    def __getitem__(self, key):
        if self._is_pending(key):
            self.resolve()
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def keys(self):
        self.resolve()
        return super().keys()

    def values(self):
        self.resolve()
        return super().values()

    def items(self):
        self.resolve()
        return super().items()

    def __iter__(self):
        self.resolve()
        return super().__iter__()

    def __len__(self) -> int:
        self.resolve()
        return super().__len__()


def _add_pending(module) -> None:
    for name in MAPPINGS[module.__name__]:
        mapping = getattr(module, name)
        if not isinstance(mapping._extra_content, PendingEntries):
            mapping._extra_content = PendingEntries(mapping._extra_content)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Adds the pending entries to each Auto module right after transformers imports it."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname not in MAPPINGS:
            return None
        sys.meta_path.remove(self)  # find the real spec without coming back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _add_pending(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make upcycle's model types known to transformers' Auto classes (now for Auto modules already imported, else
    when they are)."""
    for name in MAPPINGS:
        if name in sys.modules:
            _add_pending(sys.modules[name])
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
