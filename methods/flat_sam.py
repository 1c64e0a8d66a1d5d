"""IGM's maths: the flat gradient projection T, the input moments it is built from, SAM
perturbations (the official per-tensor form and Foret's global-norm form) and the mixup loss.

Source: the IGM paper (flat gradient modification + SAM over alternating unimodal learning) and
its released code (the algorithm, official vs paper: docs/methods/igm.md).

Flat projection: for each Linear layer of the previous modality's head, with a its input,
Y = Σ_batches outer(mean_batch(a), mean_batch(a)) (uncentred; scale irrelevant). With
Y = V diag(λ) Vᵀ::

    T = V · diag(exp(−τ·(λ − λmin)/(λmax − λmin))) · Vᵀ,      weight.grad ← weight.grad @ T

T is symmetric with eigenvalues in [e^−τ, 1]: directions in which the previous modality's inputs
carry little energy keep their gradient, the dominant ones are damped by up to e^−τ. This is the
paper's form (the slides' U Σ Vᵀ is wrong on rank-deficient Y). λmax = λmin gives T = I here; the
released code divides by zero (NaN).

"SAM": the released code moves each parameter tensor by ρ·g/‖g‖ (per-tensor norm, not restored)
and re-evaluates only the head on the same features; with the released ρ (1e-10 audio-visual,
1e-15 others) the move is below float32 resolution, so the step equals one backward of
(0.3 + 0.7λ)·CE(o, y) + 0.7(1 − λ)·CE(o, y[perm]). The paper variant is Foret's SAM: global norm
ε = ρ·g/‖g‖, re-forward at θ + ε, restore θ, use that gradient. The schedule is the script's.

Imports: torch only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "flat_projection",
    "project_weight_grad",
    "input_moment",
    "accumulate_input_moment",
    "accumulate_input_moment_from_sum",
    "input_sum_and_count",
    "sam_perturbation_per_tensor",
    "sam_perturbation_global",
    "mix_inputs",
    "mixup_cross_entropy",
]


def flat_projection(Y: torch.Tensor, tau: float) -> torch.Tensor:
    """T = V·diag(exp(−τ·(λ − λmin)/(λmax − λmin)))·Vᵀ from the eigendecomposition of Y.

    Y: (d, d) symmetric (only its symmetric part is used: (Y + Yᵀ)/2). Computed in float64,
    returned in Y's dtype, exactly symmetric. Eigenvalues of T lie in [e^−τ, 1]; the eigenvector
    of λmin is left unchanged. Guard: λmax = λmin (e.g. Y = c·I or Y = 0) gives T = I, chosen by
    torch.where on the spread — no host sync in this function, though ``torch.linalg.eigh`` may
    itself synchronise on CUDA (it is called once per stage). Source: IGM paper (T = VΣVᵀ),
    τ = 0.4 in the released code; the guard is ours (the released code returns NaN).
    """
    if Y.dim() != 2 or Y.shape[0] != Y.shape[1]:
        raise ValueError(f"Y must be a square matrix, got shape {tuple(Y.shape)}")
    y64 = Y.to(torch.float64)
    y64 = 0.5 * (y64 + y64.transpose(0, 1))
    lam, vecs = torch.linalg.eigh(y64)  # ascending eigenvalues
    lam_min, lam_max = lam[0], lam[-1]
    spread = lam_max - lam_min
    has_spread = spread > 0
    safe_spread = torch.where(has_spread, spread, torch.ones_like(spread))
    sigma = torch.exp(-tau * (lam - lam_min) / safe_spread)
    t = (vecs * sigma) @ vecs.transpose(0, 1)
    t = 0.5 * (t + t.transpose(0, 1))
    eye = torch.eye(Y.shape[0], dtype=torch.float64, device=Y.device)
    return torch.where(has_spread, t, eye).to(Y.dtype)


def projection_diagnostics(Y: torch.Tensor, tau: float) -> dict:
    """What a flat projection built from the moments Y does, as 0-d float64 tensors (no host sync):

    - ``effective_rank`` of Y: exp(H(p)), p = λ/Σλ over the eigenvalues λ ≥ 0 of Y (1 when the
      previous modality's head inputs occupy one direction, d when they spread evenly);
    - ``top_energy_share``: λmax/Σλ, the share of Y's energy in its dominant direction;
    - ``damped_share``: the share of the d directions that T damps by more than half of its full
      damping, σ < (1 + e^−τ)/2 — the directions the projection protects;
    - ``mean_scale``: trace(T)/d, the average factor on a gradient direction (1 = no projection).

    (min σ is e^−τ and the median is ≈ 1 by construction on rank-deficient Y: they carry nothing.)
    Y = 0 or λmax = λmin give T = I: damped_share 0, mean_scale 1 (Y = 0: effective_rank 1,
    top_energy_share 0).
    """
    y64 = Y.to(torch.float64)
    lam = torch.linalg.eigvalsh(0.5 * (y64 + y64.transpose(0, 1))).clamp_min(0)
    total = lam.sum()
    p = lam / torch.where(total > 0, total, torch.ones_like(total))   # all zero for Y = 0
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    spread = lam[-1] - lam[0]
    x = (lam - lam[0]) / torch.where(spread > 0, spread, torch.ones_like(spread))
    sigma = torch.where(spread > 0, torch.exp(-tau * x), torch.ones_like(x))   # T's eigenvalues
    half = 0.5 * (1 + torch.exp(torch.tensor(-tau, dtype=torch.float64, device=lam.device)))
    return {"effective_rank": torch.exp(entropy), "top_energy_share": p[-1],
            "damped_share": (sigma < half).to(torch.float64).mean(), "mean_scale": sigma.mean()}


def project_weight_grad(grad: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """grad @ T for a Linear weight gradient grad (out, in) and T (in, in).

    Equals the paper's T·∇W written for the (in, out) layout, i.e. (T @ grad.T).T, since T is
    symmetric. Linear in grad, so it commutes with DDP's all-reduce. Computed in grad's dtype.
    Biases and encoders are not projected (released code).
    """
    if grad.dim() != 2 or T.shape != (grad.shape[1], grad.shape[1]):
        raise ValueError(f"grad (out, in) and T (in, in) expected, got {tuple(grad.shape)} and "
                         f"{tuple(T.shape)}")
    return grad @ T.to(grad.dtype)


def input_sum_and_count(a: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Sum of a Linear layer's input over every leading dimension, and the number of rows.

    a: (..., d) → ((d,), n). For DDP, all-reduce (sum) the sums and the counts, then call
    :func:`accumulate_input_moment_from_sum` — the moment of the GLOBAL batch mean (the sum of
    per-rank moments would differ). The count comes from the shape: no host sync.
    """
    rows = a.reshape(-1, a.shape[-1])
    return rows.sum(dim=0), rows.shape[0]


def input_moment(a: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """outer(m, m) with m = mean of a over every leading dimension (a: (..., d) → (d, d)).

    The batch mean is taken in a's dtype, the outer product in ``dtype`` (default a's).
    """
    m = a.reshape(-1, a.shape[-1]).mean(dim=0)
    if dtype is not None:
        m = m.to(dtype)
    return torch.outer(m, m)


def accumulate_input_moment(Y: Optional[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """Y + outer(mean_batch(a), mean_batch(a)) (uncentred), returned as a new tensor.

    Y: (d, d) or None (start from zero, in float64). The outer product is formed in Y's dtype.
    Source: IGM released code (moment of the batch-mean input of each head Linear, summed over
    the training loader; the scale does not matter for T). Single-process form; see
    :func:`input_sum_and_count` for DDP.
    """
    dtype = torch.float64 if Y is None else Y.dtype
    moment = input_moment(a, dtype=dtype)
    return moment if Y is None else Y + moment


def accumulate_input_moment_from_sum(Y: Optional[torch.Tensor], a_sum: torch.Tensor,
                                     count: Union[int, torch.Tensor]) -> torch.Tensor:
    """Y + outer(m, m) with m = a_sum / count (the DDP form of :func:`accumulate_input_moment`).

    a_sum: (d,) all-reduced batch sum, count: global number of rows (int or tensor).
    """
    dtype = torch.float64 if Y is None else Y.dtype
    m = a_sum.to(dtype) / count
    moment = torch.outer(m, m)
    return moment if Y is None else Y + moment


GradList = Sequence[Optional[torch.Tensor]]


def _present(grads: GradList) -> Tuple[List[int], List[torch.Tensor]]:
    """Indices and tensors of the non-None entries."""
    idx = [i for i, g in enumerate(grads) if g is not None]
    return idx, [grads[i] for i in idx]


def _place(n: int, idx: List[int], values: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """A list of n entries: values at idx, None elsewhere."""
    out: List[Optional[torch.Tensor]] = [None] * n
    for i, v in zip(idx, values):
        out[i] = v
    return out


def sam_perturbation_per_tensor(grads: GradList, rho: float,
                                eps: float = 1e-12) -> List[Optional[torch.Tensor]]:
    """Official IGM "SAM" move: ε_p = ρ·g_p/(‖g_p‖ + eps) for each tensor separately.

    Each non-None entry has norm ρ (up to eps); None entries (parameters without gradient) stay
    None. The released code adds ε to the parameters and does not restore them. eps avoids 0/0
    for a zero gradient (ε = 0 then). No host sync. Computed with torch._foreach_* over the list
    (each tensor's norm in its own dtype, as torch.linalg.vector_norm would; the same elementwise
    operations as the per-tensor form: g·(ρ·(1/(‖g‖ + eps)))).
    """
    idx, present = _present(grads)
    if not present:
        return [None for _ in grads]
    scales = torch._foreach_norm(present)
    torch._foreach_add_(scales, eps)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, rho)
    return _place(len(grads), idx, torch._foreach_mul(present, scales))


def sam_perturbation_global(grads: GradList, rho: float,
                            eps: float = 1e-12) -> List[Optional[torch.Tensor]]:
    """Foret SAM (paper variant): ε = ρ·g/(‖g‖₂ + eps) with the norm over ALL tensors together.

    ‖g‖₂ = sqrt(Σ_p ‖g_p‖²) = ‖(‖g_1‖, …, ‖g_P‖)‖₂, computed in float32 or wider; the concatenated ε
    has norm ρ (up to eps). For DDP pass the all-reduced gradients. None entries stay None. No host
    sync. The per-tensor norms are one torch._foreach_norm and ε one torch._foreach_mul per dtype
    of the gradients (one in practice).
    """
    idx, present = _present(grads)
    if not present:
        return [None for _ in grads]
    norm_dtype = torch.promote_types(present[0].dtype, torch.float32)
    norms = torch._foreach_norm(present, 2, dtype=norm_dtype)
    scale = rho / (torch.linalg.vector_norm(torch.stack(norms)) + eps)
    by_dtype: dict = {}
    for j, g in enumerate(present):
        by_dtype.setdefault(g.dtype, []).append(j)
    out: List[Optional[torch.Tensor]] = [None] * len(present)
    for dtype, js in by_dtype.items():
        for j, e in zip(js, torch._foreach_mul([present[j] for j in js], scale.to(dtype))):
            out[j] = e
    return _place(len(grads), idx, out)


def mix_inputs(x: torch.Tensor, lam: Union[float, torch.Tensor],
               perm: torch.Tensor) -> torch.Tensor:
    """Mixup of a batch: λ·x + (1 − λ)·x[perm] (λ ~ Beta(α, α) drawn by the caller)."""
    return lam * x + (1 - lam) * x[perm]


def mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor,
                        lam: Union[float, torch.Tensor]) -> torch.Tensor:
    """Per-sample mixup loss L_ori = λ·CE(o, y) + (1 − λ)·CE(o, y[perm]), shape (B,).

    Source: IGM released code (mixup on the input, α = 1.0; 0.9 for Twitter images).
    The official step's loss is 0.7·L_ori.mean() + 0.3·CE(o, y).mean() (see module docstring).
    """
    ce_own = F.cross_entropy(logits, labels, reduction="none")
    ce_mixed = F.cross_entropy(logits, labels[perm], reduction="none")
    return lam * ce_own + (1 - lam) * ce_mixed
