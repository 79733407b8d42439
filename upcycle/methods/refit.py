"""Conversion-time refit of each layer's attention output projection on calibration text.

A method that changes a layer's heads (pruning, KV pooling, MoH's dropped heads) changes its
attention output ``Y' = A W^T`` (A [N, k]: the concatenated head outputs that feed o_proj, W
[D, k]: the sliced o_proj weight) away from the dense ``Y`` [N, D] (the dense o_proj's output,
bias excluded). This module refits W, layer by layer, so that ``Y'`` matches ``Y`` on
calibration tokens, before any tuning:

- ``rescale``: ``W' = diag(s) W`` with ``s_c = rms(Y[:, c]) / rms(Y'[:, c])``, so every output
  channel keeps the dense RMS (in the spirit of LLaMA-MoE-v2's ``align_converted_model.py``);
- ``lstsq``: ``W' = argmin ||A W'^T - Y||^2 + lambda ||W'||^2``, solved from the normal equations
  ``(A^T A + lambda I) W'^T = A^T Y`` accumulated in float64 over calibration batches, with
  ``lambda = ridge * trace(A^T A) / k``. ``--refit-ridge auto`` (the default) chooses ``ridge`` per layer
  from :data:`RIDGE_GRID` by the error on held-out calibration batches (every :data:`HOLDOUT`-th batch, fitted on
  the others), then solves on all of them: an unregularised fit follows the calibration text's own statistics,
  and a stronger ridge keeps more of the sliced o_proj's direction where the text does not pin it down. A number
  fixes ``ridge`` (1e-3 is a mere guard against collinear head outputs).

The fit is sequential (as GPTQ's): the converted model's layer l reads the output of its
already-refitted layers 0..l-1, while Y comes from the dense model on the same tokens. Both
models run one layer at a time over all calibration batches, which needs three hidden-state
streams [N, D] in memory (dense, converted as refitted so far, converted without refit, which
gives ``error_before``) plus one layer's ``A^T A`` [k, k] and ``A^T Y`` [k, D] in float64:
bounded by the calibration size, not by the depth (SmolLM2-135M, 16384 tokens: 3 x 38 MB plus
4 MB). Errors are ``||Y' - Y||_F / ||Y||_F`` on the calibration tokens: ``error_before`` for the
conversion without refit, ``error_after`` for the refitted one (exact, from the accumulated
normal equations).

API, for methods: :func:`check_refit` validates the flags; :func:`refit_conversion` does it all
for a method (tokenise the calibration text, load the dense model and a copy, let the method
convert the copy in memory, fit, and name the new o_proj tensors); its parts are
:func:`load_dense_and_copy` (saying how much memory the refit needs) and
:func:`refit_output_projections` (the fit on two loaded models); :func:`refit_plan_line` is the
printed summary.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..arch import DecoderSpec, EncoderSpec
from ..checkpoint.reader import CheckpointReader
from ..errors import UpcycleError
from ..lazy import no_grad
from .base import progress, source_parameters

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    from ..lazy import nn, torch

MODES = ("none", "rescale", "lstsq")
REFIT_HELP = (
    "refit each changed layer's o_proj on --calibration text so its attention output matches the dense one: "
    "none (default), rescale (per-channel RMS) or lstsq (least squares, sequential)."
)
RIDGE = 1e-3  # the fixed strength without a held-out choice (too few batches to hold one out): trace(A^T A) / k
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # what --refit-ridge auto chooses from
HOLDOUT = 4  # every HOLDOUT-th calibration batch is held out to choose the ridge
BATCH_BLOCKS = 4  # calibration blocks per forward
RIDGE_HELP = (
    "with --refit lstsq: the ridge strength (relative to the mean squared head output), or auto: chosen per layer "
    "from 1e-4 to 1 by the error on held-out calibration batches."
)


def parse_ridge(value: str | float | None) -> float | None:
    """``--refit-ridge``: None for auto, else a finite strength >= 0 (one line otherwise)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        ridge = float(value)
    except ValueError:
        ridge = float("nan")
    if not (ridge >= 0) or ridge == float("inf"):
        raise UpcycleError(f"--refit-ridge {value!r} is not auto or a finite number >= 0; e.g. auto or 0.01")
    return ridge


def check_refit(mode: str, calibration: list | None, ridge: str | float | None = "auto") -> None:
    """One line for an unknown ``--refit``, a data-driven refit without calibration text, or a ridge without lstsq."""
    if mode not in MODES:
        raise UpcycleError(f"--refit {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    parse_ridge(ridge)
    if mode != "lstsq" and str(ridge).strip().lower() != "auto":
        raise UpcycleError(
            f"--refit-ridge applies to --refit lstsq, not --refit {mode}; drop it or pass --refit lstsq"
        )
    if mode != "none" and not calibration:
        raise UpcycleError(
            f"--refit {mode} fits o_proj on calibration activations and needs calibration text; "
            "pass --calibration FILE or use --refit none"
        )


def load_dense_and_copy(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, blocks: torch.Tensor, mode: str
) -> tuple[nn.Module, nn.Module]:
    """The dense base model (no LM head) and a deep copy of it for the caller to convert in memory.

    Says first what the refit needs: two float32 copies of the weights, three hidden-state
    streams [N, D] and one layer's normal equations in float64.
    """
    from ..checkpoint.load import load_for_analysis

    num_parameters = source_parameters(reader)
    width = spec.num_heads * spec.head_dim
    extra = (
        num_parameters * 4 + 3 * blocks.numel() * spec.hidden_size * 4 + (width * width + width * spec.hidden_size) * 8
    )
    dense = load_for_analysis(
        reader.folder,
        num_parameters,
        f"--refit {mode} ({blocks.numel()} calibration tokens; a second copy to convert)",
        auto_class="AutoModel",
        activation_bytes=extra,
    )
    dense.requires_grad_(False)
    return dense, copy.deepcopy(dense)


class _Stop(Exception):
    """Raised by a hook to end a forward once layer 0's inputs are captured."""


def layer_inputs(model: nn.Module, blocks: torch.Tensor) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Per batch of blocks: (layer 0's hidden states [B, T, D], its other positional args, its kwargs),
    the masks and position embeddings included, so layers can then run one at a time."""
    from ..modeling.layer_parts import layers_of

    captured = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = layers_of(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in blocks.split(BATCH_BLOCKS):
            try:
                model(input_ids=batch.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(
    layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, o_proj: nn.Linear, capture: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer output [B, T, D], o_proj's input [B*T, k] (capture="input") or output without bias [B*T, D]
    (capture="output"))."""
    seen = []
    if capture == "input":
        handle = o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    elif capture == "output":
        handle = o_proj.register_forward_hook(lambda m, _a, out: seen.append(out if m.bias is None else out - m.bias))
    try:
        out = layer(hidden, *args, **kwargs)
    finally:
        if capture:
            handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out, (seen[0].reshape(-1, seen[0].shape[-1]).double() if seen else None)


class NormalEquations:
    """``A^T A`` [k, k], ``A^T Y`` [k, D] and ``||Y||^2`` per channel [D], accumulated in float64."""

    def __init__(self, k: int, d: int):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.cross = torch.zeros(k, d, dtype=torch.float64)
        self.target = torch.zeros(d, dtype=torch.float64)

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        # inputs: [n, k], target: [n, D], float64
        self.gram += (inputs.T @ inputs).cpu()
        self.cross += (inputs.T @ target).cpu()
        self.target += target.pow(2).sum(dim=0).cpu()

    def output_power(self, weight: torch.Tensor) -> torch.Tensor:
        """Per output channel, sum over tokens of (A W^T)^2 [D]."""
        return ((weight @ self.gram) * weight).sum(dim=1)

    def error(self, weight: torch.Tensor) -> float:
        """||A W^T - Y||_F / ||Y||_F for weight [D, k] (float64)."""
        squared = self.output_power(weight).sum() - 2 * (weight * self.cross.T).sum() + self.target.sum()
        return math.sqrt(max(squared.item(), 0.0) / max(self.target.sum().item(), 1e-300))

    def __add__(self, other: NormalEquations) -> NormalEquations:
        total = NormalEquations(*self.cross.shape)
        total.gram, total.cross, total.target = (
            self.gram + other.gram,
            self.cross + other.cross,
            self.target + other.target,
        )
        return total

    def solve(self, mode: str, weight: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
        """The refitted weight [D, k] (float64) from the sliced one [D, k] (``ridge``: lstsq's relative strength)."""
        if mode == "rescale":
            scale = (self.target / self.output_power(weight).clamp_min(1e-300)).sqrt()  # [D]
            return scale[:, None] * weight
        k = self.gram.shape[0]
        strength = ridge * self.gram.diagonal().sum() / k
        return torch.linalg.solve(self.gram + strength * torch.eye(k, dtype=torch.float64), self.cross).T  # [D, k]


def choose_ridge(fit: NormalEquations, held_out: NormalEquations, weight: torch.Tensor) -> tuple[float, dict]:
    """The strength of :data:`RIDGE_GRID` whose lstsq fit on ``fit`` has the least error on ``held_out``, and the
    held-out errors (at that strength, and at the weakest)."""
    errors = {ridge: held_out.error(fit.solve("lstsq", weight, ridge)) for ridge in RIDGE_GRID}
    best = min(errors, key=errors.get)
    return best, {"heldout_error": round(errors[best], 6), "heldout_error_weakest": round(errors[RIDGE_GRID[0]], 6)}


@no_grad
def refit_output_projections(
    dense: nn.Module,
    converted: nn.Module,
    blocks: torch.Tensor,
    mode: str,
    layers: list[int],
    ridge: float | None = RIDGE,
) -> tuple[dict[int, torch.Tensor], dict]:
    """Refit the o_proj weight of each layer in ``layers`` of ``converted`` (a base model: same family and
    depth as ``dense``, its attention changed in memory) sequentially on the calibration ``blocks`` [N, T];
    ``ridge`` None: chosen per layer on held-out batches (lstsq).

    Returns (layer -> refitted weight [D, k] float32, the report entry ``{"mode", "calibration_tokens",
    "per_layer": [{"layer", "error_before", "error_after"}]}``, with lstsq's ``ridge`` per layer and, when chosen,
    the held-out errors); ``converted`` ends refitted in place.
    """
    from ..modeling.layer_parts import layers_of, projections_of

    if mode not in ("rescale", "lstsq"):
        raise ValueError(f"mode {mode!r}: refit with rescale or lstsq")
    dense_layers, converted_layers = layers_of(dense), layers_of(converted)
    captured = layer_inputs(dense, blocks)  # the embeddings are the same in both models
    choosing = mode == "lstsq" and ridge is None and len(captured) >= HOLDOUT  # else the fixed strength
    dense_stream = [hidden for hidden, _, _ in captured]
    plain_stream, fitted_stream = list(dense_stream), list(dense_stream)  # converted without / with refit
    weights, per_layer = {}, []
    for index, (dense_layer, layer) in enumerate(
        progress(list(zip(dense_layers, converted_layers)), f"refit {mode}", unit="layer")
    ):
        dense_o, o_proj = (getattr(*projections_of(x)["o_proj"]) for x in (dense_layer, layer))
        fit = index in layers
        equations = [NormalEquations(o_proj.in_features, o_proj.out_features) for _ in range(2)] if fit else None
        before = torch.zeros(2, dtype=torch.float64)  # (squared error, squared norm) without refit
        for b, (_, args, kwargs) in enumerate(captured):
            dense_stream[b], target = run_layer(dense_layer, dense_stream[b], args, kwargs, dense_o, "output")
            plain_stream[b], plain = run_layer(layer, plain_stream[b], args, kwargs, o_proj, "output")
            before += torch.stack([(plain - target).pow(2).sum(), target.pow(2).sum()]).cpu()
            if fit:
                _, inputs = run_layer(layer, fitted_stream[b], args, kwargs, o_proj, "input")
                equations[choosing and b % HOLDOUT == HOLDOUT - 1].add(inputs, target)  # [fit, held out]
            else:
                fitted_stream[b], _ = run_layer(layer, fitted_stream[b], args, kwargs, o_proj)
        if not fit:
            continue
        sliced, chosen = o_proj.weight.double().cpu(), {}
        strength = ridge if ridge is not None else RIDGE
        if choosing:
            strength, chosen = choose_ridge(equations[0], equations[1], sliced)
        everything = equations[0] + equations[1]
        weight = everything.solve(mode, sliced, strength)
        o_proj.weight.copy_(weight.to(o_proj.weight))
        for b, (_, args, kwargs) in enumerate(captured):
            fitted_stream[b], _ = run_layer(layer, fitted_stream[b], args, kwargs, o_proj)
        weights[index] = weight.float()
        per_layer.append(
            {
                "layer": index,
                "error_before": round(math.sqrt(before[0].item() / max(before[1].item(), 1e-300)), 6),
                "error_after": round(everything.error(weight), 6),
            }
            | ({"ridge": strength} if mode == "lstsq" else {})
            | chosen
        )
    report = {"mode": mode, "calibration_tokens": blocks.numel(), "per_layer": per_layer}
    if mode == "lstsq":
        report["ridge"] = "auto" if choosing else strength
    return weights, report


def refit_conversion(
    reader: CheckpointReader,
    spec: DecoderSpec | EncoderSpec,
    mode: str,
    layers: list[int],
    convert_in_memory: Callable[[nn.Module], None],
    options,
    ridge: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(o_proj weight name -> refitted weight in the source dtype, the report entry) for the ``layers``
    that the method changed; ``convert_in_memory`` applies the method's change to a loaded dense base model;
    ``options``: the method's, for the calibration text (``calibration``, ``calibration_weights``, ...).
    Nothing is loaded or fitted when ``layers`` is empty (a null setting keeps o_proj byte-identical)."""
    from ..data.calibration import options_calibration_blocks

    if not layers:
        return {}, {"mode": mode, "calibration_tokens": 0, "per_layer": []}
    blocks = options_calibration_blocks(reader, options, encoder=isinstance(spec, EncoderSpec))  # [N, T]
    dense, converted = load_dense_and_copy(reader, spec, blocks, mode)
    convert_in_memory(converted)
    weights, report = refit_output_projections(dense, converted, blocks, mode, layers, ridge)
    names = {layer: spec.attention(layer, "o_proj") for layer in weights}
    return {
        names[layer]: weight.to(reader.info(names[layer]).dtype).contiguous() for layer, weight in weights.items()
    }, report


def refit_plan_line(report: dict) -> str:
    """The plan's one-line summary: mean attention-output errors before and after the refit."""
    per_layer = report["per_layer"]
    if not per_layer:
        return f"refit {report['mode']}: skipped (no layer changed)"
    before = sum(e["error_before"] for e in per_layer) / len(per_layer)
    after = sum(e["error_after"] for e in per_layer) / len(per_layer)
    ridge = ""
    if report.get("ridge") == "auto":
        chosen = sorted(e["ridge"] for e in per_layer)
        held = sum(e["heldout_error"] for e in per_layer) / len(per_layer)
        weakest = sum(e["heldout_error_weakest"] for e in per_layer) / len(per_layer)
        ridge = (
            f"; ridge chosen on held-out batches, {chosen[0]:g} to {chosen[-1]:g} (held-out error {weakest:.4f} at "
            f"{RIDGE_GRID[0]:g} -> {held:.4f})"
        )
    elif "ridge" in report:
        ridge = f"; ridge {report['ridge']:g}"
    return (
        f"refit {report['mode']} of o_proj on {report['calibration_tokens']} calibration tokens, "
        f"{len(per_layer)} layer{'s' if len(per_layer) > 1 else ''}: "
        f"mean attention-output error {before:.4f} -> {after:.4f} (||Y - Y_dense|| / ||Y_dense||){ridge}"
    )
