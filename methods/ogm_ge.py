"""OGM-GE's maths: the per-modality scores, the discrepancy ratios, the modulation coefficients and
the generalisation-enhancement noise.

Source: Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022,
and its released code (GeWu-Lab/OGM-GE_CVPR2022, main.py, train_epoch), as described in
docs/methods/ogm_ge.md. With out_m the logits read off modality m's part of the fusion layer:

    s_m   = sum_i softmax(out_m,i)[y_i]                           (score, sum over the batch)
    rho_m = s_m / s_ref(m)                                        (discrepancy ratio)
    k_m   = 1 - tanh(alpha * rho_m)   if rho_m > 1,   else 1      (paper Eq. 10; the released code
                                                                   writes tanh(alpha * relu(rho)))
    GE:   g <- k_m * g + n,   n ~ N(0, (std(g) + 1e-8)^2) per tensor, std over the tensor's entries

The step applies the edit to all the modulated tensors at once (`modulate_gradients_`): the stds of
every tensor from one flat buffer (two-pass, float64), the scaling and the noise by torch._foreach_*
ops; on CPU this equals `modulate_gradient` per tensor bit for bit.

Two modalities (released): rho_v = s_v / s_a, rho_a = 1 / rho_v, and the released branch `if
rho_v > 1: damp v, else: damp a` damps the FIRST modality at an exact tie (the paper damps neither).
M modalities (not in the release): s_ref(m) = min_j s_j (`weakest`, BalanceBenchmark's OGM_GE rule
for three modalities, with its plain softmax score) or the mean over j != m of s_m / s_j
(`others_mean`, BalanceBenchmark's OGM_GE3 intent); both reduce to the released ratio for two.

Imports: torch only.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "target_score_sum",
    "discrepancy_ratios",
    "modulation_coefficients",
    "released_two_modality_coefficients",
    "ge_noise_std",
    "ge_noise_stds",
    "modulate_gradient",
    "modulate_gradients_",
]

RATIO_REFERENCES = ("weakest", "others_mean")


def target_score_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s = sum_i softmax(logits_i)[y_i], a 0-d float32 tensor (paper Eq. 8-9; main.py `score_a/v`).

    A SUM over the batch, as released: under data parallelism the per-rank sums are all-reduced
    (SUM) into the whole batch's score. No gradient flows through it."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return probs.gather(-1, labels.long().unsqueeze(-1)).sum()


def discrepancy_ratios(scores: torch.Tensor, reference: str = "weakest") -> torch.Tensor:
    """rho (M,) from the scores s (M,), M >= 2.

    weakest:      rho_m = s_m / min_j s_j
    others_mean:  rho_m = mean_{j != m} s_m / s_j
    For M = 2 both give rho_m = s_m / s_other, the released ratio."""
    scores = scores.reshape(-1)
    m = scores.numel()
    if m < 2:
        raise ValueError(f"discrepancy ratios need at least two modalities, got {m}")
    if reference == "weakest":
        return scores / scores.min()
    if reference == "others_mean":
        pairwise = scores.unsqueeze(1) / scores.unsqueeze(0)             # [m, j] = s_m / s_j
        return (pairwise.sum(1) - pairwise.diagonal()) / (m - 1)
    raise ValueError(f"reference='{reference}': choose one of {', '.join(RATIO_REFERENCES)}")


def modulation_coefficients(ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_m = 1 - tanh(alpha * rho_m) where rho_m > 1, else 1 (paper Eq. 10). Tensor in, tensor out,
    no host sync."""
    return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))


def released_two_modality_coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(k (2,), rho (2,)) exactly as main.py's branch for scores (s_first, s_second) = (s_a, s_v):
    rho_second = s_second / s_first, rho_first = 1 / rho_second; if rho_second > 1 the second
    modality gets 1 - tanh(alpha * rho_second) and the first 1, ELSE the first gets 1 - tanh(alpha *
    rho_first) and the second 1 — so at an exact tie (rho = 1) the first modality is damped."""
    s_first, s_second = scores.reshape(-1).unbind()
    rho_second = s_second / s_first
    rho_first = 1 / rho_second
    second_dominant = rho_second > 1
    one = torch.ones_like(rho_second)
    k_first = torch.where(second_dominant, one, 1 - torch.tanh(alpha * rho_first))
    k_second = torch.where(second_dominant, 1 - torch.tanh(alpha * rho_second), one)
    return torch.stack([k_first, k_second]), torch.stack([rho_first, rho_second])


def ge_noise_std(grad: torch.Tensor) -> torch.Tensor:
    """std(g) + 1e-8: the released GE noise scale for one gradient tensor (torch's unbiased std over
    its entries, taken BEFORE the multiplication by k). A one-element tensor has no spread: 1e-8."""
    if grad.numel() < 2:
        return torch.full((), 1e-8, dtype=grad.dtype, device=grad.device)
    return grad.std() + 1e-8


def modulate_gradient(grad: torch.Tensor, coefficient: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """k * g (OGM), or k * g + std_GE(g) * z with z a standard normal draw of g's shape (OGM-GE).

    `noise`: the standard normal draw z (the caller draws it, from a generator shared by every rank),
    or None for plain OGM. Returns the new gradient; g itself is not changed."""
    if noise is None:
        return grad * coefficient
    return grad * coefficient + noise * ge_noise_std(grad)


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[t_1 | ... | t_K], each flattened row-major, as one new 1-D tensor: one operator
    (torch._chunk_cat) where every tensor has a dimension and they share a dtype, else a cat of
    flattened views (promoted to a common dtype)."""
    if all(t.dim() >= 1 for t in tensors) and len({t.dtype for t in tensors}) == 1:
        return torch._chunk_cat(list(tensors), 0, 1).view(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def ge_noise_stds(grads: Sequence[torch.Tensor], lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) tensor: ge_noise_std(g_k) for every tensor of `grads` at once, in the grads' dtype.

    std(g) = sqrt(sum_j (g_j - mean(g))^2 / max(n - 1, 1)) + 1e-8 over each tensor's n entries
    (unbiased, as torch.std; a one-element tensor gives 0 + 1e-8 = 1e-8), computed from one flat
    buffer of all the tensors, two-pass in float64 and rounded once, as torch.std does on CPU (the
    same float32 values there). `lengths`: the (K,) int64 tensor of the tensors' sizes on their
    device (cache it: building it from Python numbers is a host-to-device copy)."""
    grads = list(grads)
    if lengths is None:
        lengths = torch.tensor([g.numel() for g in grads], dtype=torch.int64, device=grads[0].device)
    flat = _flatten(grads).to(torch.float64)
    n = lengths.to(torch.float64)
    # unsafe=True: skip segment_reduce's validation of `lengths` (an .item(), a host sync on a GPU)
    mean = torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True) / n.clamp(min=1)
    flat.sub_(mean.repeat_interleave(lengths, output_size=flat.numel()))
    sq_sum = torch.segment_reduce(flat.mul_(flat), "sum", lengths=lengths, unsafe=True)
    std = (sq_sum / (n - 1).clamp(min=1)).sqrt_()
    return std.to(grads[0].dtype) + 1e-8


def modulate_gradients_(grads: Sequence[Sequence[torch.Tensor]], coefficients: torch.Tensor,
                        noises: Sequence[Sequence[torch.Tensor]] | None = None,
                        lengths: torch.Tensor | None = None) -> None:
    """In place, for every group m (one modality's modulated gradients) and every tensor g in it:

        OGM:     g <- k_m * g
        OGM-GE:  g <- k_m * g + (std(g) + 1e-8) * z,   std taken BEFORE the scaling (ge_noise_stds)

    `coefficients`: (M,) k; `noises`: the standard normal draws z, the same nesting and shapes as
    `grads` (drawn by the caller, from a generator shared by every rank), consumed (scaled in
    place); None for OGM. `lengths`: see ge_noise_stds (the sizes of all the groups' tensors, in
    order). A few operators whatever the number of tensors: one flat buffer for the stds,
    torch._foreach_mul_ per group for k, one _foreach_mul_ and one _foreach_add_ for the noise —
    the same rounding as `modulate_gradient` per tensor (fl(fl(k g) + fl(s z)))."""
    groups = [list(group) for group in grads]
    flat_grads = [g for group in groups for g in group]
    if not flat_grads:
        return
    scaled_noise = None
    if noises is not None:
        flat_noises = [z for group in noises for z in group]
        if len(flat_noises) != len(flat_grads):
            raise ValueError(f"{len(flat_noises)} noise tensors for {len(flat_grads)} gradients")
        stds = ge_noise_stds(flat_grads, lengths)
        torch._foreach_mul_(flat_noises, list(stds.split(1)))
        scaled_noise = flat_noises
    for group, k in zip(groups, coefficients.to(flat_grads[0].dtype).unbind()):
        if group:
            torch._foreach_mul_(group, k)
    if scaled_noise is not None:
        torch._foreach_add_(flat_grads, scaled_noise)
