"""CGGM's BraTS 2021 model: per-modality DeepLabv3+ encoders, a fused DeepLabv3+ decoder and
per-modality light decoders (the CGGM "classifiers" f_i of a segmentation task).

Source: CGGM's released BraTS code (``models/segmodel.py``: ``DeepLabMultiInput``,
``SegClassifier``; ``src/segtrain.py``), as docs/methods/cggm.md describes it.

What follows the released code (with the defaults of :data:`SEG_DEFAULTS`):

* one encoder per MRI modality (flair, t1ce, t1, t2 -- the order of ``meta["modalities"]``), each a
  1-channel ResNet-101 (Bottleneck, ``[3, 4, 23, 3]``, stem 64) with output stride 16: strides
  ``[1, 2, 2, 1]``, layer4 dilated 2 with the multi-grid unit ``[1, 2, 4]`` (dilations 2, 4, 8;
  the first block of a dilated stage already uses the stage's dilation, as the released code);
  output stride 8 is the released alternative (layer3 dilated 2, layer4 4 x multi-grid);
* the low-level map is layer1's output (stride 4, ``4 * base_width`` channels); the high-level map
  is the ASPP output (stride 16): a 1x1 branch, 3x3 branches dilated ``aspp_rates`` (the released
  os-16 rates are ``[2, 4, 6]``, not DeepLab's ``[6, 12, 18]``), an image-pooling branch, each
  conv -> BN -> ReLU with ``aspp_channels`` (256) channels, concatenated, 1x1 projection -> BN ->
  ReLU -> Dropout(0.5);
* fusion by channel concatenation of the modalities' high-level maps AND of their low-level maps;
  the DeepLabv3+ decoder: 1x1 projection of the low-level map to 48 channels -> BN -> ReLU; the
  high-level map bilinearly upsampled (``align_corners=True``) to the low-level size; concat;
  3x3 conv -> BN -> ReLU -> Dropout(0.5) -> 3x3 conv -> BN -> ReLU -> Dropout(0.1) -> 1x1 conv
  ``out`` (with bias; the released ``decoder.last_conv.7``) -> bilinear upsampling to the input;
* the light decoders f_i are the same decoder with one modality's (low, high) maps as input; their
  ``out`` is ``Conv2d(decoder_channels, num_classes, 1)`` exactly like the fused ``out``, so the
  flattened weights have the same number of elements and cos(vec_i, vec_F) is defined (the
  released code reads ``last_conv.7.weight`` of both);
* the features handed to f_i are DETACHED (the released model returns ``.clone().detach()``
  copies); here each light decoder also detaches its inputs itself, like
  :class:`models.heads.ModalityClassifier`;
* initialisation: backbone convs normal(0, sqrt(2 / (k*k*out))) (= kaiming fan_out, the
  torchvision ResNet init used by :class:`models.encoders.ResNet`), ASPP / decoder convs
  ``kaiming_normal_`` (fan_in), BatchNorm weight 1 bias 0.

Our reading / our choices (not in the released code):

* the backbone is :class:`models.encoders.ResNet` (torchvision layout) with strides turned into
  dilations after construction, so a torchvision checkpoint's shapes still fit it (the released
  backbone is random-initialised; so is ours -- nothing loads weights here); every size is a
  config key (``base_width``, ``block``, ``layers``, ...) so that tests run a tiny net;
* layer4 has ``layers[3]`` blocks and ``multi_grid`` must have that many entries (the released
  multi-grid unit ignores ``layers[3]``; with the defaults both are 3);
* ``fusion: sum`` (sum instead of concatenation, high- and low-level maps alike) is an option;
* the light decoders upsample to the size given to :meth:`BratsCGGMModel.classify` (default: the
  meta shape's H x W; the released code hard-codes 160 x 160);
* "encoder core" for CGGM's gradient scaling: ``SegEncoder.core`` (layer1..layer4 and ASPP); the
  stem ``SegEncoder.proj`` (conv1 + bn1) is the input projection. NOTE: in the released BraTS training
  loop the scaling is a no-op -- it multiplies parameters whose names contain ``vision_encoder`` /
  ``text_encoder``, and ``DeepLabMultiInput`` has none; only L_gm (on ``out``'s weight) acts.

Caveat kept from the released design: the ASPP image-pooling branch applies BatchNorm to a 1x1
map, so a training-mode forward needs a batch of at least 2.

Imports: torch and models.encoders only.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoders import BasicBlock, Bottleneck, ResNet

__all__ = [
    "SEG_DEFAULTS",
    "ASPP",
    "SegEncoder",
    "SegDecoder",
    "FusedSegHead",
    "SegClassifier",
    "BratsCGGMModel",
    "check_seg_config",
]

#: Config keys of :class:`BratsCGGMModel` and their defaults (the released BraTS model).
SEG_DEFAULTS: dict = {
    "block": "bottleneck",          # ResNet block: "bottleneck" (released) | "basic"
    "layers": [3, 4, 23, 3],        # blocks per stage (ResNet-101)
    "base_width": 64,               # stem width; stages base_width * (1, 2, 4, 8) (* 4 bottleneck)
    "output_stride": 16,            # 16 (released segtrain) | 8
    "multi_grid": [1, 2, 4],        # layer4 dilation multipliers, one per layer4 block
    "aspp_rates": [2, 4, 6],        # dilations of the ASPP 3x3 branches (released os-16 rates)
    "aspp_channels": 256,           # channels of every ASPP branch and of the high-level map
    "aspp_dropout": 0.5,
    "low_channels": 48,             # 1x1 projection of the low-level map in a decoder
    "decoder_channels": 256,        # width of the decoder 3x3 convs = in-channels of `out`
    "decoder_dropout": [0.5, 0.1],  # after the first and the second decoder 3x3 conv
    "fusion": "concat",             # "concat" (released) | "sum" of the modalities' maps
}

_ALIGN = True  # bilinear upsampling with align_corners=True everywhere, as the released code


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=_ALIGN)


def _init_kaiming_fan_in(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ------------------------------------------------------------------------------------------------
# Encoder: dilated ResNet trunk + ASPP
# ------------------------------------------------------------------------------------------------
def _dilate_stage(stage: nn.Sequential, dilations: Sequence[int]) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage whose 3x3 convs have the given
    dilations (one per block). Parameter shapes are unchanged."""
    for i, (blk, d) in enumerate(zip(stage, dilations)):
        convs3 = [blk.conv2] if isinstance(blk, Bottleneck) else [blk.conv1, blk.conv2]
        if i == 0:
            convs3[0].stride = (1, 1)
            if blk.downsample is not None:
                blk.downsample[0].stride = (1, 1)
            blk.stride = 1
        for conv in convs3:
            conv.dilation = (int(d), int(d))
            conv.padding = (int(d), int(d))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``(B, in_ch, h, w)`` -> ``(B, channels, h, w)``.

    Branches: 1x1 conv; one 3x3 conv per rate in ``rates`` (dilation = padding = rate); image
    pooling (global average -> 1x1 conv -> BN -> ReLU -> bilinear upsampling). Each branch is
    conv -> BN -> ReLU with ``channels`` outputs; concatenated, then 1x1 ``project`` -> BN -> ReLU
    -> Dropout. Source: released ``ASPP`` (its ``conv1``/``bn1`` are our ``project``).
    """

    def __init__(self, in_ch: int, channels: int = 256, rates: Sequence[int] = (2, 4, 6),
                 dropout: float = 0.5):
        super().__init__()
        self.rates = [int(r) for r in rates]
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, channels, 1)]
            + [_conv_bn_relu(in_ch, channels, 3, r) for r in self.rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_ch, channels, 1))
        n = len(self.branches) + 1
        self.project = nn.Sequential(_conv_bn_relu(n * channels, channels, 1), nn.Dropout(dropout))
        self.out_channels: int = int(channels)
        _init_kaiming_fan_in(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [b(x) for b in self.branches]
        parts.append(_upsample(self.image_pool(x), x.shape[-2:]))
        return self.project(torch.cat(parts, dim=1))


class SegEncoder(nn.Module):
    """DeepLabv3+ encoder of one MRI modality.

    Input ``(B, in_channels, H, W)`` (or ``(B, H, W)`` for one channel), any dtype (converted to
    float; the shard stores float32 slices). Output ``(low, high)``:

    * ``low``  ``(B, low_dim, ceil(H/4), ceil(W/4))`` -- layer1's output (stride 4),
      ``low_dim = base_width * expansion``;
    * ``high`` ``(B, aspp_channels, H/os, W/os)`` -- ASPP of layer4 (output stride ``os`` = 8 or
      16; sizes rounded up at each stride-2 step).

    ``backbone`` is a :class:`models.encoders.ResNet` (torchvision layout) whose late stages use
    dilation instead of stride (see the module docstring); ``aspp`` an :class:`ASPP`.
    """

    def __init__(self, in_channels: int = 1, block: str = "bottleneck",
                 layers: Sequence[int] = (3, 4, 23, 3), base_width: int = 64,
                 output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4),
                 aspp_rates: Sequence[int] = (2, 4, 6), aspp_channels: int = 256,
                 aspp_dropout: float = 0.5):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"SegEncoder: output_stride must be 8 or 16, got {output_stride}")
        if len(multi_grid) != int(layers[3]):
            raise ValueError(f"SegEncoder: multi_grid {list(multi_grid)} needs one entry per "
                             f"layer4 block (layers[3] = {layers[3]})")
        self.backbone = ResNet(block, layers, in_channels=in_channels, base_width=base_width)
        if output_stride == 16:
            _dilate_stage(self.backbone.layer4, [2 * g for g in multi_grid])
        else:
            _dilate_stage(self.backbone.layer3, [2] * int(layers[2]))
            _dilate_stage(self.backbone.layer4, [4 * g for g in multi_grid])
        expansion = Bottleneck.expansion if block == "bottleneck" else BasicBlock.expansion
        self.in_channels = int(in_channels)
        self.output_stride = int(output_stride)
        self.low_dim: int = int(base_width) * expansion
        self.aspp = ASPP(self.backbone.out_dim, aspp_channels, aspp_rates, aspp_dropout)
        self.high_dim: int = int(aspp_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_floating_point(x):
            x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(x)
        high = b.layer4(b.layer3(b.layer2(low)))
        return low, self.aspp(high)

    # Views (not registered submodules: the state dict keeps one key per parameter), named like
    # SequenceEncoder's ``proj`` / ``core`` so that a CGGM trainer finds the core the same way.
    @property
    def proj(self) -> nn.ModuleList:
        """The input projection (stem conv1 + bn1): NOT scaled by CGGM's rho * c_i."""
        return nn.ModuleList([self.backbone.conv1, self.backbone.bn1])

    @property
    def core(self) -> nn.ModuleList:
        """The encoder core (layer1..layer4 + ASPP): the parameters CGGM scales by rho * c_i."""
        b = self.backbone
        return nn.ModuleList([b.layer1, b.layer2, b.layer3, b.layer4, self.aspp])


# ------------------------------------------------------------------------------------------------
# Decoders
# ------------------------------------------------------------------------------------------------
class SegDecoder(nn.Module):
    """DeepLabv3+ decoder (released ``Decoder``): ``forward(low, high, size)`` -> logits
    ``(B, num_classes, *size)``.

    ``low`` ``(B, low_in, h4, w4)`` -> ``low_proj`` (1x1 conv -> BN -> ReLU, ``low_channels``);
    ``high`` ``(B, high_in, h', w')`` bilinearly upsampled to ``(h4, w4)``; concat ->
    ``body`` (3x3 conv -> BN -> ReLU -> Dropout(p0) -> 3x3 conv -> BN -> ReLU -> Dropout(p1)) ->
    ``out`` (1x1 conv ``channels -> num_classes`` with bias) -> bilinear upsampling to ``size``
    (``align_corners=True``).
    """

    def __init__(self, low_in: int, high_in: int, num_classes: int, low_channels: int = 48,
                 channels: int = 256, dropout: Sequence[float] = (0.5, 0.1)):
        super().__init__()
        if len(dropout) != 2:
            raise ValueError(f"SegDecoder: dropout needs two values, got {list(dropout)}")
        self.low_proj = _conv_bn_relu(low_in, low_channels, 1)
        self.body = nn.Sequential(
            _conv_bn_relu(high_in + low_channels, channels, 3), nn.Dropout(float(dropout[0])),
            _conv_bn_relu(channels, channels, 3), nn.Dropout(float(dropout[1])))
        self.out = nn.Conv2d(channels, num_classes, kernel_size=1)
        _init_kaiming_fan_in(self)

    def forward(self, low: torch.Tensor, high: torch.Tensor, size) -> torch.Tensor:
        low = self.low_proj(low)
        x = torch.cat([_upsample(high, low.shape[-2:]), low], dim=1)
        return _upsample(self.out(self.body(x)), size)


class FusedSegHead(SegDecoder):
    """CGGM's fusion Omega + prediction head F for segmentation.

    ``forward(h, size)``: ``h`` maps every name of ``modalities`` to its encoder output
    ``(low, high)``; the high-level maps are concatenated along channels in ``modalities`` order
    (``fusion="concat"``, released) or summed (``"sum"``), and so are the low-level maps; then the
    :class:`SegDecoder` -> ``(B, num_classes, *size)``. The last layer is the 1x1 conv ``out``.
    """

    def __init__(self, modalities: Sequence[str], low_dim: int, high_dim: int, num_classes: int,
                 fusion: str = "concat", low_channels: int = 48, channels: int = 256,
                 dropout: Sequence[float] = (0.5, 0.1)):
        if fusion not in ("concat", "sum"):
            raise ValueError(f"FusedSegHead: fusion must be 'concat' or 'sum', got {fusion!r}")
        modalities = list(modalities)
        if not modalities:
            raise ValueError("FusedSegHead needs at least one modality")
        k = len(modalities) if fusion == "concat" else 1
        super().__init__(k * low_dim, k * high_dim, num_classes, low_channels, channels, dropout)
        self.modalities = modalities
        self.fusion = fusion

    def forward(self, h: Mapping[str, tuple[torch.Tensor, torch.Tensor]], size) -> torch.Tensor:
        missing = [m for m in self.modalities if m not in h]
        if missing:
            raise KeyError(f"FusedSegHead: missing modality/ies {missing}")
        lows = [h[m][0] for m in self.modalities]
        highs = [h[m][1] for m in self.modalities]
        if self.fusion == "concat":
            low, high = torch.cat(lows, dim=1), torch.cat(highs, dim=1)
        else:
            low, high = torch.stack(lows).sum(0), torch.stack(highs).sum(0)
        return super().forward(low, high, size)


class SegClassifier(SegDecoder):
    """CGGM's per-modality light decoder f_i (released ``SegClassifier.decoder<i>``): a
    :class:`SegDecoder` on one modality's ``(low, high)``. ``forward`` DETACHES both inputs, so it
    can never send gradient to an encoder. Last layer: 1x1 conv ``out``."""

    def forward(self, low: torch.Tensor, high: torch.Tensor, size) -> torch.Tensor:
        return super().forward(low.detach(), high.detach(), size)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_ints(v, n: int | None = None) -> bool:
    """``v`` is a non-empty list / tuple of positive ints (of length ``n``, when given)."""
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(x) and x > 0 for x in v)
            and (n is None or len(v) == n))


def _check_seg_value(c: Mapping, key: str, ok: bool, what: str) -> None:
    """ValueError naming config key ``key`` of BratsCGGMModel unless ``ok``."""
    if not ok:
        raise ValueError(f"BratsCGGMModel: config key {key!r} = {c[key]!r} is invalid; "
                         f"expected {what}")


def check_seg_config(cfg: Mapping | None) -> dict:
    """Merge ``cfg`` over :data:`SEG_DEFAULTS` and validate it. Unknown keys and invalid values
    raise ``ValueError`` naming the key. Returns the resolved dict."""
    cfg = dict(cfg or {})
    unknown = sorted(k for k in cfg if k not in SEG_DEFAULTS)
    if unknown:
        raise ValueError(f"BratsCGGMModel: unknown config key(s) {unknown}; "
                         f"allowed: {sorted(SEG_DEFAULTS)}")
    c = {**SEG_DEFAULTS, **cfg}
    _check_seg_value(c, "block", c["block"] in ("basic", "bottleneck"), "'basic' or 'bottleneck'")
    _check_seg_value(c, "layers", _positive_ints(c["layers"], 4), "4 positive ints")
    for key in ("base_width", "aspp_channels", "low_channels", "decoder_channels"):
        _check_seg_value(c, key, _is_int(c[key]) and c[key] > 0, "a positive int")
    _check_seg_value(c, "output_stride", _is_int(c["output_stride"]) and c["output_stride"] in (8, 16),
                     "8 or 16")
    _check_seg_value(c, "multi_grid", _positive_ints(c["multi_grid"], int(c["layers"][3])),
                     f"{c['layers'][3]} positive ints (one per layer4 block, layers[3])")
    _check_seg_value(c, "aspp_rates", _positive_ints(c["aspp_rates"]), "a non-empty list of positive ints")
    _check_seg_value(c, "aspp_dropout", _is_num(c["aspp_dropout"]) and 0 <= c["aspp_dropout"] < 1,
                     "a number in [0, 1)")
    _check_seg_value(c, "decoder_dropout", isinstance(c["decoder_dropout"], (list, tuple))
                     and len(c["decoder_dropout"]) == 2
                     and all(_is_num(p) and 0 <= p < 1 for p in c["decoder_dropout"]),
                     "two numbers in [0, 1)")
    _check_seg_value(c, "fusion", c["fusion"] in ("concat", "sum"), "'concat' or 'sum'")
    return c


class BratsCGGMModel(nn.Module):
    """CGGM's BraTS model (released ``DeepLabMultiInput`` + ``SegClassifier``), sized by config.

    ``meta``: the shard ``meta.json`` dict; every modality must be kind ``image`` with shape
    ``[C, H, W]`` (BraTS: ``[1, 160, 160]`` float32) and one common ``H, W``; ``num_classes`` (4
    for BraTS) is the number of output channels; ``task``, when present, must be
    ``"segmentation"``. ``cfg``: keys of :data:`SEG_DEFAULTS` (unknown key / bad value ->
    ``ValueError`` naming it).

    * ``encoders[m]``: :class:`SegEncoder` per modality (``meta["modalities"]`` order);
    * ``head``: :class:`FusedSegHead` (Omega + F), last layer ``head.out``;
    * ``classifiers[m]``: :class:`SegClassifier` f_m, last layer ``classifiers[m].out`` with the
      same weight shape as ``head.out`` (``(num_classes, decoder_channels, 1, 1)``).

    ``forward(batch)`` -> ``(fused_logits (B, num_classes, H, W), {m: (low_m, high_m)})`` where H, W
    are the input's size. ``classify(h, size=None)`` -> ``{m: logits_m}`` for the modalities in
    ``h``, computed on DETACHED features, upsampled to ``size`` (default: the meta ``H, W``).
    """

    def __init__(self, meta: Mapping, cfg: Mapping | None = None):
        super().__init__()
        c = check_seg_config(cfg)
        if meta.get("task", "segmentation") != "segmentation":
            raise ValueError(f"BratsCGGMModel: meta key 'task' = {meta['task']!r}; expected "
                             "'segmentation'")
        specs = meta.get("modalities")
        if not isinstance(specs, Mapping) or not specs:
            raise ValueError("BratsCGGMModel: meta key 'modalities' must be a non-empty mapping")
        num_classes = meta.get("num_classes")
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"BratsCGGMModel: meta key 'num_classes' = {num_classes!r}; expected "
                             "an int >= 2")
        sizes = {}
        for m, spec in specs.items():
            kind, shape = spec.get("kind"), list(spec.get("shape", []))
            if kind != "image":
                raise ValueError(f"BratsCGGMModel: modality {m!r}: key 'kind' = {kind!r}; "
                                 "expected 'image'")
            if len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
                raise ValueError(f"BratsCGGMModel: modality {m!r}: key 'shape' = {shape}; "
                                 "expected [C, H, W]")
            sizes[m] = tuple(shape[1:])
        if len(set(sizes.values())) != 1:
            raise ValueError(f"BratsCGGMModel: modalities must share one H, W for fusion; "
                             f"key 'shape' gives {sizes}")

        self.config = c
        self.modalities = list(specs)
        self.num_classes = int(num_classes)
        self.out_size = next(iter(sizes.values()))
        self.encoders = nn.ModuleDict({
            m: SegEncoder(int(specs[m]["shape"][0]), c["block"], c["layers"], c["base_width"],
                          c["output_stride"], c["multi_grid"], c["aspp_rates"],
                          c["aspp_channels"], c["aspp_dropout"])
            for m in self.modalities})
        enc = self.encoders[self.modalities[0]]
        low_dim, high_dim = enc.low_dim, enc.high_dim
        dec = dict(low_channels=c["low_channels"], channels=c["decoder_channels"],
                   dropout=c["decoder_dropout"])
        self.head = FusedSegHead(self.modalities, low_dim, high_dim, self.num_classes,
                                 c["fusion"], **dec)
        self.classifiers = nn.ModuleDict(
            {m: SegClassifier(low_dim, high_dim, self.num_classes, **dec)
             for m in self.modalities})

    def segment(self, batch: Mapping[str, torch.Tensor]):
        """``(fused_logits (B, num_classes, H, W), {m: (low_m, high_m)})`` for the input's H, W."""
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise KeyError(f"BratsCGGMModel: batch lacks modality/ies {missing}")
        size = batch[self.modalities[0]].shape[-2:]
        h = {m: self.encoders[m](batch[m]) for m in self.modalities}
        return self.head(h, size), h

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """CGGM's model interface (as ``models.fusion.CGGMModel``): ``{m: ((low_m, high_m),
        classifier logits of m on detached features)}``; ``fuse(outputs)`` gives the prediction."""
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise KeyError(f"BratsCGGMModel: batch lacks modality/ies {missing}")
        self._size = tuple(batch[self.modalities[0]].shape[-2:])
        h = {m: self.encoders[m](batch[m]) for m in self.modalities}
        logits = self.classify(h, self._size)
        return {m: (h[m], logits[m]) for m in self.modalities}

    def fuse(self, outputs: Mapping) -> torch.Tensor:
        """The fused prediction F(Ω(h)) from ``forward``'s outputs, at the last input's H, W."""
        size = getattr(self, "_size", None) or self.out_size
        return self.head({m: h for m, (h, _) in outputs.items()}, size)

    def model_parameters(self):
        """Everything but the classifiers (they have their own optimiser)."""
        return [p for name, p in self.named_parameters() if not name.startswith("classifiers.")]

    def classify(self, h: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 size=None) -> dict[str, torch.Tensor]:
        unknown = [m for m in h if m not in self.classifiers]
        if unknown:
            raise KeyError(f"BratsCGGMModel.classify: no classifier for {unknown}; "
                           f"modalities: {self.modalities}")
        size = self.out_size if size is None else size
        return {m: self.classifiers[m](low, high, size) for m, (low, high) in h.items()}


# --------------------------------------------------------------------------------------------------
# Loss and Dice of the BraTS task. Source: the released CGGM code, src/eval_metrics.py (SegLoss,
# Dice, train_eval_seg, cal_dice); labels {0, 1, 2, 3} = background, necrotic core (NCR),
# oedema (ED), enhancing tumour (ET; BraTS label 4 remapped to 3).

def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor,
                      class_weights=(0.2, 0.3, 0.25, 0.25), dice_weight: float = 0.5,
                      smooth: float = 0.01, include_background: bool = False,
                      dice_reduction: str = "pooled") -> torch.Tensor:
    """(1 − dice_weight)·wCE + dice_weight·(1 − soft Dice); 0-d float32 tensor.

    logits (B, C, H, W), any float dtype (computed in float32); mask (B, H, W) integer labels in
    [0, C) (uint8 as stored in the shards is fine). `class_weights` has C entries (None: plain CE).

    wCE = F.cross_entropy(logits, mask, weight=class_weights): the weighted MEAN,
      Σ_pixels w_y·(−log p_y) / Σ_pixels w_y (PyTorch's normalisation, as the released SegLoss).
    Soft Dice on p = softmax(logits) against the one-hot mask, over the classes K (1..C−1 by
    default: background EXCLUDED, as the released SegLoss; all C with include_background=True):
      dice_reduction="pooled" (released): one Dice over the whole batch and all classes in K,
        2·Σ_{b,k,pixels} p·t / (Σ p + Σ t + smooth), smooth = 0.01 in the denominator only;
      dice_reduction="mean": per class over the batch, (2·Σ p_k·t_k + smooth) /
        (Σ p_k + Σ t_k + smooth), then the mean over K (a class absent from the mask and not
        predicted scores 1).
    Defaults reproduce the released SegLoss (alpha = 0.5, weights (.2, .3, .25, .25)).
    """
    if logits.dim() != 4 or mask.dim() != 3 or logits.shape[0] != mask.shape[0] \
            or logits.shape[2:] != mask.shape[1:]:
        raise ValueError(f"segmentation_loss: expected logits (B, C, H, W) and mask (B, H, W), "
                         f"got {tuple(logits.shape)} and {tuple(mask.shape)}")
    if dice_reduction not in ("pooled", "mean"):
        raise ValueError(f"segmentation_loss: dice_reduction must be 'pooled' or 'mean', "
                         f"got {dice_reduction!r}")
    num_classes = logits.shape[1]
    logits, mask = logits.float(), mask.long()
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if weight.numel() != num_classes:
            raise ValueError(f"segmentation_loss: {weight.numel()} class_weights for "
                             f"{num_classes} classes")
    ce = F.cross_entropy(logits, mask, weight=weight)
    probs = logits.softmax(1)
    onehot = F.one_hot(mask, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    if dice_reduction == "pooled":
        dice = 2.0 * (probs * onehot).sum() / (probs.sum() + onehot.sum() + smooth)
    else:
        dims = (0, 2, 3)
        inter, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
        dice = ((2.0 * inter + smooth) / (total + smooth)).mean()
    return (1.0 - dice_weight) * ce + dice_weight * (1.0 - dice)


#: BraTS regions as sets of labels (after 4 -> 3): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}


def dice_scores(pred_labels: torch.Tensor, mask: torch.Tensor, eps: float = 0.0,
                reduction: str = "mean") -> dict:
    """Dice of the BraTS regions WT (labels 1, 2, 3), TC (1, 3), ET (3), per slice.

    pred_labels and mask: (B, H, W) (or (B, ...)) integer labels. For each slice b and region R
    with A = {pred in R}, G = {mask in R}:
      eps = 0 (default): Dice = 2|A∩G| / (|A| + |G|), and Dice = 1 when both are empty;
      eps > 0: (2|A∩G| + 2·eps) / (|A| + |G| + 2·eps) -- the released Dice (eps 1e-3); also 1
        when both are empty, and within ~eps/(|A|+|G|) of the exact value otherwise.
    reduction "mean" (released: the mean over the slices of the batch), "sum" (over slices, for
    accumulating over batches / all-reducing counts across ranks) or "none" ((B,) per slice).
    Returns {"wt", "tc", "et"} -> float64 tensors on the input's device (no host sync).
    Note: slices without ET that are predicted without ET score 1 for ET (the convention above).
    """
    if pred_labels.shape != mask.shape:
        raise ValueError(f"dice_scores: pred_labels {tuple(pred_labels.shape)} and mask "
                         f"{tuple(mask.shape)} differ in shape")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"dice_scores: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    pred, gt = pred_labels.long().flatten(1), mask.long().flatten(1)

    def region(x, labels):
        inside = x == labels[0]
        for label in labels[1:]:
            inside = inside | (x == label)
        return inside

    out = {}
    for name, labels in BRATS_REGIONS.items():
        a, g = region(pred, labels), region(gt, labels)
        inter = (a & g).sum(1).double()
        total = (a.sum(1) + g.sum(1)).double()
        if eps > 0:
            d = (2.0 * inter + 2.0 * eps) / (total + 2.0 * eps)
        else:
            d = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))
        out[name] = d if reduction == "none" else d.sum() if reduction == "sum" else d.mean()
    return out
