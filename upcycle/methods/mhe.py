"""MHE, multi-head embedding attention (Xue and Aletras 2023, "Pit One Against Many"), as a conversion.

The ``H`` per-head projections ``W_i`` of Q, K and V (``H`` = query heads for Q, KV heads for
K and V) become one shared projection ``W`` of one head's size plus an embedding ``e_i`` per
head: ``mul``: ``(x W + b) * e_i``; ``add``: ``(x W + b) + e_i``. ``o_proj`` is untouched.

The paper trains from scratch; the conversion rule is ours. Augment each head's rows with its
bias (``w~_i = [W_i, b_i]``, input ``x~ = [x, 1]``) when the model has biases, and let ``C``
be the second moment ``E[x~ x~^T]`` of the layer's attention input (``--init calibrated``) or
the identity (``--init svd``, no data). Then:

- mul, per output coordinate c: minimise ``sum_i (w~_i - e_i w~)^T C (w~_i - e_i w~)``. With
  ``C = L L^T`` this is a rank-1 fit of the ``[H, d]`` matrix of rows ``L^T w~_i``: take its top
  singular pair, and map the shared row back with ``L^-T`` (with ``C = I``: the plain rank-1 SVD,
  the best fit in Frobenius norm). Scaled so the embeddings have RMS 1 over the heads.
- add: for any ``C`` the best shared row is the mean ``w~ = mean_i w~_i``, and the best offset is
  ``e_i = E[x~] . (w~_i - w~)`` (no data: ``E[x] = 0``, so ``e_i = b_i - mean b``).

``--init calibrated`` fits every layer on the dense model's activations. ``--init sequential``
(GPTQ-style) fits layer l on the inputs ``x~`` of the model whose layers below l are already MHE,
against the dense target ``x~_d . w~_i`` (``x~_d``: the dense model's input), so each layer
corrects the drift ``v = x~ - x~_d`` from below. With ``A = E[x~ x~^T] = L L^T``,
``R = E[x~ v^T]``, ``V = E[v v^T]`` (so ``B = E[x~ x~_d^T] = A - R``):

- mul: ``sum_i E[(x~ . e_i w~ - x~_d . w~_i)^2] = sum_i ||e_i L^T w~ - L^-1 B w~_i||^2 + const``
  (expand both sides; the constant ``sum_i w~_i^T (E[x~_d x~_d^T] - B^T A^-1 B) w~_i`` is the
  error of the best unconstrained map from ``x~`` to the target). So it is the same rank-1 fit of
  the ``[H, d]`` rows ``t_i = L^-1 B w~_i = L^T w~_i - L^-1 R w~_i``, mapped back with ``L^-T``.
- add: for a fixed ``w~`` the best ``e_i = E[x~_d] . w~_i - E[x~] . w~``; what is left is
  ``sum_i Var(x~ . w~ - x~_d . w~_i)``, minimised by ``w~ = mean_i w~_i - Cov(x~)^-1 Cov(x~, v) mean_i w~_i``
  (least squares of the mean head's target on ``x~``).

The damping that keeps ``A`` (or ``Cov(x~)``) invertible is added to ``B`` too, which pulls the
fit toward the dense rows in directions the data does not cover. Without drift (``v = 0``) both
reduce exactly to the calibrated fit, so an MHE-form model still converts exactly. The drift's
moments are accumulated from ``v`` itself, not as differences of moments, so they stay accurate
when ``v`` is tiny. Reported per layer: the relative error ``||XW_i - approx||/||XW_i||`` of
each projection (on calibration activations when ``--calibration`` is given, else on the
weights; for sequential, of the compressed model's projections against the dense model's) and,
with calibration text, of the attention module's output (for sequential, against the dense
model's attention output on the dense input, so it includes the error from the layers below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, EncoderSpec, attention_spec
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..lazy import no_grad
from ..modeling.plan import MHE, MHE_VARIANTS, LayerPlan
from .base import Conversion, SourceTensor, check_source, progress, recorded_options, runtime_config, source_parameters
from .spec import (
    MethodCard,
    MethodSpec,
    calibration_option,
    calibration_tokens_option,
    calibration_weights_option,
    option,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    from ..lazy import nn, torch

INITS = ("svd", "calibrated", "sequential")
PROJECTIONS = ("q_proj", "k_proj", "v_proj")
FITS = {
    "svd": "on the weights",
    "calibrated": "each layer on the dense model's activations",
    "sequential": "each layer on the outputs of the converted layers below it, against the dense model's",
}


@dataclass
class MHEOptions:
    """The MHE flags of ``upcycle convert`` (and keys of a recipe's ``convert:`` section)."""

    variant: Literal[MHE_VARIANTS] = option(
        "mul", help="head embeddings multiply (mul) or add to the shared projection."
    )
    init: Literal[INITS] = option(
        "svd",
        help="svd (best fit on the weights, no data), calibrated (least squares on --calibration activations) "
        "or sequential (calibrated, each layer fitted on the already-compressed layers' outputs against the dense "
        "model's).",
    )
    calibration: list[str] = calibration_option()
    calibration_weights: list[float] = calibration_weights_option()
    calibration_tokens: int = calibration_tokens_option()
    calibration_seq_len: int = 512
    trust_remote_code: bool = False  # use SRC although its config names code of its own (never run nor copied)


@dataclass
class ProjectionFit:
    """One projection's MHE form: shared ``weight [d_h, d]``, ``bias [d_h]`` or None, ``head_embedding [H, d_h]``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    head_embedding: torch.Tensor
    error: float  # relative reconstruction error (calibration activations, or weights without data)


@dataclass
class Drift:
    """Moments of the drift ``v = x~ - x~_d`` of a projection's input (compressed model) from the dense model's."""

    cross: torch.Tensor  # [k, k] E[x~ v^T]
    second: torch.Tensor  # [k, k] E[v v^T]
    mean: torch.Tensor  # [k] E[v]


def stack_heads(weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """[H*d_h, d] weight (+ [H*d_h] bias) -> [d_h, H, k] float64 rows per output coordinate; k = d (+1 with bias)."""
    rows = weight.double().unflatten(0, (-1, head_dim))  # [H, d_h, d]
    if bias is not None:
        rows = torch.cat([rows, bias.double().unflatten(0, (-1, head_dim)).unsqueeze(-1)], dim=-1)  # [H, d_h, d+1]
    return rows.transpose(0, 1)  # [d_h, H, k]


def whitening_factor(second_moment: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with L L^T = C (+ the least damping that makes it positive definite)."""
    scale = second_moment.diagonal().mean().clamp_min(1e-30)
    identity = torch.eye(second_moment.shape[0], dtype=second_moment.dtype)
    for damping in (1e-8, 1e-6, 1e-4, 1e-2, 1.0):
        factor, info = torch.linalg.cholesky_ex(second_moment + damping * scale * identity)
        if info.item() == 0:
            return factor
    raise UpcycleError(
        "the calibration activations are degenerate (their second moment is not positive definite); "
        "give more or more varied calibration text"
    )


def fit_projection(
    stacked: torch.Tensor,
    variant: str,
    second_moment: torch.Tensor | None,
    mean: torch.Tensor,
    drift: Drift | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit the MHE form to per-head rows ``stacked [d_h, H, k]``.

    ``second_moment [k, k]`` and ``mean [k]`` are E[x~ x~^T] and E[x~] of the projection's
    input; without data, ``second_moment`` is None (the identity) and ``mean`` is
    :func:`data_free_mean`. With ``drift`` (sequential fit) the target is the dense model's
    ``x~_d . w~_i`` (see the module docstring). Returns the shared rows ``[d_h, k]`` (bias last
    when k = d + 1), the head embeddings ``[H, d_h]`` and the relative reconstruction error.
    """
    heads = stacked.shape[1]
    if variant == "mul":
        factor = whitening_factor(second_moment) if second_moment is not None else None
        whitened = stacked @ factor if factor is not None else stacked  # [d_h, H, k]: rows (L^T w~_i)^T
        if drift is not None:  # rows (L^-1 B w~_i)^T = (L^T w~_i - L^-1 R w~_i)^T
            whitened = whitened - stacked @ torch.linalg.solve_triangular(factor, drift.cross, upper=False).T
        left, singular, right = torch.linalg.svd(whitened, full_matrices=False)  # [d_h, H, r], [d_h, r], [d_h, r, k]
        coefficients = left[:, :, 0]  # [d_h, H]
        row = singular[:, :1] * right[:, 0]  # [d_h, k]
        sign = torch.where(coefficients.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(
            stacked.dtype
        )  # mostly positive embeddings
        coefficients, row = coefficients * sign * math.sqrt(heads), row * sign / math.sqrt(heads)
        shared = (
            torch.linalg.solve_triangular(factor, row, upper=False, left=False) if factor is not None else row
        )  # X L = row
    else:
        shared = stacked.mean(dim=1)  # [d_h, k]
        if drift is not None:  # w~ = mean w~_i - Cov(x~)^-1 Cov(x~, v) mean w~_i
            covariance = whitening_factor(second_moment - torch.outer(mean, mean))  # [k, k]
            correction = torch.cholesky_solve(
                (drift.cross - torch.outer(mean, drift.mean)) @ shared.T, covariance
            )  # [k, d_h]
            shared = shared - correction.T
        coefficients = (stacked - shared.unsqueeze(1)) @ mean  # [d_h, H]: e_i = E[x~] . (w~_i - w~)
        if drift is not None:  # e_i = E[x~_d] . w~_i - E[x~] . w~
            coefficients = coefficients - stacked @ drift.mean
    embedding = coefficients.T.contiguous()  # [H, d_h]
    return shared, embedding, relative_error(stacked, shared, embedding, variant, second_moment, mean, drift)


def data_free_mean(k: int, bias: bool) -> torch.Tensor:
    """E[x~] when no data is given: x taken as zero-mean (so the bias input, last, is the only constant)."""
    mean = torch.zeros(k, dtype=torch.float64)
    if bias:
        mean[-1] = 1.0
    return mean


def relative_error(
    stacked: torch.Tensor,
    shared: torch.Tensor,
    embedding: torch.Tensor,
    variant: str,
    second_moment: torch.Tensor | None,
    mean: torch.Tensor,
    drift: Drift | None = None,
) -> float:
    """sqrt(E sum (x~_d.w~_i - approx_i(x~))^2 / E sum (x~_d.w~_i)^2) over coordinates and heads (C = I without data).

    ``stacked [d_h, H, k]``: the dense rows; ``shared [d_h, k]`` and ``embedding [H, d_h]``: the MHE form;
    ``x~_d = x~`` unless ``drift`` gives the moments of ``v = x~ - x~_d``.
    """
    coefficients = embedding.T  # [d_h, H]
    if variant == "mul":  # approx_i = x~ . (e_i w~)
        delta, offsets = stacked - coefficients.unsqueeze(-1) * shared.unsqueeze(1), torch.zeros_like(coefficients)
    else:  # approx_i = x~ . w~ + e_i
        delta, offsets = stacked - shared.unsqueeze(1), coefficients  # [d_h, H, k], [d_h, H]
    if second_moment is None:
        quadratic, norm = delta.pow(2).sum(), stacked.pow(2).sum()
    else:
        quadratic = torch.einsum("chi,ij,chj->", delta, second_moment, delta)
        norm = torch.einsum("chi,ij,chj->", stacked, second_moment, stacked)
    error = quadratic - 2 * (offsets * (delta @ mean)).sum() + offsets.pow(2).sum()
    if (
        drift is not None
    ):  # the residual gains -v . w~_i: E[(-x~.delta + v.w~_i + offset)^2], target norm E[((x~ - v).w~_i)^2]
        drifted = torch.einsum("chi,ij,chj->", stacked, drift.second, stacked)
        error = (
            error
            - 2 * torch.einsum("chi,ij,chj->", delta, drift.cross, stacked)
            + drifted
            + 2 * (offsets * (stacked @ drift.mean)).sum()
        )
        norm = norm - 2 * torch.einsum("chi,ij,chj->", stacked, drift.cross, stacked) + drifted
    return math.sqrt(max(error.item(), 0.0) / max(norm.item(), 1e-300))


def read_stacked(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, layer: int, proj: str
) -> tuple[torch.Tensor, bool]:
    """A layer projection's rows ``[d_h, H, k]`` (see :func:`stack_heads`) and whether it has a bias."""
    bias_name = spec.attention(layer, proj, "bias")
    bias = reader.get(bias_name) if bias_name in reader else None
    return stack_heads(reader.get(spec.attention(layer, proj)), bias, spec.head_dim), bias is not None


def input_moments(
    moment: torch.Tensor | None, k: int, bias: bool, drift: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor, Drift | None]:
    """(E[x~ x~^T], E[x~], the drift's moments or None) restricted to the k inputs a projection sees
    (the bias input, last of x~, is dropped without bias). ``moment``: E[x~ x~^T] [d+1, d+1], or with
    ``drift`` the joint second moment [2d+2, 2d+2] of ``[x~, v]`` (see :meth:`CalibrationPass.run_sequential`)."""
    if moment is None:
        return None, data_free_mean(k, bias), None
    n = moment.shape[0] // 2 if drift else moment.shape[0]  # x~ is z[:n]; its constant 1 is z[n - 1]
    moments = Drift(moment[:k, n : n + k], moment[n : n + k, n : n + k], moment[n - 1, n : n + k]) if drift else None
    return moment[:k, :k], moment[n - 1, :k], moments


class CalibrationPass:
    """Runs calibration blocks through the dense model: accumulates each layer's attention-input
    second moment E[x~ x~^T] (x~ = [x, 1], one per layer: Q, K and V read the same input) and,
    given MHE modules, the relative error of each attention module's output with them swapped in."""

    def __init__(self, model: nn.Module, blocks: torch.Tensor):
        self.model, self.blocks = model, blocks

    @no_grad
    def run(
        self, label: str, moments: bool, replacements: list[dict[str, nn.Module]] | None = None
    ) -> tuple[list[torch.Tensor] | None, list[float] | None]:
        """(per-layer E[x~ x~^T] [d+1, d+1] or None, per-layer attention output relative error or None)."""
        from ..modeling.layer_parts import attention_of, layers_of, projections_of

        layers = layers_of(self.model)
        sums = [None] * len(layers)
        counts = [0] * len(layers)
        errors = torch.zeros(len(layers), 2, dtype=torch.float64)  # [layer, (squared error, squared norm)]
        busy = [False]
        handles = []

        def moment_hook(index: int):
            def accumulate(_module: nn.Module, args: tuple) -> None:
                if busy[0]:
                    return
                inputs = args[0].reshape(-1, args[0].shape[-1]).float()  # [N, d]
                augmented = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)  # [N, d+1]
                block = (augmented.T @ augmented).double().cpu()  # [d+1, d+1]
                sums[index] = block if sums[index] is None else sums[index] + block
                counts[index] += inputs.shape[0]

            return accumulate

        def error_hook(index: int):
            def compare(attention: nn.Module, args: tuple, kwargs: dict, output) -> None:
                if busy[0]:
                    return
                swapped = {}
                busy[0] = True
                try:
                    for proj, module in replacements[index].items():
                        parent, name = projections_of(layers[index])[proj]
                        swapped[proj] = getattr(parent, name)
                        setattr(parent, name, module)
                    approx = attention(*args, **kwargs)
                finally:
                    for proj, module in swapped.items():
                        parent, name = projections_of(layers[index])[proj]
                        setattr(parent, name, module)
                    busy[0] = False
                reference = (output[0] if isinstance(output, tuple) else output).double()  # [B, T, D]
                approx = (approx[0] if isinstance(approx, tuple) else approx).double()
                errors[index, 0] += (approx - reference).pow(2).sum().cpu()
                errors[index, 1] += reference.pow(2).sum().cpu()

            return compare

        for index, layer in enumerate(layers):
            if moments:
                parent, name = projections_of(layer)["q_proj"]
                handles.append(getattr(parent, name).register_forward_pre_hook(moment_hook(index)))
            if replacements is not None:
                handles.append(attention_of(layer).register_forward_hook(error_hook(index), with_kwargs=True))
        try:
            for block in progress(self.blocks, label, unit="block"):
                self.model(input_ids=block.unsqueeze(0).to(self.model.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        second_moments = [total / count for total, count in zip(sums, counts)] if moments else None
        output_errors = (
            (errors[:, 0] / errors[:, 1].clamp_min(1e-300)).sqrt().tolist() if replacements is not None else None
        )
        return second_moments, output_errors

    def layer_inputs(self, first_layer: nn.Module) -> tuple[torch.Tensor, tuple, dict]:
        """The hidden states ``[N, T, D]`` entering the first layer for every block, and the other arguments
        it is called with (the same for every block: blocks have one length and no padding)."""
        states, call = [], {}

        def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            states.append(args[0])  # [1, T, D]
            call.setdefault("rest", (args[1:], kwargs))
            raise _Stop

        handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for block in self.blocks:
                try:
                    self.model(input_ids=block.unsqueeze(0).to(self.model.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return torch.cat(states), *call["rest"]

    @no_grad
    def run_sequential(
        self, fit: Callable[[int, torch.Tensor], dict[str, ProjectionFit]], variant: str
    ) -> tuple[list[dict[str, ProjectionFit]], list[float]]:
        """Fit layer by layer on the compressed model's inputs; returns the fits and per-layer attention output errors.

        Keeps the hidden states ``[N, T, D]`` entering layer l of the compressed model and of the
        dense one (and the dense attention outputs), and runs only layer l on them: dense, for the
        target and the next dense states; up to q_proj on the compressed states, for ``[x~, v]``
        (``v = x~ - x~_d``); then, with ``fit``'s projections swapped in for good, compressed, for
        the next compressed states. About two forward passes of the model in all.
        """
        from ..modeling.layer_parts import attention_of, layers_of, projections_of

        layers = layers_of(self.model)
        compressed, rest, kwargs = self.layer_inputs(layers[0])  # [N, T, D]
        dense, references = compressed.clone(), [None] * len(compressed)
        fits, output_errors = [], []
        for index, layer in enumerate(progress(layers, "MHE sequential fit", unit="layer")):
            query, attention, seen = getattr(*projections_of(layer)["q_proj"]), attention_of(layer), {}
            joint = torch.zeros(
                2 * compressed.shape[-1] + 2, 2 * compressed.shape[-1] + 2, dtype=torch.float64
            )  # E[z z^T] (summed)
            for block in range(len(compressed)):
                dense[block] = run_layer(
                    layer,
                    dense[block : block + 1],
                    rest,
                    kwargs,
                    [
                        (query.register_forward_pre_hook, take_input(seen, "target")),
                        (attention.register_forward_hook, take_output(seen, "reference")),
                    ],
                )[0]
                references[block] = seen["reference"]  # [T, D]
                run_layer(
                    layer,
                    compressed[block : block + 1],
                    rest,
                    kwargs,
                    [(query.register_forward_pre_hook, take_input(seen, "input", stop=True))],
                )
                inputs = seen["input"].float()  # [T, d]
                ones = inputs.new_ones(len(inputs), 1)
                joint_inputs = torch.cat(
                    [inputs, ones, inputs - seen["target"].float(), 0 * ones], dim=1
                )  # [T, 2d+2]: z = [x~, v]
                joint += (joint_inputs.T @ joint_inputs).double().cpu()
            layer_fits = fit(index, joint / (len(compressed) * len(seen["input"])))
            for proj, module in mhe_modules([layer_fits], variant, compressed.device)[0].items():
                setattr(*projections_of(layer)[proj], module)
            error = torch.zeros(2, dtype=torch.float64)  # (squared error, squared norm)
            for block in range(len(compressed)):
                compressed[block] = run_layer(
                    layer,
                    compressed[block : block + 1],
                    rest,
                    kwargs,
                    [(attention.register_forward_hook, take_output(seen, "output"))],
                )[0]
                reference = references[block].double()
                error += torch.stack(
                    [(seen["output"].double() - reference).pow(2).sum(), reference.pow(2).sum()]
                ).cpu()
            fits.append(layer_fits)
            output_errors.append(math.sqrt(error[0].item() / max(error[1].item(), 1e-300)))
        return fits, output_errors


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _first(output):
    """The tensor of a module's output (modules may return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def take_input(seen: dict, key: str, stop: bool = False):
    """A forward pre-hook keeping a copy of its module's input as ``seen[key]`` ``[T, d]`` (and ending the pass with
    ``stop``).

    A copy: the input may be a view of the hidden-state buffer the layer's output overwrites (BERT)."""

    def hook(_module: nn.Module, args: tuple) -> None:
        seen[key] = args[0].reshape(-1, args[0].shape[-1]).clone()
        if stop:
            raise _Stop

    return hook


def take_output(seen: dict, key: str):
    """A forward hook keeping its module's output as ``seen[key]`` ``[T, D]``."""

    def hook(_module: nn.Module, _args: tuple, output) -> None:
        seen[key] = _first(output).reshape(-1, _first(output).shape[-1])

    return hook


def run_layer(layer: nn.Module, states: torch.Tensor, rest: tuple, kwargs: dict, hooks: list) -> torch.Tensor | None:
    """``layer`` on ``states [1, T, D]`` with ``hooks`` ((register method, hook) pairs) attached; None when a hook
    ended it."""
    handles = [register(hook) for register, hook in hooks]
    try:
        return _first(layer(states, *rest, **kwargs))
    except _Stop:
        return None
    finally:
        for handle in handles:
            handle.remove()


def load_calibration(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, options: MHEOptions
) -> CalibrationPass:
    """Tokenise the calibration text and load the dense base model (no LM head) for the passes."""
    from ..checkpoint.load import load_for_analysis
    from ..data.calibration import options_calibration_blocks

    blocks = options_calibration_blocks(reader, options, encoder=isinstance(spec, EncoderSpec))  # [N, T]
    num_parameters = source_parameters(reader)
    activations = spec.num_layers * (spec.hidden_size + 1) ** 2 * 8  # the per-layer moments
    if (
        options.init == "sequential"
    ):  # compressed and dense hidden states, dense attention outputs; one layer's joint moment
        activations = 3 * blocks.numel() * spec.hidden_size * 4 + (2 * spec.hidden_size + 2) ** 2 * 8
    model = load_for_analysis(
        reader.folder,
        num_parameters,
        f"MHE calibration ({blocks.numel()} tokens)",
        auto_class="AutoModel",
        activation_bytes=activations,
    )
    model.requires_grad_(False)
    return CalibrationPass(model, blocks)


def fit_layer(
    reader: CheckpointReader,
    spec: DecoderSpec | EncoderSpec,
    variant: str,
    layer: int,
    moment: torch.Tensor | None,
    drift: bool = False,
) -> dict[str, ProjectionFit]:
    """Fit one layer's Q, K and V in float64 (``moment``: see :func:`input_moments`; None for the data-free fit)."""
    layer_fits = {}
    for proj in PROJECTIONS:
        stacked, bias = read_stacked(reader, spec, layer, proj)
        shared, embedding, error = fit_projection(
            stacked, variant, *input_moments(moment, stacked.shape[-1], bias, drift)
        )
        layer_fits[proj] = ProjectionFit(
            shared[:, : spec.hidden_size].float(),
            shared[:, spec.hidden_size].float() if bias else None,
            embedding.float(),
            error,
        )
    return layer_fits


def fit_layers(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, variant: str, second_moments: list[torch.Tensor] | None
) -> list[dict[str, ProjectionFit]]:
    """Fit every layer's Q, K and V (``second_moments``: per layer, or None for the data-free fit)."""
    fits = []
    for layer in progress(range(spec.num_layers), "MHE fit", unit="layer"):
        fits.append(
            fit_layer(reader, spec, variant, layer, second_moments[layer] if second_moments is not None else None)
        )
    return fits


def measure_errors(
    reader: CheckpointReader,
    spec: DecoderSpec | EncoderSpec,
    variant: str,
    fits: list[dict[str, ProjectionFit]],
    second_moments: list[torch.Tensor],
) -> None:
    """Replace each fit's error by its error on calibration activations (for the data-free fit)."""
    for layer, layer_fits in enumerate(fits):
        for proj, fit in layer_fits.items():
            stacked, bias = read_stacked(reader, spec, layer, proj)
            shared = (
                fit.weight.double()
                if fit.bias is None
                else torch.cat([fit.weight.double(), fit.bias.double()[:, None]], dim=1)
            )  # [d_h, k]
            fit.error = relative_error(
                stacked,
                shared,
                fit.head_embedding.double(),
                variant,
                *input_moments(second_moments[layer], stacked.shape[-1], bias),
            )


def mhe_modules(
    fits: list[dict[str, ProjectionFit]], variant: str, device: torch.device
) -> list[dict[str, nn.Module]]:
    """The runtime's MHE projections holding the fits (fp32), for the attention-output check."""
    from ..modeling.mhe_projection import MHEProjection

    modules = []
    for layer_fits in fits:
        layer_modules = {}
        for proj, fit in layer_fits.items():
            module = MHEProjection(
                fit.weight.shape[1],
                fit.weight.shape[0],
                fit.head_embedding.shape[0],
                variant,
                bias=fit.bias is not None,
            )
            module.weight.data.copy_(fit.weight)
            module.head_embedding.data.copy_(fit.head_embedding)
            if fit.bias is not None:
                module.bias.data.copy_(fit.bias)
            layer_modules[proj] = module.to(device)
        modules.append(layer_modules)
    return modules


def attention_parameters(shapes: dict[str, tuple], spec: DecoderSpec | EncoderSpec) -> int:
    """Parameters of all layers' q/k/v/o projections (weights, biases, head embeddings)."""
    attention = set()
    for layer in range(spec.num_layers):
        for proj in (*PROJECTIONS, "o_proj"):
            attention |= {spec.attention(layer, proj, kind) for kind in ("weight", "bias", "head_embedding")}
    return sum(math.prod(shape) for name, shape in shapes.items() if name in attention)


def validate(options: MHEOptions) -> None:
    if options.init in ("calibrated", "sequential") and not options.calibration:
        raise UpcycleError(
            f"--init {options.init} fits on activations and needs calibration text; "
            "pass --calibration FILE or use --init svd"
        )
    if options.calibration_tokens < 1:
        raise UpcycleError(f"--calibration-tokens {options.calibration_tokens} must be positive")


def fitted_projections(reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, options: MHEOptions):
    """(per layer the fitted projections, per layer the attention output error on calibration text or None): the
    fit ``--init`` asks for, measured on calibration text when there is some."""
    calibration = load_calibration(reader, spec, options) if options.calibration else None
    second_moments = output_errors = None
    if options.init == "sequential":
        fits, output_errors = calibration.run_sequential(
            lambda layer, moment: fit_layer(reader, spec, options.variant, layer, moment, drift=True), options.variant
        )
    elif options.init == "calibrated":
        second_moments, _ = calibration.run("MHE calibration: attention inputs", moments=True)
        fits = fit_layers(reader, spec, options.variant, second_moments)
    else:
        fits = fit_layers(reader, spec, options.variant, None)
    if calibration is not None and options.init != "sequential":
        replacements = mhe_modules(fits, options.variant, calibration.model.device)
        measured, output_errors = calibration.run(
            "MHE calibration: attention output error", moments=second_moments is None, replacements=replacements
        )
        if second_moments is None:  # svd init: the projection errors on the same activations as the calibrated fit's
            measure_errors(reader, spec, options.variant, fits, measured)
    return fits, output_errors


def mhe_layout(reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, heads: dict[str, int]) -> list[TensorSpec]:
    """The output's tensors: the source's, with each q/k/v projection a shared ``[head_dim, D]`` weight (and
    ``[head_dim]`` bias) followed by its ``[heads, head_dim]`` head embeddings."""
    dtype = reader.info(spec.attention(0, "q_proj")).dtype
    edited = {
        spec.attention(layer, proj, kind): (layer, proj, kind)
        for layer in range(spec.num_layers)
        for proj in PROJECTIONS
        for kind in ("weight", "bias")
    }
    layout = []
    for name in reader.names():
        info = reader.info(name)
        if name not in edited:
            layout.append(TensorSpec(name, info.dtype, tuple(info.shape)))
            continue
        layer, proj, kind = edited[name]
        if kind == "bias":
            layout.append(TensorSpec(name, info.dtype, (spec.head_dim,)))
        else:
            layout.append(TensorSpec(name, info.dtype, (spec.head_dim, info.shape[1])))
            layout.append(
                TensorSpec(spec.attention(layer, proj, "head_embedding"), dtype, (heads[proj], spec.head_dim))
            )
    return layout


def fitted_tensors(spec: DecoderSpec | EncoderSpec, fits) -> dict:
    """Output name -> tensor of every fitted weight, head embedding and bias."""
    new_tensors = {}
    for layer, layer_fits in enumerate(fits):
        for proj, fit in layer_fits.items():
            new_tensors[spec.attention(layer, proj, "weight")] = fit.weight
            new_tensors[spec.attention(layer, proj, "head_embedding")] = fit.head_embedding
            if fit.bias is not None:
                new_tensors[spec.attention(layer, proj, "bias")] = fit.bias
    return new_tensors


def error_report(options: MHEOptions, fits, output_errors) -> tuple[str, list[dict]]:
    """(what the errors were measured on, per layer the projections' and the attention output's errors)."""
    space = "calibration activations" if options.calibration else "weights"
    if options.init == "sequential":
        space = (
            "calibration activations: the compressed model's, against the dense model's "
            "(errors from the layers below included)"
        )
    per_layer = [
        {
            "layer": layer,
            **{proj: fit.error for proj, fit in layer_fits.items()},
            "attention_output": output_errors[layer] if output_errors else None,
        }
        for layer, layer_fits in enumerate(fits)
    ]
    return space, per_layer


def convert(reader: CheckpointReader, options: MHEOptions) -> Conversion:
    """Plan the MHE conversion of the dense decoder or BERT encoder behind ``reader``."""
    validate(options)
    spec = attention_spec(reader.config, reader.names(), str(reader.folder))
    check_source(reader, spec, options)
    heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads, "v_proj": spec.num_kv_heads}
    fits, output_errors = fitted_projections(reader, spec, options)
    layout = mhe_layout(reader, spec, heads)
    new_tensors = fitted_tensors(spec, fits)

    def tensors():
        for item in layout:
            if item.name in new_tensors:
                yield item.name, new_tensors[item.name].to(item.dtype).contiguous()
            else:
                yield item.name, SourceTensor(item.name)

    plans = [LayerPlan.of(MHE(variant=options.variant, heads=dict(heads))) for _ in range(spec.num_layers)]
    config, auto_class, pipeline_tag = runtime_config(reader.config, spec, "mhe", plans)
    before = attention_parameters({name: reader.info(name).shape for name in reader.names()}, spec)
    after = attention_parameters({item.name: item.shape for item in layout}, spec)
    space, per_layer = error_report(options, fits, output_errors)
    attention = {"before": before, "after": after, "saved_percent": round(100 * (1 - after / before), 2)}
    return Conversion(
        method="mhe",
        config=config,
        layout=layout,
        tensors=tensors,
        plan_lines=plan_printout(spec, options, attention, per_layer, space),
        report={
            "options": recorded_options(options),
            "attention_parameters": attention,
            "reconstruction_error": {
                "measured_on": space,
                "fit": f"{options.init}: {FITS[options.init]}",
                "layers": per_layer,
            },
        },
        tags=["mhe", "multi-head-embedding"],
        description=(
            f"MHE-{options.variant.upper()} attention ({options.init} init): "
            f"in every layer Q ({spec.num_heads} heads) and K, V "
            f"({spec.num_kv_heads} heads each) are one shared {spec.head_dim}-wide projection "
            "plus one embedding per head "
            f"({'multiplied' if options.variant == 'mul' else 'added'}); o_proj unchanged. Attention parameters "
            f"{before:,} -> {after:,} ({attention['saved_percent']}% fewer). "
            "Heal it with continued training before use."
        ),
        auto_class=auto_class,
        pipeline_tag=pipeline_tag,
    )


def plan_printout(
    spec: DecoderSpec | EncoderSpec, options: MHEOptions, attention: dict, per_layer: list[dict], space: str
) -> list[str]:
    """Header, parameter saving and one line per layer of reconstruction errors."""
    lines = [
        f"MHE plan: {spec.num_layers} layers; Q over {spec.num_heads} heads, "
        f"K and V over {spec.num_kv_heads} heads, head_dim {spec.head_dim}; "
        f"variant {options.variant}, init {options.init} (fitted {FITS[options.init]}); o_proj unchanged",
        f"attention parameters: {attention['before']:,} -> {attention['after']:,} "
        f"({attention['saved_percent']}% fewer)",
        f"relative reconstruction error (on {space}):",
        f"{'layer':>5}  {'q_proj':>8}  {'k_proj':>8}  {'v_proj':>8}  {'attn out':>8}",
    ]
    for row in per_layer:
        out = f"{row['attention_output']:8.4f}" if row["attention_output"] is not None else f"{'-':>8}"
        lines.append(f"{row['layer']:>5}  {row['q_proj']:8.4f}  {row['k_proj']:8.4f}  {row['v_proj']:8.4f}  {out}")
    return lines


def card_table(report: dict, config: dict) -> list[str]:
    """The card's plan: the typed plan's columns plus the reconstruction error the report measured per layer."""
    from ..modeling.plan import MHE, parse_layers
    from ..tables import layer_ranges, markdown_table

    layers = parse_layers((report.get("plan") or config.get("upcycle") or {}).get("layers") or [])
    if not layers:
        return []
    errors = {e["layer"]: e for e in (report.get("reconstruction_error") or {}).get("layers", [])}
    measured = (report.get("reconstruction_error") or {}).get("measured_on", "weights")

    def error(index: int) -> str:
        found = errors.get(index)
        return " / ".join(f"{found[proj]:.3f}" for proj in PROJECTIONS) if found else "-"

    rows = [(index, *layer.get(MHE).cells(), error(index)) for index, layer in enumerate(layers) if layer.get(MHE)]
    return markdown_table(("layers", *MHE.COLUMNS, f"relative error Q / K / V (on {measured})"), layer_ranges(rows))


CITATION = """@inproceedings{xue2023pit,
  title = {Pit One Against Many: Leveraging Attention-head Embeddings for Parameter-efficient Multi-head Attention},
  author = {Xue, Huiyin and Aletras, Nikolaos},
  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2023},
  year = {2023},
  eprint = {2310.07911},
  archivePrefix = {arXiv}
}"""

SPEC = MethodSpec(
    name="mhe",
    summary="Multi-head embedding attention: one shared Q/K/V projection plus small per-head embeddings.",
    panel="MHE",
    options=MHEOptions,
    convert=convert,
    sources=("decoder", "encoder"),
    example="upcycle convert SRC OUT --method mhe --variant mul --init calibrated --calibration text.txt",
    card=MethodCard(
        "multi-head embedding attention (MHE)",
        "MHE keeps one shared query, key and value projection per layer and tells the heads apart with one small "
        "embedding each, which removes most of the attention projection parameters (Xue and Aletras 2023). The "
        "conversion from a dense model is upcycle's own fit; expect to heal the model with continued training.",
        (CITATION,),
    ),
    card_table=card_table,
)
