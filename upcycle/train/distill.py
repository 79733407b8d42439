"""Distillation from a frozen teacher: KL over the vocabulary in chunks of positions, and per-layer state matching.

The teacher runs its base model only (no logits): its final hidden states ``[B, T, D]`` and its LM head give the
teacher's logits one chunk of positions at a time, inside a checkpointed function, so the only ``[tokens, vocab]``
tensors this adds to the LM loss's own are one chunk's (recomputed in the backward pass). The student's logits are
the ones its forward already produced for the LM loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UpcycleError

CHUNK_BYTES = 64 * 2**20  # one fp32 [tokens, vocab] chunk of the KL


def chunk_tokens_for(vocab_size: int, chunk_tokens: int | None = None) -> int:
    """Positions per KL chunk: ``chunk_tokens``, else as many as fit one 64 MiB fp32 ``[tokens, vocab]`` chunk."""
    return chunk_tokens or max(1, CHUNK_BYTES // (4 * vocab_size))


def _kl_chunk(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """sum over the chunk's positions of KL(p_teacher || p_student) at ``temperature``.

    student_logits: [n, V]; teacher_hidden: [n, D]; weight: [V, D] (the teacher's LM head)."""
    with torch.no_grad():
        teacher = F.linear(teacher_hidden, weight, bias).float().div_(temperature).log_softmax(-1)  # [n, V]
    student = student_logits.float().div(temperature).log_softmax(-1)  # [n, V]
    return F.kl_div(student, teacher, reduction="sum", log_target=True)


def chunked_kl(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: nn.Linear,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mean over positions of ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    student_logits: [B, T, V] (with grad); teacher_hidden: [B, T, D] (the teacher's final, normed hidden states);
    ``head``: the teacher's LM head. Positions go in chunks of ``chunk_tokens`` (default: a 64 MiB fp32 chunk), each
    checkpointed, so at most one chunk's ``[tokens, vocab]`` tensors are alive, forward or backward."""
    logits = student_logits.flatten(0, -2)  # [N, V]
    hidden = teacher_hidden.flatten(0, -2).to(head.weight.dtype)  # [N, D]
    if logits.shape[0] != hidden.shape[0]:
        raise ValueError(f"student logits cover {logits.shape[0]} positions, teacher states {hidden.shape[0]}")
    step = chunk_tokens_for(logits.shape[-1], chunk_tokens)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], step):
        args = (logits[start : start + step], hidden[start : start + step], head.weight, head.bias, temperature)
        total = total + (
            checkpoint(_kl_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _kl_chunk(*args)
        )
    return total * temperature**2 / logits.shape[0]


def state_matching(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2``: each layer's states (or attention outputs) [B, T, D] against
    the teacher's, relative so that every layer weighs the same whatever its scale."""
    if len(student) != len(teacher):
        raise UpcycleError(
            f"the student has {len(student)} layers to match and the teacher {len(teacher)}; "
            "hidden-state distillation needs the same number of layers: set losses.distill_hidden to 0"
        )
    terms = [
        (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student, teacher)
    ]
    return torch.stack(terms).mean()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, through wrappers (peft, DDP): the first ModuleList of attention blocks."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "self_attn"):
            return module
    raise UpcycleError(
        "found no decoder layers with self_attn in the model, so attention outputs cannot be matched; "
        "use losses.distill_hidden_on: hidden_states"
    )


class AttentionOutputs:
    """Records each decoder layer's attention output [B, T, D] during forwards, while the context is active."""

    def __init__(self, model: nn.Module):
        self.model, self.outputs, self._handles = model, [], []

    def __enter__(self) -> AttentionOutputs:
        def record(_module, _args, output):
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

        self._handles = [layer.self_attn.register_forward_hook(record) for layer in decoder_layers(self.model)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs


def _report_source(folder: Path) -> str | None:
    report = folder / "upcycle_report.json"
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        return None


def resolve_reference(reference: str, model_path: Path, key: str, converted_from: str | None = None) -> Path:
    """The folder of a teacher or compare model: ``source`` is the model the tuned folder was converted from
    (``converted_from`` when the recipe converts, else the ``source`` its ``upcycle_report.json`` records)."""
    from ..checkpoint.source import resolve_model

    if reference == "source":
        reference = converted_from or _report_source(Path(model_path))
        if reference is None:
            raise UpcycleError(
                f"{key}: source, but {model_path} records no source model (it was not converted by upcycle); "
                f"set {key} to the dense model's folder or Hub id"
            )
    try:
        return resolve_model(reference)
    except UpcycleError as error:
        raise UpcycleError(f"{key}: {error}") from None


def _vocabulary(folder: Path) -> tuple[dict[str, int], int | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.get_vocab(), tokenizer.eos_token_id


def check_same_tokenizer(student: Path, teacher: Path) -> None:
    """Distillation compares distributions token by token: the two tokenizers must be the same."""
    (student_vocab, student_eos), (teacher_vocab, teacher_eos) = _vocabulary(student), _vocabulary(teacher)
    if student_vocab != teacher_vocab or student_eos != teacher_eos:
        differing = len(set(student_vocab.items()) ^ set(teacher_vocab.items()))
        raise UpcycleError(
            f"teacher {teacher} has another tokenizer than the student {student} ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens, {differing} entries differ); distillation needs the same tokenizer: "
            "choose a teacher with the student's tokenizer"
        )


class Teacher:
    """A frozen model in eval mode, in the training precision, giving final hidden states (and per-layer states)."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, vocab_size: int):
        from transformers import AutoModelForCausalLM

        import upcycle  # noqa: F401  (registers upcycled classes: a converted teacher loads too)

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        head = model.get_output_embeddings()
        if head is None or head.weight.shape[0] != vocab_size:
            found = None if head is None else head.weight.shape[0]
            raise UpcycleError(
                f"teacher {folder} predicts {found} tokens, the student {vocab_size}; "
                "distillation needs the same vocabulary: choose a teacher with the student's tokenizer"
            )
        self.folder, self.model, self.head = folder, model.to(device).eval().requires_grad_(False), head

    @torch.no_grad()
    def states(
        self, input_ids: torch.Tensor, per_layer: str | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(final hidden states [B, T, D], per-layer states or None). ``per_layer``: ``hidden_states`` (each layer's
        output, as the student's ``output_hidden_states`` gives them) or ``attention_outputs``."""
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        if per_layer == "attention_outputs":
            with AttentionOutputs(self.model) as recorder:
                last = base(input_ids=input_ids, use_cache=False).last_hidden_state
            return last, recorder.take()
        out = base(input_ids=input_ids, use_cache=False, output_hidden_states=per_layer == "hidden_states")
        return out.last_hidden_state, list(out.hidden_states[1:]) if per_layer else None
