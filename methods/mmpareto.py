"""MMPareto's maths: per unimodal encoder, the multimodal and the unimodal gradient integrated into
one direction common to both, then given back (and enhanced) magnitude.

Source: Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML
2024, and its released code (GeWu-Lab/MMPareto_ICML2024: code/MMPareto.py, train_epoch;
code/min_norm_solvers.py, MinNormSolver._min_norm_element_from2). For encoder k, with g_m the
gradient of the multimodal loss and g_u that of k's unimodal loss, both over ALL of k's parameters:

    cos_k = cos(g_m, g_u)
    alpha_m, alpha_u = 1/2, 1/2                                  if cos_k > 0   (no conflict)
                     = c, 1 - c,  c = argmin_c |c g_m + (1-c) g_u|^2            otherwise (MGDA)
    h = 2 (alpha_m g_m + alpha_u g_u)                                             (direction)
    g_final = gamma * max(1, |g_m + g_u| / |h|) * h                               (magnitude)

The two-task min-norm weight in closed form (Sener & Koltun 2018, as the released
_min_norm_element_from2 computes it, with its boundary values 0.999 / 0.001 instead of 1 / 0):

    c = 0.999                                    if g_m.g_u >= |g_m|^2
      = 0.001                                    elif g_m.g_u >= |g_u|^2
      = (|g_u|^2 - g_m.g_u) / |g_m - g_u|^2      otherwise

Granularity (docs/methods/mmpareto.md): the cosine and the weights are decided per ENCODER (the
released code concatenates every parameter tensor of the encoder; the min-norm solver sums the dot
products over its tensors); the magnitude is rescaled per PARAMETER TENSOR in the released code
(`three_norm` / `new_norm` of each `param.grad`) — `per_tensor=True` here — and per encoder in the
paper's algorithm (`per_tensor=False`). Per encoder the min-norm element has norm <= |g_m + g_u| / 2,
so the max(1, .) never binds there; per tensor it can.

Layout: the step works on ONE flat buffer per encoder and gradient set (`flatten`; the released
code's concatenation): the cosine, the dot products, h and the final gradient are a few operators on
it, the per-tensor norms one `torch._foreach_norm` over its segments (`integrate_flat`), instead of
operators per parameter tensor. Element for element the arithmetic is the per-tensor one (on CPU
the results are bit-identical to it); `pareto_weights` and `integrate` keep the per-tensor lists.

Hot-path functions never synchronise with the host (no .item(), no Python `if` on tensor values).
Imports: torch only.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["min_norm_weight", "ParetoWeights", "flatten", "segment_ids", "pareto_weights_flat", "pareto_weights",
           "integrate_flat", "integrate"]

#: The released code's conflict-free weights and magnitude enhancement (MMPareto.py: 0.5, gamma=1.5).
EQUAL_WEIGHT = 0.5
RELEASED_GAMMA = 1.5
#: _min_norm_element_from2's boundary weights (instead of 1 and 0).
BOUNDARY_HIGH, BOUNDARY_LOW = 0.999, 0.001


def min_norm_weight(g1g1: torch.Tensor, g1g2: torch.Tensor, g2g2: torch.Tensor) -> torch.Tensor:
    """The weight c of x1 in min_c |c x1 + (1 - c) x2|^2 from the three dot products (0-d tensors):
    0.999 if x1.x2 >= |x1|^2, else 0.001 if x1.x2 >= |x2|^2, else (|x2|^2 - x1.x2) / |x1 - x2|^2.
    Source: min_norm_solvers.py, MinNormSolver._min_norm_element_from2 (two-task MGDA)."""
    denominator = (g1g1 + g2g2 - 2 * g1g2).clamp_min(torch.finfo(g1g1.dtype).tiny)
    interior = (g2g2 - g1g2) / denominator
    return torch.where(g1g2 >= g1g1, torch.full_like(interior, BOUNDARY_HIGH),
                       torch.where(g1g2 >= g2g2, torch.full_like(interior, BOUNDARY_LOW), interior))


class ParetoWeights(NamedTuple):
    """What MMPareto decides for one encoder (0-d tensors): the cosine of g_m and g_u, whether they
    conflict (cos <= 0), the weights of the multimodal and of the unimodal gradient."""
    cos: torch.Tensor
    conflict: torch.Tensor
    alpha_m: torch.Tensor
    alpha_u: torch.Tensor


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat buffer of an encoder's per-tensor gradients, concatenated in order: the released
    code's torch.cat of the flattened param.grad, as one copy — torch._chunk_cat (dim 0, one chunk:
    each tensor flattened and concatenated; one kernel on CUDA) instead of one flatten per tensor,
    and torch.cat where a tensor is 0-d or empty (which _chunk_cat refuses). Exact (a copy)."""
    if all(t.dim() > 0 and t.numel() > 0 for t in tensors):
        return torch._chunk_cat(list(tensors), dim=0, num_chunks=1).view(-1)
    return torch.cat([t.flatten() for t in tensors])


def segment_ids(sizes: Sequence[int], device=None) -> torch.Tensor:
    """For a flat buffer of tensors with `sizes` elements each: the index of the tensor each element
    belongs to (0 x sizes[0], 1 x sizes[1], ...), a long tensor on `device`. Built from Python ints
    (a host-to-device copy on a GPU: build it once per layout and pass it to integrate_flat)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.long))
    return ids.to(device) if device is not None else ids


def pareto_weights_flat(flat_m: torch.Tensor, flat_u: torch.Tensor) -> ParetoWeights:
    """pareto_weights on the encoder's flat gradients (flatten of its per-tensor gradients): cos =
    torch's cosine_similarity (eps 1e-8) of flat_m and flat_u; alpha = (1/2, 1/2) when cos > 0, else
    the min-norm (MGDA) weights (c, 1 - c) from flat_m.flat_m, flat_m.flat_u, flat_u.flat_u.
    Source: MMPareto.py train_epoch (this_cos_audio on the concatenations, audio_k)."""
    cos = torch.nn.functional.cosine_similarity(flat_m, flat_u, dim=0)
    c = min_norm_weight(flat_m @ flat_m, flat_m @ flat_u, flat_u @ flat_u)
    conflict = ~(cos > 0)
    alpha_m = torch.where(conflict, c, torch.full_like(c, EQUAL_WEIGHT))
    return ParetoWeights(cos, conflict, alpha_m, 1 - alpha_m)


def pareto_weights(g_m: Sequence[torch.Tensor], g_u: Sequence[torch.Tensor]) -> ParetoWeights:
    """The weights for one encoder from its per-tensor gradients g_m[i], g_u[i] (same shapes): the
    cosine over the whole encoder (torch's cosine_similarity, eps 1e-8, of the concatenations);
    alpha = (1/2, 1/2) when cos > 0, else the min-norm (MGDA) weights (c, 1 - c), the dot products
    summed over the encoder's tensors. Source: MMPareto.py train_epoch (this_cos_audio, audio_k).
    Equal to pareto_weights_flat(flatten(g_m), flatten(g_u))."""
    return pareto_weights_flat(flatten(g_m), flatten(g_u))


def integrate_flat(flat_m: torch.Tensor, flat_u: torch.Tensor, weights: ParetoWeights, sizes: Sequence[int],
                   gamma: float = RELEASED_GAMMA, per_tensor: bool = True,
                   segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """integrate on the encoder's flat gradients (flatten of tensors with `sizes` elements each):
    h = 2 (alpha_m g_m + alpha_u g_u) over the whole buffer, the norms |g_m + g_u| and |h| of each
    tensor's segment (one foreach norm over the segments), or of the whole encoder as the norm of the
    per-tensor norms (`per_tensor=False`), and the final gradient gamma * max(1, |g_m + g_u| / |h|) * h,
    the factor spread over each segment's elements by `segments` (segment_ids(sizes), built here when
    None). Returns (the flat final gradient, the mean over the tensors of the max(1, .) factor).
    Element for element the same arithmetic as integrate. Source: MMPareto.py train_epoch
    (three_norm, new_grad, diff, gamma=1.5)."""
    h = 2 * (weights.alpha_m * flat_m + weights.alpha_u * flat_u)
    sum_norms = torch.stack(torch._foreach_norm((flat_m + flat_u).split(list(sizes))))
    h_norms = torch.stack(torch._foreach_norm(h.split(list(sizes))))
    if not per_tensor:
        sum_norms, h_norms = torch.linalg.vector_norm(sum_norms), torch.linalg.vector_norm(h_norms)
    ratio = torch.where(h_norms > 0, sum_norms / h_norms.clamp_min(torch.finfo(h_norms.dtype).tiny),
                        torch.ones_like(h_norms))
    factor = torch.where(ratio > 1, ratio, torch.ones_like(ratio))
    scale = gamma * factor
    if per_tensor:
        scale = scale.index_select(0, segments if segments is not None else segment_ids(sizes, h.device))
    return h * scale, factor.mean()


def integrate(g_m: Sequence[torch.Tensor], g_u: Sequence[torch.Tensor], weights: ParetoWeights,
              gamma: float = RELEASED_GAMMA, per_tensor: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder's final gradients: h = 2 (alpha_m g_m + alpha_u g_u), scaled by
    gamma * max(1, |g_m + g_u| / |h|) — norms of each tensor (`per_tensor`, the released code) or of
    the whole encoder (the paper's algorithm). Returns (the final gradient of each tensor, the mean
    over the encoder's tensors of the max(1, .) factor — 1 when nothing was rescaled).

    Where |h| = 0 the factor is 1 (the released code then gives NaN when |g_m + g_u| > 0, a case
    that needs alpha_m g_m = -alpha_u g_u exactly). Source: MMPareto.py train_epoch (three_norm,
    new_grad, diff, gamma=1.5). Computed by integrate_flat on one flat buffer per encoder."""
    sizes = [g.numel() for g in g_m]
    final, factor = integrate_flat(flatten(g_m), flatten(g_u), weights, sizes, gamma, per_tensor)
    return [f.view_as(g) for f, g in zip(final.split(sizes), g_m)], factor
