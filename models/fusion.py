"""Late-fusion multimodal classifier: one encoder and one head per modality, logits summed.

The baselines (joint and unimodal training) use it; it is also the shape every method starts from.
"""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import ModelConfigError, build_encoder
from models.heads import FusionTransformer, IGMHead, ModalityClassifier, ResidualHead


def build_encoders(meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None,
                   kind_defaults: dict | None = None) -> tuple[list[str], nn.ModuleDict]:
    """The modalities to use (default: all of the dataset's, in its order) and one encoder per
    modality (models.encoders.build_encoder). Unknown names in `modalities` or `encoder_cfgs` raise
    ModelConfigError (a ValueError; models.encoders.resolve_encoder_configs fits `encoder_cfgs` to
    the dataset beforehand). `kind_defaults`: per modality kind, config defaults the caller imposes
    (e.g. CGGM's common d_model for sequences) under the user's `encoder_cfgs`."""
    modalities = list(modalities or meta["modalities"])
    for name in list(modalities) + list(encoder_cfgs):
        if name not in meta["modalities"]:
            raise ModelConfigError(f"modality '{name}' is not in the dataset (it has "
                                   f"{', '.join(meta['modalities'])})")
    encoders = nn.ModuleDict()
    for m in modalities:
        spec = meta["modalities"][m]
        encoders[m] = build_encoder(m, spec, {**(kind_defaults or {}).get(spec["kind"], {}),
                                              **encoder_cfgs.get(m, {})})
    return modalities, encoders


class PerModalityModel(nn.Module):
    """The forward of every model here whose logits for modality m come from modality m's features
    alone: forward -> {m: (f_m, modality_head(m)(f_m))}, f_m = encoders[m](batch[m]), in `modalities`
    order. Subclasses set `modalities`, `encoders` and the heads (this class creates no parameters, so
    they are created, and initialised from the RNG, in the subclass's order); `modality_head` gives
    heads[m] unless a subclass shares one head."""

    def modality_head(self, m: str) -> nn.Module:
        return self.heads[m]

    def forward(self, batch: dict) -> dict:
        out = {}
        for m in self.modalities:
            features = self.encoders[m](batch[m])
            out[m] = (features, self.modality_head(m)(features))
        return out


class LateFusionModel(PerModalityModel):
    """encoders[m]: E_m, heads[m]: Linear(E_m.out_dim, C). forward -> {m: (features, logits)}.

    The fused prediction is the sum of the per-modality logits (`fuse`), so each head alone is also
    that modality's unimodal classifier — which is how per-modality accuracy is read off a joint model.
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities)
        self.heads = nn.ModuleDict({m: nn.Linear(e.out_dim, meta["num_classes"]) for m, e in self.encoders.items()})

    @staticmethod
    def fuse(outputs: dict) -> torch.Tensor:
        return torch.stack([logits for _, logits in outputs.values()]).sum(0)


class SharedHeadModel(PerModalityModel):
    """encoders[m]: E_m, ONE head H shared by every modality (GAAL). forward -> {m: (features, H(f_m))}.

    Every encoder must produce features of the same width. The fused prediction is the mean of the
    per-modality logits (`fuse`): GAAL's 0.5·(H(f_img) + H(f_tab)) for two modalities.
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities)
        widths = {m: e.out_dim for m, e in self.encoders.items()}
        if len(set(widths.values())) != 1:
            raise ModelConfigError(f"encoders: a shared head needs one feature width, got {widths} "
                                   "(set out_dim / base_width so that they agree)")
        self.head = nn.Linear(next(iter(widths.values())), meta["num_classes"])

    def modality_head(self, m: str) -> nn.Module:
        return self.head

    @staticmethod
    def fuse(outputs: dict) -> torch.Tensor:
        return torch.stack([logits for _, logits in outputs.values()]).mean(0)


class IGMModel(PerModalityModel):
    """encoders[m]: E_m, heads[m]: IGMHead(E_m.out_dim, C) — nothing shared (IGM's released code).
    forward -> {m: (features, logits)}.

    Fused prediction (returned as log-probabilities, so argmax, softmax and mAP read it directly):
      `fuse`          log( mean_m softmax(o_m) )                — equal weights (official)
      `fuse_entropy`  log( sum_m w_m softmax(o_m) ),  w = softmax_m(−H(softmax(o_m))) per sample —
                      the lower a modality's predictive entropy, the larger its weight (MLA-style
                      test-time fusion, an option of the paper variant).
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None,
                 hidden: tuple[int, int] = (256, 64)):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities)
        self.heads = nn.ModuleDict(
            {m: IGMHead(e.out_dim, meta["num_classes"], hidden) for m, e in self.encoders.items()})

    @staticmethod
    def fuse(outputs: dict) -> torch.Tensor:
        probs = torch.stack([torch.softmax(logits.float(), -1) for _, logits in outputs.values()])
        return probs.mean(0).clamp_min(1e-12).log()

    @staticmethod
    def fuse_entropy(outputs: dict) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(logits.float(), -1) for _, logits in outputs.values()])
        entropy = -(logp.exp() * logp).sum(-1)                       # (M, B)
        weights = torch.softmax(-entropy, dim=0).unsqueeze(-1)       # (M, B, 1)
        return (weights * logp.exp()).sum(0).clamp_min(1e-12).log()


class CGGMModel(nn.Module):
    """CGGM's model: per-modality encoders (input projection + core), a fusion transformer Ω over
    every encoded modality, a residual prediction head F (last layer Linear ``head.out``), and per-
    modality classifiers f_i (self-attention + Linear ``out``) on DETACHED encoder outputs.

    ``forward(batch) -> {m: (h_m, f_m(h_m.detach()))}``: h_m is the encoded sequence (B, T_m, d)
    (a pooled encoder's (B, d) counts as a length-1 sequence) and the classifier logits are that
    modality's prediction. ``fuse(outputs)`` = F(Ω({h_m})): the model's prediction. Every encoder
    must give features of width ``d_model``. ``forward`` and ``fuse`` together are what
    ``train.common.evaluate`` expects (per-modality metrics = the classifiers').
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None,
                 d_model: int = 64, fusion: dict | None = None, head_hidden: int = 128,
                 head_dropout: float = 0.0, classifier: dict | None = None):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities,
                                                        {"sequence": {"d_model": d_model}})
        for m, encoder in self.encoders.items():
            if encoder.out_dim != d_model:
                raise ModelConfigError(f"encoders.{m}: gives {encoder.out_dim}-d features; the fusion "
                                       f"transformer needs d_model={d_model}")
        out_dim = meta["num_classes"]
        modalities = self.modalities
        self.fusion = FusionTransformer(d_model, modalities=modalities, **{"n_layers": 2, "n_heads": 4, **(fusion or {})})
        self.head = ResidualHead(d_model, head_hidden, out_dim, head_dropout)
        clf = {"n_layers": 1, "n_heads": 4, **(classifier or {})}
        self.classifiers = nn.ModuleDict({m: ModalityClassifier(d_model, out_dim, **clf) for m in modalities})

    def encode(self, m: str, x: torch.Tensor) -> torch.Tensor:
        encoder = self.encoders[m]
        if hasattr(encoder, "core"):          # sequence encoder: keep the time axis for Ω
            return encoder(x, return_sequence=True)
        return encoder(x)

    def forward(self, batch: dict) -> dict:
        out = {}
        for m in self.modalities:
            h = self.encode(m, batch[m])
            out[m] = (h, self.classifiers[m](h.detach()))
        return out

    def fuse(self, outputs: dict) -> torch.Tensor:
        return self.head(self.fusion({m: h for m, (h, _) in outputs.items()}))

    def model_parameters(self):
        """Everything but the classifiers (they have their own optimiser)."""
        return [p for name, p in self.named_parameters() if not name.startswith("classifiers.")]


class ConcatFusionModel(nn.Module):
    """encoders[m]: E_m; ONE Linear `fc` over the concatenated features [f_1 | ... | f_M] (OGM-GE's
    released ConcatFusion, models/fusion_modules.py). forward -> {m: (f_m, out_m)} with

        out_m = f_m W[:, cols_m]^T + b / M        (main.py's read-off for two modalities: b/2)

    so the per-modality logits sum to the fused prediction fc([f_1 | ... | f_M]) exactly (`fuse`,
    the sum of the logits, as LateFusionModel's). Initialised as the released `weight_init`:
    xavier-normal weight, zero bias.
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities)
        self.widths = [self.encoders[m].out_dim for m in self.modalities]
        self.fc = nn.Linear(sum(self.widths), meta["num_classes"])
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, batch: dict) -> dict:
        out, start = {}, 0
        bias = self.fc.bias / len(self.modalities)
        for m, width in zip(self.modalities, self.widths):
            features = self.encoders[m](batch[m])
            weight = self.fc.weight[:, start:start + width]
            out[m] = (features, features @ weight.t().to(features.dtype) + bias.to(features.dtype))
            start += width
        return out

    @staticmethod
    def fuse(outputs: dict) -> torch.Tensor:
        return torch.stack([logits for _, logits in outputs.values()]).sum(0)


class ConcatAndUnimodalHeadsModel(PerModalityModel):
    """encoders[m]: E_m; head: Linear(sum_m D_m, C) on the concatenated features — the fused
    prediction; heads[m]: Linear(D_m, C) — modality m's own classifier (its unimodal loss and its
    per-modality metrics). forward -> {m: (features, heads[m](features))}; fuse(outputs) =
    head(cat(f_m in `modalities` order)).

    GeWu-Lab's AVClassifier (MMPareto_ICML2024 code/models/models.py: `head` = Linear(1024, C) on
    cat(a, v), `head_audio`, `head_video` = Linear(512, C)) for any number of modalities. Not
    LateFusionModel: the fused head is trained by the multimodal loss alone, the unimodal heads by
    their own losses alone, and it has one fused bias instead of a sum of per-modality biases. Not
    ConcatFusionModel (OGM-GE's): there the per-modality logits are read off the fused layer itself.
    """

    def __init__(self, meta: dict, encoder_cfgs: dict, modalities: list[str] | None = None):
        super().__init__()
        self.modalities, self.encoders = build_encoders(meta, encoder_cfgs, modalities)
        classes = meta["num_classes"]
        self.head = nn.Linear(sum(e.out_dim for e in self.encoders.values()), classes)
        self.heads = nn.ModuleDict({m: nn.Linear(e.out_dim, classes) for m, e in self.encoders.items()})

    def fuse(self, outputs: dict) -> torch.Tensor:
        return self.head(torch.cat([outputs[m][0] for m in self.modalities], dim=1))
