"""Merging key/value heads on calibration statistics, with the per-head transforms folded into q_proj and o_proj.

GQA's mean-pooling averages KV heads that a pretrained model never aligned: two heads that read the same feature with
opposite signs, or in rotated coordinates, cancel. Here each group of ``r`` KV heads that becomes one is merged so that
what the query heads read from it stays what they read before, measured on the layer's input covariance
``C = E[x x^T]`` (``x`` with a trailing 1, so biases are fitted too), in closed form and without changing the
architecture: the output is a plain GQA/MQA checkpoint.

Keys: rotary embeddings rotate each frequency pair ``(j, j + d/2)`` of a head as one complex number, so a transform
of the keys commutes with RoPE only if it is a complex scale (a rotation and a gain) per pair. For each pair, the
group's ``r`` complex keys ``k_1..k_r`` are replaced by one shared key ``k'`` and complex scales ``t_k`` with
``k_k ~ t_k k'``: the best such rank-1 fit of the ``r x r`` complex covariance of the keys, weighted by the energy the
attached query heads put on that pair, is its top eigenvector. Query head ``i`` of KV head ``k`` then reads
``conj(t_k) q_i`` (folded into its q_proj rows), so ``q_i . k_k = (conj(t_k) q_i) . k'`` under every rotation.

Values carry no rotation, so any linear map per head is allowed: ``V_k ~ V' U_k^T``. The group's concatenated values,
each weighted by what its query heads' o_proj slices do with it (``M_k = sum_i W_o^i^T W_o^i``), are approximated by
their top ``d`` principal components (a weighted PCA on ``C``); ``U_k`` is folded into the o_proj slices of the query
heads of KV head ``k``.

Both fits are exact when the source's grouped heads already are such transforms of one another (then the merged
model's logits equal the source's), and reduce to nothing when a group holds one head. This follows the per-head
alignment before merging of the MHA-to-GQA conversion with orthogonal Procrustes (EMNLP 2025 findings,
fpcsong/mha2gqa) and the SVD of calibration KV caches of Yu et al. (arXiv 2406.07056), with two changes: the key
transforms are restricted to what commutes with RoPE (so no key is left outside the rotary part), and both fits are
closed-form on one covariance per layer rather than on stored activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch

EIGEN_FLOOR = 1e-8  # relative: smaller eigenvalues of M_k are clamped before M_k^(-1/2)


@dataclass
class MergedLayer:
    """One layer's new projections (float64): k/v weights [G*d, D] and biases [G*d] (None without bias), q weight
    [h*d, D] and bias, o weight [D, h*d]; with the relative errors of the fits on the calibration covariance."""

    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    o_weight: torch.Tensor
    key_error: float
    value_error: float


def with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[rows, D] weight and [rows] bias -> [rows, D + 1] (the bias as the weight of a constant 1 input)."""
    column = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, column[:, None]], dim=1)


def as_complex(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[heads*d, D+1] real rows -> [heads, d/2, D+1] complex: pair j of a head is row j + i * row (j + d/2)."""
    heads = rows.view(-1, head_dim, rows.shape[-1])
    half = head_dim // 2
    return torch.complex(heads[:, :half], heads[:, half:])


def as_real(pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_complex`: [heads, d/2, D+1] complex -> [heads*d, D+1] real."""
    return torch.cat([pairs.real, pairs.imag], dim=1).flatten(0, 1)


def merge_keys(
    keys: torch.Tensor, query_energy: torch.Tensor, covariance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One group's keys -> (shared key rows [d/2, D+1] complex, scales t [r, d/2] complex, relative error).

    ``keys`` [r, d/2, D+1] complex rows; ``query_energy`` [r, d/2]: per KV head and pair, the mean squared query of
    the attached heads (the weight of that key's error); ``covariance`` [D+1, D+1] real."""
    real = covariance.to(keys.real.dtype)
    pairs = keys.permute(1, 0, 2)  # [d/2, r, D+1]
    # E[conj(k_a) k_b] = conj(w_a) C w_b^T per pair: [d/2, r, r], Hermitian (Y^H Y for Y [tokens, r] of the keys)
    gram = pairs.conj() @ real.to(pairs.dtype) @ pairs.transpose(1, 2)
    weight = query_energy.T.clamp_min(0).sqrt().to(gram.real.dtype)  # [d/2, r]
    weighted = weight[:, :, None] * gram * weight[:, None, :]
    values, vectors = torch.linalg.eigh(weighted)  # ascending
    top = vectors[:, :, -1]  # u [d/2, r]: Y ~ (Y u) u^H, with y_k = sqrt(w_k) k_k
    safe = torch.where(weight > 0, weight, torch.ones_like(weight))
    shared = ((top * weight)[:, :, None] * pairs).sum(dim=1)  # k' = sum_k u_k sqrt(w_k) k_k: [d/2, D+1]
    scales = (top.conj() / safe).T  # t_k = conj(u_k) / sqrt(w_k): [r, d/2]
    total = values.sum(dim=1).clamp_min(1e-300)
    error = ((total - values[:, -1]).clamp_min(0).sum() / total.sum()).sqrt().item()
    return shared, scales, error


def merge_values(
    values: torch.Tensor, output_slices: torch.Tensor, covariance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One group's values -> (shared value rows [d, D+1], per-head maps U [r, d, d] with V_k ~ V' U_k^T, relative
    error).

    ``values`` [r, d, D+1] real rows; ``output_slices`` [r, D_out, q*d]: per KV head, the o_proj columns of its query
    heads side by side (what weights its values' error); ``covariance`` [D+1, D+1]."""
    r, d, _ = values.shape
    slices = output_slices.unflatten(2, (-1, d))  # [r, D_out, q, d]
    metric = torch.einsum("roqa,roqb->rab", slices, slices)  # M_k = sum_i W_o^i^T W_o^i: [r, d, d]
    eigenvalues, basis = torch.linalg.eigh(metric)
    floor = EIGEN_FLOOR * eigenvalues.amax(dim=1, keepdim=True).clamp_min(1e-300)
    root = eigenvalues.clamp_min(floor).sqrt()
    sqrt_metric = basis @ torch.diag_embed(root) @ basis.transpose(1, 2)
    inverse_sqrt = basis @ torch.diag_embed(1 / root) @ basis.transpose(1, 2)
    projection = torch.cat(list(values.transpose(1, 2) @ sqrt_metric), dim=1)  # P = [W_k^T M_k^(1/2)]_k: [D+1, r*d]
    spread = projection.T @ covariance @ projection  # [r*d, r*d]
    energies, components = torch.linalg.eigh(spread)
    top = components[:, -d:]  # E [r*d, d]
    shared = (projection @ top).T  # W_v' = E^T P^T: [d, D+1]
    maps = inverse_sqrt @ top.view(r, d, d)  # U_k = M_k^(-1/2) E_k: [r, d, d]
    error = (energies[:-d].clamp_min(0).sum() / energies.clamp_min(0).sum().clamp_min(1e-300)).sqrt().item()
    return shared, maps, error


def merge_layer(
    q: tuple[torch.Tensor, torch.Tensor | None],
    k: tuple[torch.Tensor, torch.Tensor | None],
    v: tuple[torch.Tensor, torch.Tensor | None],
    o_weight: torch.Tensor,
    covariance: torch.Tensor,
    kv_heads: int,
    target: int,
    head_dim: int,
) -> MergedLayer:
    """Merge the ``kv_heads`` KV heads of one layer into ``target`` (consecutive groups, as GQA groups them).

    ``q``, ``k``, ``v``: (weight [rows, D], bias [rows] or None); ``o_weight`` [D_out, h*d]; ``covariance``
    [D+1, D+1] of the layer's attention input with a trailing 1. Everything in float64."""
    d, heads = head_dim, q[0].shape[0] // head_dim
    per_kv, group = heads // kv_heads, kv_heads // target
    queries = as_complex(with_bias(*q), d)  # [h, d/2, D+1]
    keys = as_complex(with_bias(*k), d).view(target, group, d // 2, -1)  # [G, r, d/2, D+1]
    values = with_bias(*v).view(target, group, d, -1)  # [G, r, d, D+1]
    real = covariance.to(torch.complex128)
    query_energy = ((queries @ real) * queries.conj()).sum(-1).real  # E|q_i,j|^2: [h, d/2]
    query_energy = query_energy.view(kv_heads, per_kv, d // 2).sum(1).view(target, group, d // 2)
    output_slices = o_weight.view(o_weight.shape[0], kv_heads, per_kv * d).permute(1, 0, 2)  # [g, D_out, q*d]
    output_slices = output_slices.reshape(target, group, o_weight.shape[0], per_kv * d)

    new_keys, new_values, key_scales, value_maps, key_errors, value_errors = [], [], [], [], [], []
    for j in range(target):
        shared, scales, error = merge_keys(keys[j], query_energy[j], covariance)
        new_keys.append(shared)
        key_scales.append(scales)
        key_errors.append(error)
        shared, maps, error = merge_values(values[j], output_slices[j], covariance)
        new_values.append(shared)
        value_maps.append(maps)
        value_errors.append(error)
    scales = torch.cat(key_scales).repeat_interleave(per_kv, dim=0)  # per query head: its KV head's t [h, d/2]
    folded_queries = as_real(scales.conj()[:, :, None] * queries)  # [h*d, D+1]
    maps = torch.cat(value_maps).repeat_interleave(per_kv, dim=0)  # [h, d, d]
    o_slices = o_weight.view(o_weight.shape[0], heads, d).permute(1, 0, 2)  # [h, D_out, d]
    folded_output = (o_slices @ maps).permute(1, 0, 2).reshape(o_weight.shape)  # W_o^i U_k
    key_rows = as_real(torch.stack(new_keys))  # [G*d, D+1]
    value_rows = torch.cat(new_values)  # [G*d, D+1]
    return MergedLayer(
        k_weight=key_rows[:, :-1],
        k_bias=key_rows[:, -1] if k[1] is not None else None,
        v_weight=value_rows[:, :-1],
        v_bias=value_rows[:, -1] if v[1] is not None else None,
        q_weight=folded_queries[:, :-1],
        q_bias=folded_queries[:, -1] if q[1] is not None else None,
        o_weight=folded_output,
        key_error=sum(key_errors) / target,
        value_error=sum(value_errors) / target,
    )
