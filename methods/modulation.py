"""CGGM's maths: balance coefficients from the classifiers' progress, and the direction loss.

Source: the CGGM paper (classifier-guided gradient modulation) and its released code, as
described in docs/methods/cggm.md. With d_i = metric_now_i − metric_prev_i (batch metric of
the modality classifier f_i now and at the previous step) and S = Σ_i d_i + eps::

    c_i  = (S − d_i) / S                                   (balance coefficient, WITHOUT ρ)
    L_gm = (Σ_i |c_i| − Σ_i c_i · cos(vec_i, vec_F)) / M    (direction loss)

The encoder-core gradients of modality i are multiplied by ρ·c_i (a linear edit: it commutes with
DDP's all-reduce). Official variant: vec are the flattened WEIGHTS of F.out and f_i.out and the
coefficients in L_gm are c_i; paper variant: vec are the flattened GRADIENTS of those layers and
the coefficients are B_i = ρ·c_i — pass ``rho * c`` to :func:`direction_loss` for that.

Known defect (kept in official, always reported): c_i is unbounded. Σ_i c_i = M − 1 whenever
S ≠ 0, but when Σ d_i = 0 (batch accuracies are multiples of 1/B, so it happens) S = eps and
c_i ≈ −d_i/eps ≈ ±1e7; mixed-sign d also gives negative multipliers (gradient ascent on an
encoder). :func:`balance_degenerate` reports it, :func:`clip_coefficients` implements the
``coeff_clip: [lo, hi]`` option.

Not in the paper or the released code — the ``progress_estimate: ema | window`` variant: d_i
from two consecutive batch accuracies is binomial noise (std ≈ √(2p(1−p)/B), 0.06 at p = 0.5,
B = 128) against a real per-step gain of order 1e-4, so c_i follows the noise. Two estimators of
the per-step gain whose noise is far smaller — :func:`ema_progress` (an exponential average of
d_i, bias-corrected) and :func:`window_progress` (the mean of the last h batch metrics minus the
mean of the h before, over h) — and :func:`rectified_balance_coefficients`, the same c_i from
max(d_i, 0): every c_i in (0, 1], 1 for all when no modality progresses.

Imports: torch only.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "balance_coefficients",
    "balance_coefficients_tensor",
    "balance_degenerate",
    "balance_degenerate_tensor",
    "clip_coefficients",
    "direction_loss",
    "ema_progress",
    "rectified_balance_coefficients",
    "window_progress",
]

Metrics = Union[Sequence[float], Sequence[torch.Tensor], torch.Tensor]


def _as_floats(values: Metrics) -> List[float]:
    if isinstance(values, torch.Tensor):
        return [float(x) for x in values.reshape(-1).tolist()]
    return [float(x) for x in values]


def _as_vector64(values: Metrics, device=None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return (values if values.dim() == 1 else values.reshape(-1)).to(torch.float64)
    values = list(values)
    if values and isinstance(values[0], torch.Tensor):
        return torch.stack([v.reshape(()) for v in values]).to(torch.float64)
    return torch.tensor(values, dtype=torch.float64, device=device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t as a 1-D tensor: itself when it is one (no view dispatched), else t.reshape(-1)."""
    return t if t.dim() == 1 else t.reshape(-1)


def balance_coefficients(metric_now: Metrics, metric_prev: Metrics,
                         eps: float = 1e-8) -> List[float]:
    """c_i = (S − d_i)/S with d_i = now_i − prev_i and S = Σ_i d_i + eps (no ρ), Python floats.

    Source: CGGM paper eq. for the balance term / released code (eps = 1e-8). Computed in Python
    double precision. SYNCHRONISES with the host when given tensors (it returns floats); the
    hot-path twin is :func:`balance_coefficients_tensor`. Σ c_i = M − 1 when S ≠ 0.
    """
    now, prev = _as_floats(metric_now), _as_floats(metric_prev)
    if len(now) != len(prev):
        raise ValueError(f"{len(now)} current metrics but {len(prev)} previous ones")
    d = [a - b for a, b in zip(now, prev)]
    s = sum(d) + eps
    return [(s - d_i) / s for d_i in d]


def balance_coefficients_tensor(metric_now: Metrics, metric_prev: Metrics,
                                eps: float = 1e-8) -> torch.Tensor:
    """Tensor form of :func:`balance_coefficients`: (M,) float64, no host sync.

    Accepts (M,) tensors or sequences of 0-d tensors / floats. float64 so that the Σd = 0 case
    and the coefficients match the Python-float version (batch metrics k/B are exact there).
    """
    now = _as_vector64(metric_now)
    prev = _as_vector64(metric_prev, device=now.device)
    if now.shape != prev.shape:
        raise ValueError(f"{now.numel()} current metrics but {prev.numel()} previous ones")
    d = now - prev
    s = d.sum() + eps
    return (s - d) / s


def balance_degenerate(metric_now: Metrics, metric_prev: Metrics, eps: float = 1e-8) -> bool:
    """True when |Σ_i d_i| ≤ eps: S is dominated by eps and |c_i| ≈ |d_i|/eps (the defect).

    Covers Σ d = 0 exactly (the known defect) and sums that cancel up to rounding (e.g.
    metrics k/B with B not a power of two). Python floats; syncs when given tensors.
    """
    now, prev = _as_floats(metric_now), _as_floats(metric_prev)
    return abs(sum(a - b for a, b in zip(now, prev))) <= eps


def balance_degenerate_tensor(metric_now: Metrics, metric_prev: Metrics,
                              eps: float = 1e-8) -> torch.Tensor:
    """0-d bool tensor form of :func:`balance_degenerate` (no host sync; log it, don't branch)."""
    now = _as_vector64(metric_now)
    prev = _as_vector64(metric_prev, device=now.device)
    return (now - prev).sum().abs() <= eps


def clip_coefficients(coeffs, lo: float, hi: float):
    """The ``coeff_clip: [lo, hi]`` option: c_i ← min(max(c_i, lo), hi).

    Not in the paper nor the released code (official default: no clipping); a guard against
    the unbounded c_i above. Lists give lists of floats, tensors give tensors (torch.clamp, no
    host sync).
    """
    if lo > hi:
        raise ValueError(f"coeff_clip needs lo <= hi, got [{lo}, {hi}]")
    if isinstance(coeffs, torch.Tensor):
        return coeffs.clamp(min=lo, max=hi)
    return [min(max(float(c), lo), hi) for c in coeffs]


def ema_progress(average: torch.Tensor, change: torch.Tensor, decay: float,
                 count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the exponential average of the per-step metric change d_i (``progress_estimate:
    ema``). Returns (the new average, its bias-corrected value: the progress estimate).

    average ← decay·average + (1 − decay)·change, started at 0; ``count`` is the number of changes
    averaged so far, this one included, and the estimate is average / (1 − decay**count) — for
    count ≪ 1/(1 − decay) about the mean change since the first one, later an average over the
    last ~1/(1 − decay) steps. Equivalently the per-step change of an exponential average of the
    metric (the sum telescopes to (1 − decay)·(metric now − the average of the earlier ones)), so
    for batch metrics of standard deviation σ its noise is about (1 − decay)·σ, against the mean
    gain per step as its signal.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if count < 1:
        raise ValueError(f"count must be >= 1 (this change included), got {count}")
    average = decay * average + (1.0 - decay) * change
    return average, average / (1.0 - decay ** count)


def window_progress(history: torch.Tensor, filled: int) -> torch.Tensor:
    """The per-step gain of each modality over a window of batches (``progress_estimate:
    window``): with h = filled // 2, (mean of the newest h rows of ``history`` − mean of the h rows
    before) / h; zeros while h = 0.

    ``history``: (n, M), the last n batch metrics, oldest first, of which the newest ``filled``
    (≤ n) are real. For a metric rising by g per step plus independent noise of standard deviation
    σ the estimate has mean g and standard deviation σ·√(2/h)/h (σ·√2/h^1.5).
    """
    if not 0 <= filled <= history.shape[0]:
        raise ValueError(f"filled must be in [0, {history.shape[0]}], got {filled}")
    h = filled // 2
    if h == 0:
        return torch.zeros_like(history[0])
    n = history.shape[0]
    recent, before = history[n - h:], history[n - 2 * h:n - h]
    return (recent.mean(0) - before.mean(0)) / h


def rectified_balance_coefficients(progress: torch.Tensor,
                                   eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = (S − d⁺_i)/S with d⁺_i = max(d_i, 0) and S = Σ_i d⁺_i + eps: CGGM's coefficient from
    non-negative progress. Returns (c (M,), whether Σ d⁺ ≤ eps as a 0-d bool tensor; no host sync).

    Each c_i = (Σ_{j≠i} d⁺_j + eps)/S lies in (0, 1] — never negative, never the ±1e7 of the
    released form — and Σ c_i = M − 1 + eps/S; a modality that does not progress gets 1, and all
    get 1 when none does. A falling metric (d_i < 0) counts as no progress rather than as a
    negative one that would flip the signs of the others' coefficients.
    """
    d = progress.clamp_min(0.0)
    total = d.sum()
    s = total + eps
    return (s - d) / s, total <= eps


def direction_loss(coeffs, fused_vec: torch.Tensor,
                   modality_vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_gm = (Σ_i |c_i| − Σ_i c_i·cos(vec_i, vec_F)) / M, a 0-d tensor.

    Source: CGGM paper (direction term) / released code. ``coeffs``: M floats or an (M,) tensor
    (c_i for official, ρ·c_i for paper); ``fused_vec``: vec_F (F.out's weight in official, its
    gradient in paper); ``modality_vecs``: vec_i of each f_i.out, same number of elements as
    vec_F (a sequence, or an (M, n) tensor of them as rows). Vectors are flattened; cos is
    ``torch.nn.functional.cosine_similarity`` (eps 1e-8), one call per modality.
    Differentiable w.r.t. whichever vectors require grad (official: only F.out.weight does).
    Computed in fused_vec's dtype. No host sync.
    """
    m = len(modality_vecs)
    if m == 0:
        raise ValueError("direction_loss needs at least one modality vector")
    fused = _flat(fused_vec)
    c = coeffs if isinstance(coeffs, torch.Tensor) else torch.tensor(
        [float(x) for x in coeffs], dtype=torch.float64)
    c = _flat(c).to(device=fused.device, dtype=fused.dtype)
    if c.numel() != m:
        raise ValueError(f"{c.numel()} coefficients for {m} modality vectors")
    cosines = []
    for i, vec in enumerate(modality_vecs):   # an (M, n) tensor works too: its rows
        vec = _flat(vec)
        if vec.numel() != fused.numel():
            raise ValueError(f"modality vector {i} has {vec.numel()} elements, the fused one "
                             f"{fused.numel()}")
        cosines.append(F.cosine_similarity(vec.to(fused.dtype), fused, dim=0))
    cos = torch.stack(cosines)
    return (c.abs().sum() - (c * cos).sum()) / m
