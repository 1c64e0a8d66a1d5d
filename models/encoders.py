"""Encoders, one per modality kind of the shard format (docs/data.md).

Every encoder

* takes the tensor exactly as the shard reader yields it (stored dtype: ``uint8`` for images and
  frames, ``float32`` for everything else) and converts it itself, on whatever device it lives on
  (``uint8 -> float / 255``, optional ImageNet normalisation held in a non-persistent buffer);
* has an ``int`` attribute ``out_dim`` and returns pooled features ``(B, out_dim)`` from
  ``forward(x)``;
* never synchronises with the host in ``forward`` (no ``.item()``, no data-dependent Python
  branches); the only exception is the opt-in ``TabularMLP(validate_codes=True)`` debug check.

Imports: torch only (``models/`` never imports ``train/`` or ``data_prep/``).
"""
from __future__ import annotations

import difflib
import math
import os
import warnings
from typing import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "to_float",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet10",
    "resnet34",
    "resnet50",
    "resnet101",
    "RESNET_ARCHS",
    "load_pretrained",
    "ImageEncoder",
    "SpectrogramEncoder",
    "FramesEncoder",
    "SequenceEncoder",
    "SequenceCore",
    "FeatureMLP",
    "TabularMLP",
    "VolumeEncoder",
    "build_encoder",
    "ENCODER_DEFAULTS",
    "ModelConfigError",
    "AUTO_WIDTH",
    "AUTO_ENCODERS",
    "auto_encoder_config",
    "encoder_out_dim",
    "resolve_encoder_configs",
]



class ModelConfigError(ValueError):
    """A model config that cannot work with the data at hand: an unknown or invalid encoder key, a
    modality kind without an encoder, encoder widths a model cannot combine, an encoder whose
    training state cannot fit this host's memory. Raised by
    build_encoder, resolve_encoder_configs and the models of models.fusion, before any compute;
    the message is one line naming the modality and the key (a ValueError, so older handlers
    still catch it)."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def suggest(key: str, known) -> list[str]:
    """The known names closest to a mistyped `key` (at most 3, closest first): difflib's close matches,
    then names that share a whole `_`-separated prefix with it (`lr_rate` -> `lr`). The one
    did-you-mean of the repository (train/config.py uses it for config keys)."""
    known = [k for k in known if isinstance(k, str)]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    prefix = [k for k in known if k not in close and (key.startswith(k + "_") or k.startswith(key + "_"))]
    prefix.sort(key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    return (close + prefix)[:3]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float16/bfloat16 (half-size shards) and integers -> float32;
    float32/float64 unchanged. Autocast, where on, lowers the precision inside the layers."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


# ------------------------------------------------------------------------------------------------
# ResNet in torchvision's layout (module names and parameter shapes), without ``fc``.
# ------------------------------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk without ``fc``; ``forward`` returns ``(B, out_dim)``.

    With ``base_width=64`` and ``small_input=False`` the state dict is key- and shape-identical to
    torchvision's ``resnet*`` minus ``fc.*``, so a torchvision checkpoint loads strictly.
    ``base_width`` scales every stage (stem ``base_width``, stages ``base_width * (1, 2, 4, 8)``)
    for narrow test / benchmark nets.

    ``small_input=True`` (CIFAR-style, for ~32x32 inputs) replaces conv1 by a 3x3 stride-1 conv and
    the max-pool by ``nn.Identity``: conv1 then has another shape and a torchvision checkpoint
    cannot provide it (``load_pretrained`` leaves conv1 at its random init and warns).

    Input: float tensor ``(B, in_channels, H, W)`` -- the trunk itself does no dtype conversion;
    the modality encoders below do.
    """

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 in_channels: int = 3, base_width: int = 64, small_input: bool = False,
                 zero_init_residual: bool = False):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"ResNet block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {list(layers)}")
        blk = _BLOCKS[block]
        self.block = block
        self.layers_cfg = [int(n) for n in layers]
        self.in_channels = int(in_channels)
        self.base_width = int(base_width)
        self.small_input = bool(small_input)

        w = self.base_width
        if self.small_input:
            self.conv1 = nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if self.small_input
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self._inplanes = w
        self.layer1 = self._make_layer(blk, w, layers[0], stride=1)
        self.layer2 = self._make_layer(blk, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(blk, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(blk, 8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim: int = 8 * w * blk.expansion
        del self._inplanes

        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, blk, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * blk.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, planes * blk.expansion, stride),
                nn.BatchNorm2d(planes * blk.expansion),
            )
        blocks = [blk(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * blk.expansion
        blocks += [blk(self._inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before global pooling, ``(B, out_dim, H', W')``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_map(x)), 1)


def resnet10(**kw) -> ResNet:
    """One BasicBlock per stage: the small CPU-friendly net of the embedded benchmark and tests."""
    return ResNet("basic", [1, 1, 1, 1], **kw)


def resnet18(**kw) -> ResNet:
    return ResNet("basic", [2, 2, 2, 2], **kw)


def resnet34(**kw) -> ResNet:
    return ResNet("basic", [3, 4, 6, 3], **kw)


def resnet50(**kw) -> ResNet:
    return ResNet("bottleneck", [3, 4, 6, 3], **kw)


def resnet101(**kw) -> ResNet:
    return ResNet("bottleneck", [3, 4, 23, 3], **kw)


RESNET_ARCHS = {"resnet10": resnet10, "resnet18": resnet18, "resnet34": resnet34,
                "resnet50": resnet50, "resnet101": resnet101}


def _find_resnet(model: nn.Module) -> ResNet:
    if isinstance(model, ResNet):
        return model
    found = [m for m in model.modules() if isinstance(m, ResNet)]
    if len(found) != 1:
        raise TypeError(f"load_pretrained: expected a ResNet or a module holding exactly one "
                        f"ResNet, {type(model).__name__} holds {len(found)}")
    return found[0]


def _read_checkpoint(path_or_state_dict, map_location):
    """What load_pretrained was given: the contents of a LOCAL checkpoint file (never downloaded),
    or the mapping itself."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_pretrained: no checkpoint file at {path!r} "
                                    f"(weights are never downloaded; give a local path)")
        return torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    raise TypeError("load_pretrained: expected a path or a state dict, got "
                    f"{type(path_or_state_dict).__name__}")


def _normalised_state_dict(sd) -> dict:
    """A new dict: the state dict under ``"state_dict"`` / ``"model"`` where it is wrapped, without a
    DDP ``"module."`` prefix and without the classifier ``fc.*``."""
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _adapt_conv1(net: ResNet, sd: dict) -> list[str]:
    """Fit the checkpoint's conv1 (in ``sd``, in place) to ``net``: dropped for a small-input stem,
    summed / spread over the channels for ``in_channels != 3``. Returns the keys dropped (they keep
    their random init)."""
    w = sd.get("conv1.weight")
    if w is None or w.dim() != 4:
        return []
    if net.small_input:
        sd.pop("conv1.weight")
        return ["conv1.weight"]
    if w.shape[1] != net.in_channels:
        if w.shape[1] != 3:
            raise ValueError(f"load_pretrained: checkpoint conv1 has {w.shape[1]} input "
                             f"channels; only 3-channel checkpoints can be adapted to "
                             f"in_channels={net.in_channels}")
        s = w.sum(dim=1, keepdim=True)
        c = net.in_channels
        sd["conv1.weight"] = s if c == 1 else (s / c).repeat(1, c, 1, 1)
    return []


def _refuse_mismatched_keys(net: ResNet, sd: Mapping, skipped: list[str]) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch of ``sd`` against
    ``net`` (``skipped`` keys and BatchNorm's ``num_batches_tracked`` may be missing)."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd and k not in skipped
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            "load_pretrained: checkpoint does not match the ResNet "
            f"(block={net.block}, layers={net.layers_cfg}, base_width={net.base_width}, "
            f"in_channels={net.in_channels}, small_input={net.small_input}).\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}")


def load_pretrained(model: nn.Module, path_or_state_dict, *, map_location="cpu") -> nn.Module:
    """Load a torchvision-format ResNet checkpoint from a LOCAL file (or a state dict).

    ``model`` is a :class:`ResNet` or any encoder holding exactly one (``ImageEncoder``,
    ``SpectrogramEncoder``, ``FramesEncoder``). Accepted files: a plain state dict, or a dict
    with the state dict under ``"state_dict"`` or ``"model"``; a ``"module."`` prefix (DDP) is
    stripped. ``fc.*`` is dropped. conv1 is adapted to the model's ``in_channels``: 1 -> the sum
    of the RGB filters (a grey image x gives the same response as the RGB image (x, x, x));
    other C != 3 -> that sum divided by C, repeated C times (same response on channel-constant
    inputs). With ``small_input=True`` conv1 has another shape; it is left at its random init
    (with a warning). Any other missing / unexpected key or shape mismatch raises ``ValueError``
    listing them all. Nothing is ever downloaded. Returns ``model``.
    """
    net = _find_resnet(model)
    sd = _normalised_state_dict(_read_checkpoint(path_or_state_dict, map_location))
    skipped = _adapt_conv1(net, sd)
    _refuse_mismatched_keys(net, sd, skipped)
    net.load_state_dict(sd, strict=False)
    if skipped:
        warnings.warn(f"load_pretrained: small_input=True, so {skipped} keep their random init "
                      "(a torchvision conv1 is 7x7 stride 2)", stacklevel=2)
    return model


# ------------------------------------------------------------------------------------------------
# Image-like encoders
# ------------------------------------------------------------------------------------------------
class _PixelPrep(nn.Module):
    """uint8 -> float/255; optional ImageNet normalisation (non-persistent buffers)."""

    def __init__(self, channels: int, normalize: str = "none"):
        super().__init__()
        if normalize not in ("none", "imagenet"):
            raise ValueError(f"normalize must be 'none' or 'imagenet', got {normalize!r}")
        if normalize == "imagenet" and channels != 3:
            raise ValueError(f"normalize='imagenet' needs 3 channels, got {channels}")
        self.normalize = normalize
        if normalize == "imagenet":
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        if self.normalize == "imagenet":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x


def _make_resnet(arch: str, **kw) -> ResNet:
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; choose from {sorted(RESNET_ARCHS)}")
    return RESNET_ARCHS[arch](**kw)


class ImageEncoder(nn.Module):
    """Kind ``image``: ``(B, C, H, W)`` uint8 (scaled by 1/255 here) or float (taken as already in
    [0, 1] -- or whatever scale the converter stored) -> optional ImageNet normalisation ->
    ResNet -> ``(B, out_dim)``."""

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, base_width: int = 64,
                 small_input: bool = False, normalize: str = "none"):
        super().__init__()
        self.prep = _PixelPrep(in_channels, normalize)
        self.backbone = _make_resnet(arch, in_channels=in_channels, base_width=base_width,
                                     small_input=small_input)
        self.out_dim: int = self.backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prep(x))


class SpectrogramEncoder(nn.Module):
    """Kind ``spectrogram``: ``(B, F, T)`` float32 (or ``(B, 1, F, T)``) -> 1-channel ResNet."""

    def __init__(self, arch: str = "resnet18", base_width: int = 64, small_input: bool = False):
        super().__init__()
        self.backbone = _make_resnet(arch, in_channels=1, base_width=base_width,
                                     small_input=small_input)
        self.out_dim: int = self.backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.backbone(x)


class FramesEncoder(ImageEncoder):
    """Kind ``frames``: ``(B, n, C, H, W)`` (uint8) -> frames folded into the batch -> the image
    encoder per frame -> mean over the n frames -> ``(B, out_dim)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"FramesEncoder expects (B, n, C, H, W), got shape {tuple(x.shape)}")
        b, n = x.shape[:2]
        return super().forward(x.reshape(b * n, *x.shape[2:])).view(b, n, -1).mean(dim=1)


# ------------------------------------------------------------------------------------------------
# Sequences (CGGM): input projection + encoder core
# ------------------------------------------------------------------------------------------------
class SequenceCore(nn.Module):
    """Learned positional embedding + pre-LN ``nn.TransformerEncoder`` (batch_first) + final
    LayerNorm, on ``(B, T, d_model)``."""

    def __init__(self, d_model: int, n_layers: int = 2, n_heads: int = 4, max_len: int = 512,
                 dropout: float = 0.1, dim_feedforward: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.max_len = int(max_len)
        self.pos = nn.Parameter(torch.zeros(1, self.max_len, d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward or 4 * d_model, dropout,
            activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)

    def forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = h.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        h = self.drop(h + self.pos[:, :t].to(h.dtype))
        return self.encoder(h, src_key_padding_mask=padding_mask)


def _masked_mean(h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    if padding_mask is None:
        return h.mean(dim=1)
    keep = (~padding_mask).to(h.dtype).unsqueeze(-1)
    return (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class SequenceEncoder(nn.Module):
    """Kind ``sequence``: ``(B, T, d_in)`` float32.

    ``proj`` (Linear d_in -> d_model) is the input projection, ``core`` the encoder core
    (positional embedding + transformer); CGGM scales the gradients of ``core`` only.
    ``forward(x, return_sequence=False, padding_mask=None)`` returns the mean over time
    ``(B, d_model)``, or the full ``(B, T, d_model)`` with ``return_sequence=True``.
    ``padding_mask`` (optional, ``(B, T)`` bool, True = padding) is excluded from attention and
    from the mean.
    """

    def __init__(self, d_in: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 512, dropout: float = 0.1, dim_feedforward: int | None = None):
        super().__init__()
        self.proj = nn.Linear(d_in, d_model)
        self.core = SequenceCore(d_model, n_layers, n_heads, max_len, dropout, dim_feedforward)
        self.out_dim: int = int(d_model)

    def forward(self, x: torch.Tensor, return_sequence: bool = False,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.core(self.proj(to_float(x)), padding_mask)
        return h if return_sequence else _masked_mean(h, padding_mask)


# ------------------------------------------------------------------------------------------------
# Vectors
# ------------------------------------------------------------------------------------------------
class FeatureMLP(nn.Module):
    """Kind ``features``: ``(B, d_in)`` float32 (extra trailing dims are flattened) ->
    ``n_layers`` Linear layers (ReLU + dropout between them, none after the last)."""

    def __init__(self, d_in: int, hidden: int = 256, out_dim: int = 256, n_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"FeatureMLP needs n_layers >= 1, got {n_layers}")
        dims = [d_in] + [hidden] * (n_layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(n_layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                mods += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.net = nn.Sequential(*mods)
        self.out_dim: int = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_float(x).flatten(1))


class TabularMLP(nn.Module):
    """Kind ``tabular`` (GAAL's tabular encoder).

    Input ``(B, n_continuous + n_categorical)`` float32: the continuous columns first, then one
    integer code per categorical column stored as a float. The categorical codes are one-hot
    encoded here (d_tab = n_continuous + sum(cardinalities)), then
    Linear(d_tab, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out_dim),
    kaiming-normal (fan_in, ReLU gain) weights, zero biases.

    Out-of-range codes: with ``validate_codes=True`` forward raises ``ValueError`` naming the
    column (this costs one host sync per batch -- a debug switch). By default there is no sync
    and an out-of-range code gives an all-zero one-hot block for that column (it can never
    leak into a neighbouring column).
    """

    def __init__(self, n_continuous: int, categorical: Mapping[str, int] | None = None,
                 hidden: int = 2048, out_dim: int = 2048, validate_codes: bool = False):
        super().__init__()
        categorical = dict(categorical or {})
        for k, c in categorical.items():
            if int(c) < 1:
                raise ValueError(f"categorical column {k!r} has cardinality {c} < 1")
        self.n_continuous = int(n_continuous)
        self.cat_names = list(categorical)
        self.cardinalities = [int(categorical[k]) for k in self.cat_names]
        self.n_categorical = len(self.cat_names)
        self.d_in = self.n_continuous + self.n_categorical
        self.d_tab = self.n_continuous + sum(self.cardinalities)
        self.validate_codes = bool(validate_codes)
        offs = [0]
        for c in self.cardinalities[:-1]:
            offs.append(offs[-1] + c)
        self.register_buffer("cat_offsets", torch.tensor(offs, dtype=torch.long),
                             persistent=False)
        self.register_buffer("cat_cards", torch.tensor(self.cardinalities, dtype=torch.long),
                             persistent=False)

        self.net = nn.Sequential(
            nn.Linear(self.d_tab, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim))
        self.out_dim: int = int(out_dim)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def one_hot(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_continuous + n_categorical)`` -> ``(B, d_tab)`` float."""
        x = to_float(x)
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"TabularMLP expects (B, {self.d_in}) = {self.n_continuous} "
                             f"continuous + {self.n_categorical} categorical codes, "
                             f"got {tuple(x.shape)}")
        cont = x[:, :self.n_continuous]
        if self.n_categorical == 0:
            return cont
        codes = x[:, self.n_continuous:].round().long()
        valid = (codes >= 0) & (codes < self.cat_cards)
        if self.validate_codes:
            bad = (~valid).any(dim=0).tolist()  # host sync: debug switch only
            if any(bad):
                j = bad.index(True)
                col = codes[:, j][~valid[:, j]]
                raise ValueError(
                    f"tabular column {self.cat_names[j]!r}: code {int(col[0])} out of range "
                    f"[0, {self.cardinalities[j]}) ({int(col.numel())} rows affected)")
        idx = torch.where(valid, codes, 0) + self.cat_offsets
        onehot = torch.zeros(x.shape[0], self.d_tab - self.n_continuous,
                             dtype=x.dtype, device=x.device)
        onehot.scatter_(1, idx, valid.to(x.dtype))
        return torch.cat([cont, onehot], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.one_hot(x))


# ------------------------------------------------------------------------------------------------
# Volumes
# ------------------------------------------------------------------------------------------------
class VolumeEncoder(nn.Module):
    """Kind ``volume``: ``(B, C, D, H, W)`` or ``(B, D, H, W)`` (C = 1) float32 -> per stage
    Conv3d(3x3x3, stride 1 for the first stage, 2 after) -> BatchNorm3d -> ReLU, ``widths``
    channels per stage -> global average pool -> ``(B, widths[-1])``."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("VolumeEncoder needs at least one stage width")
        mods: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            mods += [nn.Conv3d(cin, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                     nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
            cin = w
        self.net = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.in_channels = int(in_channels)
        self.out_dim: int = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        if x.dim() == 4:
            x = x.unsqueeze(1)
        return torch.flatten(self.pool(self.net(x)), 1)


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------
_IMAGE_DEFAULTS = {"arch": "resnet18", "base_width": 64, "small_input": False,
                   "normalize": "none", "pretrained": None}

#: Allowed encoder config keys per modality kind, with their defaults (``None`` for sequence
#: ``max_len`` means "the stored T", the only length build_encoder accepts; for
#: ``dim_feedforward`` "4 * d_model").
ENCODER_DEFAULTS: dict[str, dict] = {
    "image": dict(_IMAGE_DEFAULTS),
    "frames": dict(_IMAGE_DEFAULTS),
    "spectrogram": {"arch": "resnet18", "base_width": 64, "small_input": False,
                    "pretrained": None},
    "sequence": {"d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.1, "max_len": None,
                 "dim_feedforward": None},
    "features": {"hidden": 256, "out_dim": 256, "n_layers": 2, "dropout": 0.0},
    "tabular": {"hidden": 2048, "out_dim": 2048, "validate_codes": False},
    "volume": {"widths": [16, 32, 64]},
}

_SHAPE_RANK = {"image": 3, "frames": 4, "spectrogram": 2, "sequence": 2, "features": None,
               "tabular": 1, "volume": None}


def _checked_kind_and_config(name: str, spec: Mapping, cfg: Mapping | None) -> tuple[str, dict]:
    """The modality's kind and its encoder config merged over the kind's defaults; refuses a config
    that is not a mapping, a kind without an encoder and unknown config keys (with a did-you-mean)."""
    if cfg is not None and not isinstance(cfg, Mapping):
        raise ModelConfigError(f"encoders.{name}: must be a mapping of encoder config keys, got "
                               f"{type(cfg).__name__} {cfg!r}")
    cfg = dict(cfg or {})
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in ENCODER_DEFAULTS:
        raise ModelConfigError(f"modality {name!r}: key 'kind' = {kind!r} has no encoder; "
                               f"known kinds: {sorted(ENCODER_DEFAULTS)}")
    allowed = ENCODER_DEFAULTS[kind]
    unknown = sorted(k for k in cfg if k not in allowed)
    if unknown:
        close = [c for k in unknown for c in suggest(k, allowed)[:1]]
        hint = f" (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else ""
        raise ModelConfigError(f"modality {name!r} (kind {kind!r}): unknown encoder config key(s) "
                               f"{unknown}{hint}; allowed: {sorted(allowed)}")
    return kind, {**allowed, **cfg}


def _checked_shape(name: str, kind: str, spec: Mapping) -> list[int]:
    """The spec's ``shape`` as ints, refused where its rank does not fit the kind."""
    if "shape" not in spec:
        raise ModelConfigError(f"modality {name!r}: spec lacks key 'shape'")
    shape = [int(s) for s in spec["shape"]]
    rank = _SHAPE_RANK[kind]
    if rank is not None and len(shape) != rank:
        raise ModelConfigError(f"modality {name!r} (kind {kind!r}): key 'shape' = {shape} must have "
                               f"{rank} dims")
    if kind == "volume" and len(shape) not in (3, 4):
        raise ModelConfigError(f"modality {name!r} (kind 'volume'): key 'shape' = {shape} must be "
                               f"(D, H, W) or (C, D, H, W)")
    if kind == "features" and len(shape) < 1:
        raise ModelConfigError(f"modality {name!r} (kind 'features'): key 'shape' is empty")
    return shape


def _check_value(name: str, kind: str, c: Mapping, key: str, ok: bool, what: str) -> None:
    """ModelConfigError naming config key ``key`` of modality ``name`` unless ``ok``."""
    if not ok:
        raise ModelConfigError(f"modality {name!r} (kind {kind!r}): config key {key!r} = "
                               f"{c[key]!r} is invalid; expected {what}")


# The constructors of build_encoder, one per kind: (name, kind, merged config, int shape, spec) ->
# the encoder on the current default device, without its pretrained weights.
def _construct_resnet_encoder(name: str, kind: str, c: Mapping, shape: list[int],
                              spec: Mapping) -> nn.Module:
    """Kinds image, frames, spectrogram: a ResNet trunk behind the kind's input handling."""
    _check_value(name, kind, c, "arch", c["arch"] in RESNET_ARCHS, f"one of {sorted(RESNET_ARCHS)}")
    _check_value(name, kind, c, "base_width", isinstance(c["base_width"], int) and c["base_width"] > 0,
                 "a positive int")
    if kind == "spectrogram":
        return SpectrogramEncoder(c["arch"], c["base_width"], bool(c["small_input"]))
    _check_value(name, kind, c, "normalize", c["normalize"] in ("none", "imagenet"), "'none' or 'imagenet'")
    ch = shape[0] if kind == "image" else shape[1]
    _check_value(name, kind, c, "normalize", c["normalize"] == "none" or ch == 3,
                 f"'none' for {ch}-channel input")
    cls = ImageEncoder if kind == "image" else FramesEncoder
    return cls(c["arch"], ch, c["base_width"], bool(c["small_input"]), c["normalize"])


def _construct_sequence_encoder(name: str, kind: str, c: Mapping, shape: list[int],
                                spec: Mapping) -> nn.Module:
    """Kind sequence: an input projection and a transformer core."""
    # every sequence of the shard is stored padded to T = shape[0]: a longer table only
    # adds position embeddings no step ever trains, a shorter one cannot hold the data
    _check_value(name, kind, c, "max_len", c["max_len"] is None or (not isinstance(c["max_len"], bool)
                                                                  and c["max_len"] == shape[0]),
                 f"the stored length {shape[0]} (every sequence of {name!r} is stored padded to "
                 f"{shape[0]} steps); leave max_len unset")
    _check_value(name, kind, c, "n_heads", c["d_model"] % c["n_heads"] == 0,
                 f"a divisor of d_model={c['d_model']}")
    return SequenceEncoder(shape[1], c["d_model"], c["n_layers"], c["n_heads"],
                           shape[0], c["dropout"], c["dim_feedforward"])


def _construct_features_encoder(name: str, kind: str, c: Mapping, shape: list[int],
                                spec: Mapping) -> nn.Module:
    """Kind features: an MLP on the flattened input."""
    return FeatureMLP(math.prod(shape), c["hidden"], c["out_dim"], c["n_layers"], c["dropout"])


def _construct_tabular_encoder(name: str, kind: str, c: Mapping, shape: list[int],
                               spec: Mapping) -> nn.Module:
    """The columns the spec lists must be the stored ones."""
    for key in ("continuous", "categorical"):
        if key not in spec:
            raise ModelConfigError(f"modality {name!r} (kind 'tabular'): spec lacks key {key!r}")
    n_cont = len(spec["continuous"])
    cats = dict(spec["categorical"])
    if shape[0] != n_cont + len(cats):
        raise ModelConfigError(f"modality {name!r} (kind 'tabular'): key 'shape' = {shape} "
                               f"but spec lists {n_cont} continuous + {len(cats)} categorical "
                               f"columns")
    return TabularMLP(n_cont, cats, c["hidden"], c["out_dim"], bool(c["validate_codes"]))


def _construct_volume_encoder(name: str, kind: str, c: Mapping, shape: list[int],
                              spec: Mapping) -> nn.Module:
    """Kind volume: 3-D convolutions; a (D, H, W) shape is one channel."""
    in_ch = 1 if len(shape) == 3 else shape[0]
    return VolumeEncoder(in_ch, c["widths"])


_CONSTRUCTORS = {"image": _construct_resnet_encoder, "frames": _construct_resnet_encoder,
                 "spectrogram": _construct_resnet_encoder, "sequence": _construct_sequence_encoder,
                 "features": _construct_features_encoder, "tabular": _construct_tabular_encoder,
                 "volume": _construct_volume_encoder}


def _parameter_count_on_meta(name: str, kind: str, c: Mapping, shape: list[int],
                             spec: Mapping) -> int:
    """The encoder's parameter count, from a build on the meta device (no memory, no random numbers
    drawn); a size torch cannot allocate (negative, overflowing) is refused in one line."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in _CONSTRUCTORS[kind](name, kind, c, shape, spec).parameters())
    except RuntimeError as e:   # a negative or overflowing size
        raise ModelConfigError(f"modality {name!r} (kind {kind!r}): cannot build the encoder "
                               f"({_encoder_sizes(kind, c, shape, spec)}): "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                               ) from None


def _load_pretrained_entry(name: str, kind: str, c: Mapping, enc: nn.Module) -> None:
    """Config key ``pretrained`` of the ResNet kinds: a local checkpoint loaded into ``enc``."""
    if kind in ("image", "frames", "spectrogram") and c["pretrained"] is not None:
        _check_value(name, kind, c, "pretrained", isinstance(c["pretrained"], (str, os.PathLike)),
                     "null or a local checkpoint path")
        load_pretrained(enc, c["pretrained"])


def build_encoder(name: str, spec: Mapping, cfg: Mapping | None = None) -> nn.Module:
    """Build the encoder for modality ``name`` from its ``meta.json`` spec (``kind``, ``shape``,
    ``dtype``; ``continuous`` / ``categorical`` for tabular) and an encoder config dict.

    Allowed config keys per kind and their defaults: :data:`ENCODER_DEFAULTS`. Unknown keys (the
    closest allowed one suggested), a kind without an encoder, or a spec / config value that cannot
    work raise :class:`ModelConfigError` (a ``ValueError``) naming the modality and the key.

    The encoder is first built on the meta device (milliseconds, no memory, no random numbers
    drawn, no pretrained weights) to count its parameters: one whose float32 weights, gradients
    and two Adam moments (16 bytes a parameter) exceed the memory available on this host
    (``MemAvailable``) is refused, naming the sizes that make it big, before it is built for real.
    """
    kind, c = _checked_kind_and_config(name, spec, cfg)
    shape = _checked_shape(name, kind, spec)
    try:
        # sized first on the meta device: an encoder whose training state cannot fit this host is
        # refused before anything big is allocated
        n_params = _parameter_count_on_meta(name, kind, c, shape, spec)
        _refuse_too_big(name, kind, n_params, _encoder_sizes(kind, c, shape, spec))
        enc = _CONSTRUCTORS[kind](name, kind, c, shape, spec)
        _load_pretrained_entry(name, kind, c, enc)
        return enc
    except ModelConfigError:
        raise
    except FileNotFoundError as e:   # pretrained: a path that is not there
        raise ModelConfigError(f"modality {name!r} (kind {kind!r}): config key 'pretrained': {e}") from e
    except (ValueError, TypeError) as e:
        raise ModelConfigError(str(e) if repr(name) in str(e) else
                               f"modality {name!r} (kind {kind!r}): {e}") from e


#: Bytes a trained parameter costs: float32 weight + gradient + Adam's two moments.
TRAIN_BYTES_PER_PARAM = 16


def _available_memory() -> int | None:
    """Bytes of memory this host has available now: MemAvailable of /proc/meminfo, else the free
    physical pages (os.sysconf), else None (not known: nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _encoder_sizes(kind: str, c: Mapping, shape: Sequence[int], spec: Mapping) -> str:
    """The config keys (and input sizes) that set an encoder's parameter count, as 'k=v, ...'."""
    if kind in ("image", "frames", "spectrogram"):
        sizes = {"arch": c["arch"], "base_width": c["base_width"]}
    elif kind == "sequence":
        sizes = {"d_model": c["d_model"], "n_layers": c["n_layers"],
                 "dim_feedforward": c["dim_feedforward"] or "4*d_model",
                 "max_len": shape[0] if c["max_len"] is None else c["max_len"], "input width": shape[1]}
    elif kind == "features":
        width = "*".join(map(str, shape)) + (f"={math.prod(shape)}" if len(shape) > 1 else "")
        sizes = {"input width": width, "hidden": c["hidden"],
                 "out_dim": c["out_dim"], "n_layers": c["n_layers"]}
    elif kind == "tabular":
        try:
            d_tab = len(spec["continuous"]) + sum(int(v) for v in dict(spec["categorical"]).values())
        except (KeyError, TypeError, ValueError):
            d_tab = "?"
        sizes = {"one-hot input width": d_tab, "hidden": c["hidden"], "out_dim": c["out_dim"]}
    else:
        sizes = {"widths": list(c["widths"])}
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError(n)  # unreachable


def _refuse_too_big(name: str, kind: str, n_params: int, sizes: str) -> None:
    """ModelConfigError (one line) when training ``n_params`` parameters (float32 weights,
    gradients and two Adam moments) needs more memory than this host has available."""
    need, have = TRAIN_BYTES_PER_PARAM * n_params, _available_memory()
    if have is not None and need > have:
        raise ModelConfigError(
            f"modality {name!r} (kind {kind!r}): the encoder has {n_params:,} parameters ({sizes}): "
            f"{_bytes(need)} for its float32 weights, gradients and Adam moments "
            f"({TRAIN_BYTES_PER_PARAM} bytes a parameter), more than the {_bytes(have)} of memory "
            f"available on this host; lower those sizes")


# ------------------------------------------------------------------------------------------------
# Encoder configs for the dataset at hand
# ------------------------------------------------------------------------------------------------
#: The feature width of an encoder chosen by default (resolve_encoder_configs) when neither the
#: method (``feature_dim``) nor the given entries fix one: what the embedded benchmarks' configs use.
AUTO_WIDTH = 128

#: What a modality without an encoder entry gets, per kind, besides its width (``base_width`` =
#: width / 8 for a ResNet-10, ``d_model`` / ``out_dim`` = width, volume ``widths`` ending at width);
#: image-like kinds take ``small_input`` when both spatial sides are <= 32 (CIFAR-sized), sequences
#: 4 heads (2 or 1 where 4 does not divide the width). Everything else: ENCODER_DEFAULTS.
AUTO_ENCODERS: dict[str, dict] = {
    "image": {"arch": "resnet10"},
    "frames": {"arch": "resnet10"},
    "spectrogram": {"arch": "resnet10"},
    "sequence": {},
    "features": {"hidden": 256, "n_layers": 2},
    "tabular": {"hidden": 256},
    "volume": {},
}

_RESNET_EXPANSION = {"resnet10": 1, "resnet18": 1, "resnet34": 1, "resnet50": 4, "resnet101": 4}
_WIDTH_KEY = {"image": "base_width", "frames": "base_width", "spectrogram": "base_width",
              "sequence": "d_model", "features": "out_dim", "tabular": "out_dim", "volume": "widths"}


def encoder_out_dim(spec: Mapping, cfg: Mapping | None = None) -> int:
    """The feature width ``out_dim`` that ``build_encoder`` would give for this spec and config,
    computed from the config alone (nothing is built). ``KeyError`` / ``TypeError`` / ``ValueError``
    where the config or spec is not one build_encoder accepts."""
    kind = spec["kind"]
    c = {**ENCODER_DEFAULTS[kind], **(cfg or {})}
    if kind in ("image", "frames", "spectrogram"):
        return 8 * int(c["base_width"]) * _RESNET_EXPANSION[c["arch"]]
    if kind == "sequence":
        return int(c["d_model"])
    if kind in ("features", "tabular"):
        return int(c["out_dim"])
    return int(list(c["widths"])[-1])


def _width_setting(name: str, kind: str, arch: str | None, width: int) -> dict:
    """The encoder config entries that make modality ``name`` give ``width``-d features."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ModelConfigError(f"feature width {width!r}: must be a positive integer")
    if kind in ("image", "frames", "spectrogram"):
        arch = arch or ENCODER_DEFAULTS[kind]["arch"]
        unit = 8 * _RESNET_EXPANSION.get(arch, 1)
        if width % unit:
            raise ModelConfigError(
                f"encoders.{name}: a {arch} gives {unit} * base_width features, so it cannot give "
                f"{width}: choose a width divisible by {unit} or set encoders.{name} by hand")
        return {"base_width": width // unit}
    if kind == "volume":
        return {"widths": [max(1, width // 4), max(1, width // 2), width]}
    return {_WIDTH_KEY[kind]: width}


def auto_encoder_config(name: str, spec: Mapping, width: int = AUTO_WIDTH) -> dict:
    """The encoder config a modality without an entry gets: :data:`AUTO_ENCODERS` of its kind,
    sized to give ``width``-d features. ``ModelConfigError`` for a kind without an encoder or a
    width the kind cannot give."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind not in AUTO_ENCODERS:
        raise ModelConfigError(f"modality {name!r}: key 'kind' = {kind!r} has no encoder; "
                               f"known kinds: {sorted(ENCODER_DEFAULTS)}")
    cfg = dict(AUTO_ENCODERS[kind])
    cfg.update(_width_setting(name, kind, cfg.get("arch"), width))
    if kind in ("image", "frames", "spectrogram"):
        side = [int(s) for s in spec.get("shape", [])][-2:]
        cfg["small_input"] = len(side) == 2 and max(side) <= 32
    if kind == "sequence":
        cfg["n_heads"] = next(h for h in (ENCODER_DEFAULTS["sequence"]["n_heads"], 2, 1) if width % h == 0)
    return cfg


def _used_modalities(meta_modalities: Mapping[str, Mapping],
                     used_modalities: Sequence[str] | None) -> list[str]:
    """The modalities the run trains (``None`` / empty: all of the dataset's); refuses one the
    dataset lacks."""
    used = list(used_modalities or meta_modalities)
    missing = [m for m in used if m not in meta_modalities]
    if missing:
        raise ModelConfigError(f"modality {missing[0]!r} is not in the dataset (it has "
                               f"{', '.join(meta_modalities)})")
    return used


def _keys_of_another_kind(entry: Mapping, kind) -> list[str]:
    """The keys of ``entry`` that a ``kind`` encoder does not take, where all of ``entry``'s keys are
    those of one other kind (an entry written for another encoder); else [] (a key allowed for no
    kind is a typo, for build_encoder to refuse)."""
    foreign = [k for k in entry if kind in ENCODER_DEFAULTS and k not in ENCODER_DEFAULTS[kind]]
    if foreign and any(set(entry) <= set(allowed) for other, allowed in ENCODER_DEFAULTS.items()
                       if other != kind):
        return foreign
    return []


def _given_entries(meta_modalities: Mapping[str, Mapping], cfg_encoders: dict
                   ) -> tuple[dict[str, dict], dict[str, str]]:
    """``(given, dropped)``: the entries that fit the dataset (copied), and {name: why} for those
    that do not (a modality the dataset lacks, an entry for another kind of encoder); refuses an
    entry that is not a mapping."""
    dropped, given = {}, {}
    for m, entry in cfg_encoders.items():
        if m not in meta_modalities:
            dropped[m] = "not in the dataset"
            continue
        if entry is not None and not isinstance(entry, Mapping):
            raise ModelConfigError(f"encoders.{m}: must be a mapping of encoder config keys, got "
                                   f"{type(entry).__name__} {entry!r}")
        entry = dict(entry or {})
        spec = meta_modalities[m]
        kind = spec.get("kind") if isinstance(spec, Mapping) else None
        foreign = _keys_of_another_kind(entry, kind)
        if foreign:
            dropped[m] = f"its keys ({', '.join(foreign)}) are for another kind of encoder; {m} is {kind} here"
            continue
        given[m] = entry
    return given, dropped


def _common_width(meta_modalities: Mapping[str, Mapping], used: list[str], given: dict[str, dict],
                  feature_dim: int | None) -> int:
    """The width of the automatic entries: ``feature_dim``, else the one width the given entries of
    used modalities agree on, else AUTO_WIDTH."""
    if feature_dim is not None:
        return feature_dim
    widths = set()
    for m in used:
        if m in given:
            try:
                widths.add(encoder_out_dim(meta_modalities[m], given[m]))
            except (KeyError, TypeError, ValueError, IndexError):
                pass   # build_encoder will name what is wrong with it
    return widths.pop() if len(widths) == 1 else AUTO_WIDTH


def _assembled_configs(meta_modalities: Mapping[str, Mapping], used: list[str],
                       given: dict[str, dict], feature_dim: int | None, width: int) -> dict[str, dict]:
    """In the dataset's order: the given entries (a used one without a width key gets the one of
    ``feature_dim``, if set), and an automatic entry of ``width`` for each other used modality."""
    configs = {}
    for m, spec in meta_modalities.items():
        if m in given:
            entry = given[m]
            kind = spec.get("kind") if isinstance(spec, Mapping) else None
            if feature_dim is not None and m in used and kind in _WIDTH_KEY and _WIDTH_KEY[kind] not in entry:
                entry.update(_width_setting(m, kind, entry.get("arch"), feature_dim))
            configs[m] = entry
        elif m in used:
            configs[m] = auto_encoder_config(m, spec, width)
    return configs


def resolve_encoder_configs(meta_modalities: Mapping[str, Mapping], used_modalities: Sequence[str] | None,
                            cfg_encoders: Mapping | None, feature_dim: int | None = None
                            ) -> tuple[dict[str, dict], dict[str, str]]:
    """Fit a run's encoder entries (config key ``encoders``) to a dataset. Pure: nothing is built.

    ``meta_modalities``: the dataset's ``meta["modalities"]`` ({name: spec}); ``used_modalities``:
    the modalities the run trains (``None`` / empty = all of the dataset's); ``cfg_encoders``:
    {name: encoder config}; ``feature_dim``: the feature width the method needs from every encoder
    (CGGM: ``d_model``), or ``None`` where widths are free.

    Returns ``(configs, dropped)``:

    * ``dropped``: {name: why} for the entries that do not fit the dataset, which are left out of
      ``configs`` (the caller warns or refuses): a modality the dataset does not have ("not in the
      dataset"), or an entry written for another kind of encoder (all its keys are those of
      another kind, e.g. a ResNet entry for what is a sequence here; an entry with a key allowed
      for no kind is a typo, kept, and build_encoder refuses it);
    * ``configs``: one entry per used modality, plus the given entries of the dataset's other
      modalities, unchanged. A given entry is kept as it is, except that with ``feature_dim`` its
      width key (``base_width`` / ``d_model`` / ``out_dim`` / ``widths``), when absent, is set to give
      ``feature_dim``. A used modality without an entry (or whose entry was dropped) gets
      :func:`auto_encoder_config` at width ``feature_dim``, else the one width all the kept entries
      of used modalities agree on (so a shared head fits), else :data:`AUTO_WIDTH`.

    ``ModelConfigError`` (one line) for a used modality the dataset lacks, an entry that is not a
    mapping, a kind without an encoder, or a width a kind cannot give.
    """
    cfg_encoders = dict(cfg_encoders or {})
    used = _used_modalities(meta_modalities, used_modalities)
    given, dropped = _given_entries(meta_modalities, cfg_encoders)
    width = _common_width(meta_modalities, used, given, feature_dim)
    return _assembled_configs(meta_modalities, used, given, feature_dim, width), dropped
