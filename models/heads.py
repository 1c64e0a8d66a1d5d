"""Heads and fusion modules for GAAL, IGM and CGGM (docs/methods/).

Imports: torch only.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "LinearHead",
    "IGMHead",
    "LateFusionHeads",
    "FusionTransformer",
    "ResidualHead",
    "ModalityClassifier",
]


class LinearHead(nn.Linear):
    """GAAL's shared head H = Linear(in_dim, num_classes).

    It *is* an ``nn.Linear``: ``head.weight`` (C, in_dim) and ``head.bias`` (C,), in that
    parameter order, so the flattened head gradient is ``[weight row-major | bias]``.
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__(in_dim, num_classes)


class IGMHead(nn.Module):
    """IGM's per-modality head: Linear(in, h0) -> ReLU -> Linear(h0, h1) -> Linear(h1, C).

    Exactly three Linear layers, no activation between the 2nd and the 3rd (as the official
    code). ``linears`` holds the three ``nn.Linear`` in order (the layers the flat projection
    T is applied to). ``forward(x, return_inputs=True)`` also returns the input of each of the
    three layers (``[x, relu(l0(x)), l1(relu(l0(x)))]``), which is what the flat projection's
    moment matrices Y accumulate.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (256, 64)):
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"IGMHead needs two hidden sizes, got {list(hidden)}")
        h0, h1 = int(hidden[0]), int(hidden[1])
        self.linears = nn.ModuleList([nn.Linear(in_dim, h0), nn.Linear(h0, h1),
                                      nn.Linear(h1, num_classes)])
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, return_inputs: bool = False):
        a0 = x
        a1 = self.act(self.linears[0](a0))
        a2 = self.linears[1](a1)
        out = self.linears[2](a2)
        if return_inputs:
            return out, [a0, a1, a2]
        return out


class LateFusionHeads(nn.Module):
    """One Linear head per modality (``heads[name]``).

    ``forward(features)`` maps the modalities present in ``features`` (a dict name ->
    ``(B, in_dims[name])``) to a dict name -> logits; ``fuse(logits)`` is the sum of the logits
    (late fusion)."""

    def __init__(self, in_dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.names = list(in_dims)
        self.heads = nn.ModuleDict({k: nn.Linear(int(d), num_classes) for k, d in in_dims.items()})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = [k for k in features if k not in self.heads]
        if unknown:
            raise KeyError(f"LateFusionHeads: no head for modality/ies {unknown}; "
                           f"heads: {self.names}")
        return {k: self.heads[k](v) for k, v in features.items()}

    @staticmethod
    def fuse(logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not logits:
            raise ValueError("LateFusionHeads.fuse: no logits to fuse")
        vals = list(logits.values())
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return out


def _encoder_stack(d_model: int, n_layers: int, n_heads: int, dropout: float,
                   dim_feedforward: int | None) -> nn.TransformerEncoder:
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward or 4 * d_model, dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model),
                                 enable_nested_tensor=False)


def _as_seq(h: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, 1, d); (B, T, d) unchanged."""
    return h.unsqueeze(1) if h.dim() == 2 else h


class FusionTransformer(nn.Module):
    """CGGM's fusion module Omega.

    ``forward(seqs)`` takes a dict modality -> encoded sequence ``(B, T_i, d_model)`` (a pooled
    ``(B, d_model)`` counts as a length-1 sequence), adds a learned modality embedding
    (``modality_embed[i]`` for the i-th name of ``modalities``), concatenates along time in the
    order of ``modalities``, runs a pre-LN transformer encoder and returns the mean over all
    positions, ``(B, d_model)``. Every name in ``modalities`` must be present.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, modalities: Sequence[str],
                 dropout: float = 0.1, dim_feedforward: int | None = None):
        super().__init__()
        self.modalities = list(modalities)
        if not self.modalities:
            raise ValueError("FusionTransformer needs at least one modality")
        self.modality_embed = nn.Parameter(torch.zeros(len(self.modalities), d_model))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.encoder = _encoder_stack(d_model, n_layers, n_heads, dropout, dim_feedforward)
        self.out_dim: int = int(d_model)

    def forward(self, seqs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [m for m in self.modalities if m not in seqs]
        if missing:
            raise KeyError(f"FusionTransformer: missing modality/ies {missing}")
        parts = [_as_seq(seqs[m]) + self.modality_embed[i].to(seqs[m].dtype)
                 for i, m in enumerate(self.modalities)]
        return self.encoder(torch.cat(parts, dim=1)).mean(dim=1)


class ResidualHead(nn.Module):
    """CGGM's prediction head F: ``out(x + MLP(x))`` with MLP = Linear(d_in, hidden) -> ReLU ->
    Dropout -> Linear(hidden, d_in); the last layer is the Linear ``out`` (d_in -> out_dim)."""

    def __init__(self, d_in: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(hidden, d_in))
        self.out = nn.Linear(d_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.mlp(x))


class ModalityClassifier(nn.Module):
    """CGGM's per-modality classifier f_i: ``n_layers`` self-attention (transformer encoder)
    layers -> mean over time -> Linear ``out`` (d_model -> out_dim).

    It must be fed with DETACHED encoder outputs (the caller detaches: ``f_i(h_i.detach())``);
    ``forward`` additionally detaches its input itself, so it can never send gradient to an
    encoder. Input ``(B, T, d_model)`` or pooled ``(B, d_model)`` (length-1 sequence).
    """

    def __init__(self, d_model: int, out_dim: int, n_layers: int = 1, n_heads: int = 4,
                 dropout: float = 0.1, dim_feedforward: int | None = None):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"ModalityClassifier needs n_layers >= 1, got {n_layers}")
        self.encoder = _encoder_stack(d_model, n_layers, n_heads, dropout, dim_feedforward)
        self.out = nn.Linear(d_model, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _as_seq(h.detach())
        return self.out(self.encoder(h).mean(dim=1))
