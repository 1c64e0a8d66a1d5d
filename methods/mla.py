"""MLA's maths: the orthogonal projector P of the shared head's gradient (orthogonal weight
modification, OWM) and the test-time entropy-weighted fusion.

Source: Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation" (CVPR 2024), and its released code (Cecile-hi/Multimodal-Learning-with-Alternating-
Unimodal-Adaptation: utils/utils.py GSPlugin.before_update; main.py calculate_entropy,
calculate_gating_weights[3]); OWM: Zeng et al., "Continual learning of context-dependent
processing in neural networks" (Nat. Mach. Intell. 2019). Official vs paper: docs/methods/mla.md.

Projector (GSPlugin): P starts at the identity (d x d, d the head's input width). One update with
a (d,) vector r, the batch mean of the head's input over a turn::

    k = P r,      P <- P - k k^T / (alpha + r^T k)                            (OWM recursion, paper)
                  P <- P - (k k^T) ./ (alpha + k r^T)     (released: torch.mm(k, r) of a (d,1) k and a
                                          (1,d) r is the d x d outer product; the division is
                                          element-wise, D_ij = alpha + k_i r_j — denominator "matrix")
    alpha = alpha_base ** (1 + b / L)      b = batch index in the epoch, L = batches per epoch
    P <- P / ||P||_F                                                      (released only)
    weight.grad <- weight.grad @ P^T                                     (the head's weight only)

After updates with r_1..r_n and small alpha, P ~ I - (projector onto span(r_1..r_n)): a gradient
row keeps its component orthogonal to the inputs P was built from, so the update changes the head's
output on those inputs little (for P symmetric, as the scalar form keeps it, grad @ P^T = grad @ P;
the released matrix form gives an asymmetric P in general, and the transpose matters).

Fusion (test time): per modality m, logits o_m; weights w = softmax_m(-e_m), i.e.
w_m = exp(max_k e_k - e_m) / sum_j exp(max_k e_k - e_j); fused = sum_m w_m o_m (weighted LOGITS).
  batch  (released calculate_entropy): q = softmax(o_m, dim=0) over the BATCH axis and
         e_m = -sum_{b,c} q log q, one scalar per modality per evaluation batch — the weights depend
         on the evaluation batch (its size and which samples share it);
  sample (the paper's per-prediction uncertainty): e_m = -sum_c p log p with p = softmax(o_m) over
         classes, per sample.
log q comes from log_softmax (the released log(softmax(.)) turns an underflowed 0 into NaN).

Imports: torch only.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = [
    "projector_alpha",
    "owm_update",
    "orthogonal_projector",
    "project_weight_grad",
    "entropy_weights",
    "entropy_fusion",
    "fixed_fusion",
]


def projector_alpha(batch_index: int, batches_per_epoch: int, base: float = 0.1) -> float:
    """alpha = base ** (1 + b / L): 0.1 at an epoch's first batch falling towards 0.01 at its last.

    Source: GSPlugin.before_update (lamda = batch_index / len_dataloader + 1; alpha = 0.1 ** lamda)."""
    return float(base) ** (1.0 + batch_index / max(1, batches_per_epoch))


def owm_update(P: torch.Tensor, r: torch.Tensor, alpha: float, normalize: bool = False,
               denominator: str = "scalar") -> torch.Tensor:
    """One OWM recursion, k = P r, then P / ||P||_F if `normalize`:

      denominator "scalar" (OWM, Zeng et al.): P - k k^T / (alpha + r^T k);
      denominator "matrix" (released GSPlugin): P - (k k^T) ./ (alpha + k r^T), an element-wise
        division by the d x d matrix D_ij = alpha + k_i r_j (`torch.mm(k, r)` with k (d, 1) and
        r (1, d)); not symmetric in general, and not the OWM projector.

    P: (d, d); r: (d,) — the batch mean of the head's input. Returns a new tensor in P's dtype.
    Source: GSPlugin.before_update (r = mean of the head input over the batch, 1 x d; the released
    code divides by the Frobenius norm after every update: `normalize=True`)."""
    r = r.to(P.dtype).reshape(-1, 1)
    k = P @ r
    if denominator == "scalar":
        P = P - (k @ k.T) / (alpha + (r.T @ k))
    elif denominator == "matrix":
        P = P - (k @ k.T) / (alpha + (k @ r.T))
    else:
        raise ValueError(f"denominator must be 'scalar' or 'matrix', got {denominator!r}")
    if normalize:
        P = P / torch.linalg.matrix_norm(P)
    return P


def orthogonal_projector(vectors: Iterable[torch.Tensor], alphas: Sequence[float], d: int,
                         normalize: bool = False, dtype=torch.float64, device=None) -> torch.Tensor:
    """P from the identity folded through owm_update with each vector r_i and its alpha_i, in order.

    Used where a projector is built from a whole pass over a modality's inputs (IGM's
    `projector: orthogonal`: the previous stage's head-layer input means, one per training batch)."""
    P = torch.eye(d, dtype=dtype, device=device)
    for r, alpha in zip(vectors, alphas):
        P = owm_update(P, r, alpha, normalize)
    return P


def project_weight_grad(grad: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """grad @ P^T for a Linear weight gradient grad (out, in) and P (in, in), in grad's dtype.

    Source: GSPlugin.before_update (w.grad = mm(w.grad, t(Pl))). Linear in grad: it commutes with
    the all-reduce of data parallelism. The bias is not projected (released code)."""
    if grad.dim() != 2 or P.shape != (grad.shape[1], grad.shape[1]):
        raise ValueError(f"grad (out, in) and P (in, in) expected, got {tuple(grad.shape)} and {tuple(P.shape)}")
    return grad @ P.to(grad.dtype).T


def entropy_weights(logits: torch.Tensor, axis: str = "sample") -> torch.Tensor:
    """The fusion weights w = softmax over modalities of -entropy.

    logits: (M, B, C). axis "batch" (released): one entropy per modality over the whole batch with
    the softmax taken along the batch axis -> (M, 1, 1); axis "sample" (paper): one entropy per
    modality and sample with the softmax over classes -> (M, B, 1)."""
    logits = logits.float()
    if axis == "batch":
        logq = torch.log_softmax(logits, dim=1)
        entropy = -(logq.exp() * logq).sum(dim=(1, 2), keepdim=True)      # (M, 1, 1)
    elif axis == "sample":
        logp = torch.log_softmax(logits, dim=2)
        entropy = -(logp.exp() * logp).sum(dim=2, keepdim=True)           # (M, B, 1)
    else:
        raise ValueError(f"axis must be 'batch' or 'sample', got {axis!r}")
    return torch.softmax(-entropy, dim=0)


def entropy_fusion(logits: torch.Tensor, axis: str = "sample") -> torch.Tensor:
    """sum_m w_m o_m with w = entropy_weights(logits, axis); logits (M, B, C) -> (B, C)."""
    return (entropy_weights(logits, axis) * logits.float()).sum(0)


def fixed_fusion(logits: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_m a_m o_m with fixed weights a (released: main(av_alpha=0.55), i.e. audio 0.55, visual
    0.45 for two modalities; three: audio 0.35, visual 0.25, text 0.4); logits (M, B, C) -> (B, C)."""
    a = torch.as_tensor(list(weights), dtype=torch.float32, device=logits.device).view(-1, 1, 1)
    return (a * logits.float()).sum(0)
