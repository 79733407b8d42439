"""Load a dense model for the methods that need data (scores, calibration fits)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import UpcycleError


def check_pickled_weights(folder: Path | str) -> None:
    """Before transformers loads ``folder``: when its weights are pickled ``pytorch_model*.bin`` files (no
    safetensors), one line for a file in torch's legacy format or one that ``torch.load(weights_only=True)`` refuses,
    saying how to convert it to safetensors (what ``upcycle eval`` and the data-driven methods call; the headers and a
    memory-mapped weights-only load, nothing unpickled beyond tensors)."""
    from .reader import load_pickled_weights

    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    for file in sorted(folder.glob("pytorch_model*.bin")):
        if file.is_file():
            load_pickled_weights(file)


def available_memory_bytes() -> int:
    """Memory this process may still use (MemAvailable, or total pages as a fallback)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_for_analysis(
    folder: Path,
    num_parameters: int,
    purpose: str,
    dtype: torch.dtype = torch.float32,
    auto_class: str = "AutoModelForCausalLM",
    activation_bytes: int = 0,
):
    """Load the dense model at ``folder`` (a causal LM unless ``auto_class`` says otherwise),
    saying first how much memory it needs (weights, plus ``activation_bytes`` for a backward pass).

    When it does not fit in 85% of the available memory, accelerate's big-model
    loading offloads what does not fit to disk (slower, but it runs).
    """
    import transformers

    check_pickled_weights(folder)
    weights = num_parameters * torch.finfo(dtype).bits // 8
    need = weights + activation_bytes
    have = available_memory_bytes()
    detail = (
        f" ({weights / 2**30:.2f} GiB {dtype} weights + {activation_bytes / 2**30:.2f} GiB activations)"
        if activation_bytes
        else f" ({dtype})"
    )
    print(
        f"{purpose}: loading the model needs about {need / 2**30:.2f} GiB{detail}; {have / 2**30:.1f} GiB available",
        file=sys.stderr,
    )
    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": False,
    }  # never a model folder's own code (auto_map): the family's classes
    if need > 0.85 * have:
        offload = tempfile.mkdtemp(prefix="upcycle-offload-")
        print(f"{purpose}: it does not fit; offloading the rest to {offload}", file=sys.stderr)
        kwargs.update(
            device_map="auto", offload_folder=offload, max_memory={"cpu": max(int(0.7 * have) - activation_bytes, 0)}
        )
    verbosity = transformers.logging.get_verbosity()
    if auto_class == "AutoModel":  # the base model of a checkpoint with a head: its unused head weights are expected
        transformers.logging.set_verbosity_error()
    try:
        model = getattr(transformers, auto_class).from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as error:
        raise UpcycleError(f"could not load {folder} for {purpose}: {str(error).splitlines()[0]}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()
