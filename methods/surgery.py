"""GAAL's maths: hard-sample selection by entropy and cross-modal gradient surgery.

Source: the GAAL paper (gradient-aligned alternating learning, tabular + image) and its released
code (the algorithm, official vs paper: docs/methods/gaal.md). The surgery is the closed form of GEM's
single-constraint dual QP with a lower bound ``margin`` on the multiplier and a ridge ``eps``::

    min_v  ½·v²·(‖g_ref‖² + eps) + v·(g·g_ref)    s.t.  v ≥ margin
    v*  =  max(margin, −(g·g_ref) / (‖g_ref‖² + eps)),       g ← g + v*·g_ref

applied only when the gradients conflict (g·g_ref < 0). Paper and official code agree on this
step; the official/paper differences of GAAL are in the training schedule (train/gaal.py).

Distributed use (docs/training.md, "Several processes"): the selection is global — gather
every rank's entropies (rank-major order), select with :func:`global_hard_sample_mask`, normalise
the loss by the global count; the surgery acts on the all-reduced head gradient. The gathering
and the all-reduce belong to the training script.

Hot-path functions here never synchronise with the host (no ``.item()``, no Python ``if`` on
tensor values); the one that must is marked in its docstring.

Imports: torch only.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    "entropy",
    "entropy_from_log_probs",
    "hard_sample_count",
    "hard_sample_indices",
    "global_hard_sample_mask",
    "global_hard_sample_weights",
    "global_hard_sample_indices",
    "project_conflicting",
    "project_conflicting_with_stats",
    "SurgeryResult",
    "flatten_head_grad",
    "unflatten_head_grad",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of softmax(logits) over the last dimension.

    H(p) = −Σ_c p_c·log p_c with log p = log_softmax(logits) (numerically stable: no log(0),
    exact 0·(−inf) terms cannot occur because log_softmax is finite for finite logits).
    logits (B, C) → (B,). float16/bfloat16 logits are computed and returned in float32; other
    dtypes keep theirs. Source: GAAL paper/code (entropy of the softmax prediction).
    """
    x = logits.float() if logits.dtype in _LOW_PRECISION else logits
    return entropy_from_log_probs(torch.log_softmax(x, dim=-1))


def entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_c p_c·log p_c from log-probabilities log p (B, C) → (B,), in log_p's dtype.

    ``entropy(logits)`` is this of ``log_softmax(logits)``; a caller that already holds the
    log-probabilities (cross-entropy's log_softmax) saves recomputing them. No graph is needed for a
    selection: call it under ``torch.no_grad()``. Source: as :func:`entropy`.
    """
    return -(log_p.exp() * log_p).sum(dim=-1)


def hard_sample_count(batch_size: int, frac: float) -> int:
    """k = max(1, floor(frac·B)), capped at B (0 for an empty batch).

    floor is Python's ``int(frac * B)`` on the float product, as the released code computes it.
    Pure Python on shapes: no host sync.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must lie in (0, 1], got {frac}")
    batch_size = int(batch_size)
    return min(batch_size, max(1, math.floor(frac * batch_size)))


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    # Stable sort: among equal entropies the lower index wins, so a selection over a rank-major
    # concatenation is the same whether one rank or N ranks hold the batch.
    return torch.sort(scores, descending=True, stable=True).indices


def hard_sample_indices(logits: torch.Tensor, frac: float) -> torch.LongTensor:
    """Indices of the k = max(1, floor(frac·B)) samples with the highest entropy.

    logits (B, C) → LongTensor (k,), ordered by decreasing entropy; ties are broken towards the
    lower index (stable sort), which makes the selection identical to
    :func:`global_hard_sample_mask` over a rank-major gather. Source: GAAL paper/code ("hard
    samples" of the other modality guide the update; frac = topk_frac = 0.5). No host sync.
    """
    k = hard_sample_count(logits.shape[0], frac)
    return _descending_order(entropy(logits))[:k]


def global_hard_sample_mask(all_entropies: torch.Tensor, frac: float, offset: int,
                            local_count: int) -> Tuple[torch.Tensor, int]:
    """This rank's share of a global hard-sample selection (DDP).

    all_entropies: (B_global,) every rank's per-sample entropies concatenated in rank order
    (e.g. an all-gather of :func:`entropy`); this rank's samples are
    ``all_entropies[offset : offset + local_count]``. The global top-k (k from
    :func:`hard_sample_count` on B_global, same tie-break as :func:`hard_sample_indices`) is
    taken over the whole vector.

    Returns ``(mask, k)``: a bool mask (local_count,) of this rank's selected samples, and the
    global count k (Python int, from shapes). The loss that matches one rank holding the whole
    batch is ``(ce * mask).sum() / k`` on each rank, then SUMMED over ranks (or multiplied by the
    world size before DDP's averaging all-reduce). A mask keeps shapes static: no host sync.
    """
    total = all_entropies.shape[0]
    k = hard_sample_count(total, frac)
    selected = _descending_order(all_entropies)[:k]
    mask = torch.zeros(total, dtype=torch.bool, device=all_entropies.device).scatter_(0, selected, True)
    if offset == 0 and local_count == total:   # one rank holds the whole batch: no slice to dispatch
        return mask, k
    return mask[offset:offset + local_count], k


def global_hard_sample_weights(all_entropies: torch.Tensor, frac: float, offset: int, local_count: int,
                               dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, int]:
    """This rank's per-sample weights of the global hard-sample loss: w_i = 1/k for the samples of
    :func:`global_hard_sample_mask` (the global top-k by entropy), 0 for the others.

    Returns ``(w, k)``, w of shape (local_count,) and `dtype`. Σ_i w_i·ce_i on each rank, summed over
    ranks, is the mean CE over the hard samples, and w is exactly the gradient that loss
    ``(ce * mask).sum() / k`` sends to each ce_i: 1/k rounded once to `dtype` (1/k in float64 rounded
    to float32 equals float32's own 1/k, double rounding being innocuous for a quotient), 0 elsewhere.
    So ``autograd.grad(ce, params, grad_outputs=w)`` is that loss's gradient, bit for bit, without
    its forward and the first steps of its backward. No host sync.
    """
    total = all_entropies.shape[0]
    k = hard_sample_count(total, frac)
    selected = _descending_order(all_entropies)[:k]
    w = torch.zeros(total, dtype=dtype, device=all_entropies.device).scatter_(0, selected, 1.0 / k)
    if offset == 0 and local_count == total:
        return w, k
    return w[offset:offset + local_count], k


def global_hard_sample_indices(all_entropies: torch.Tensor, frac: float, offset: int,
                               local_count: int) -> Tuple[torch.LongTensor, int]:
    """Like :func:`global_hard_sample_mask` but returns this rank's local indices (ascending).

    SYNCHRONISES with the host (``nonzero`` has a data-dependent size); prefer the mask in the
    hot path.
    """
    mask, k = global_hard_sample_mask(all_entropies, frac, offset, local_count)
    return mask.nonzero(as_tuple=True)[0], k


class SurgeryResult(NamedTuple):
    """Outcome of :func:`project_conflicting_with_stats` (all tensors, no host sync).

    g: the (possibly) projected gradient, g's dtype. conflict: 0-d bool, g·g_ref < 0.
    v: 0-d float64, the multiplier applied (0 when no conflict). cos_before / cos_after: 0-d
    float64 cosines between g_ref and g before / after (0 for a zero vector).
    """

    g: torch.Tensor
    conflict: torch.Tensor
    v: torch.Tensor
    cos_before: torch.Tensor
    cos_after: torch.Tensor


def project_conflicting_with_stats(g: torch.Tensor, g_ref: torch.Tensor, margin: float = 0.75,
                                   eps: float = 1e-3, out: Optional[torch.Tensor] = None) -> SurgeryResult:
    """:func:`project_conflicting` plus what to log (conflict flag, v, cosines). No host sync.

    Conflict test: g·g_ref < 0 (strict) evaluated in g's dtype promoted to at least float32
    (float32 for float32 gradients, as the released code). Projection, in float64:
    v = max(margin, −(g·g_ref)/(‖g_ref‖² + eps)), g_new = g + v·g_ref, written back in g's dtype.
    Without conflict g_new holds g's values exactly (bit-identical) and v = 0.
    Cosines: cos(a, g_ref) = a·g_ref / (‖a‖·‖g_ref‖) for a = g (before) and a = g_new in float64
    (after; = before without conflict), 0 where a vector is zero.

    ``out`` (optional, g's shape and dtype, may be g itself): g_new is written into it, after every
    other result is computed, and returned as ``.g`` — the in-place surgery of a flat gradient
    buffer. The dispatch count is kept low (one operator per term, the two cosines computed as one
    2-vector); the update's arithmetic (the products summed by ``sum``) is fixed by the tests that
    compare it with the released step.
    """
    if g.dim() != 1 or g_ref.shape != g.shape:
        raise ValueError(f"g and g_ref must be 1-D of equal length, got {tuple(g.shape)} "
                         f"and {tuple(g_ref.shape)}")
    # promote_types(g.dtype, float32) without dispatching an operator in the common cases
    test_dtype = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.promote_types(g.dtype, torch.float32)
    conflict = (g.to(test_dtype) * g_ref.to(test_dtype)).sum() < 0

    g64 = g.double()
    r64 = g_ref.double()
    dot = (g64 * r64).sum()
    # −dot/(‖r‖² + eps) written as dot/(−eps − ‖r‖²): the same float64 value (IEEE rounding is
    # sign-symmetric), one operator fewer
    v = torch.clamp(dot / (-eps - (r64 * r64).sum()), min=margin)
    p64 = torch.where(conflict, g64 + v * r64, g64)   # float64 g_new; g64 itself (exactly) without conflict

    v_applied = torch.where(conflict, v, conflict)     # 0 without conflict (False promotes to 0.0): no scalar tensor
    both = torch.stack((g64, p64))                     # (2, n): [g; g_new]
    # ‖g‖·‖g_ref‖ cannot underflow for float32/16 inputs; 0 where a vector is zero (its dot is 0)
    cos = (both @ r64) / (torch.linalg.vector_norm(both, dim=1)
                          * torch.linalg.vector_norm(r64)).clamp_min(torch.finfo(torch.float64).tiny)
    cos_before, cos_after = cos.unbind()
    cos_after = torch.where(conflict, cos_after, cos_before)
    g_new = p64.to(g.dtype) if out is None else out.copy_(p64)
    return SurgeryResult(g_new, conflict, v_applied, cos_before, cos_after)


def project_conflicting(g: torch.Tensor, g_ref: torch.Tensor, margin: float = 0.75,
                        eps: float = 1e-3) -> torch.Tensor:
    """GAAL's gradient surgery on flattened head gradients (1-D tensors of equal length).

    If g·g_ref < 0 (strict; tested in float32 for float32 gradients):
        v = max(margin, −(g·g_ref)/(‖g_ref‖² + eps)),   g ← g + v·g_ref
    computed in float64 and returned in g's dtype; otherwise g unchanged (bit-identical values).
    This is the closed-form solution of GEM's single-constraint dual QP
    min_{v ≥ margin} ½v²(‖g_ref‖² + eps) + v(g·g_ref) (module docstring). With margin = 0 and
    eps → 0 it is the plain projection onto g_ref's orthogonal complement.
    Defaults margin = 0.75, eps = 1e-3 are the released code's. No host sync (torch.where).
    """
    return project_conflicting_with_stats(g, g_ref, margin, eps).g


def flatten_head_grad(weight_grad: torch.Tensor,
                      bias_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flatten a Linear head's gradient into GAAL's layout [weight row-major | bias] (1-D copy)."""
    parts = [weight_grad.reshape(-1)]
    if bias_grad is not None:
        parts.append(bias_grad if bias_grad.dim() == 1 else bias_grad.reshape(-1))
    return torch.cat(parts)


def unflatten_head_grad(flat: torch.Tensor, weight_shape: Sequence[int],
                        has_bias: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inverse of :func:`flatten_head_grad`: views ``(weight (out, in), bias (out,) or None)``.

    Write back with ``head.weight.grad.copy_(w)`` / ``head.bias.grad.copy_(b)``.
    """
    n_weight = math.prod(weight_shape)
    n_bias = int(weight_shape[0]) if has_bias else 0
    if flat.numel() != n_weight + n_bias:
        raise ValueError(f"flat has {flat.numel()} elements, expected {n_weight + n_bias} for "
                         f"weight {tuple(weight_shape)} (bias: {has_bias})")
    weight = flat[:n_weight].view(*weight_shape)
    bias = flat[n_weight:] if has_bias else None
    return weight, bias
