"""Batched, per-sample random image augmentation that runs on the device (GAAL / DVM pipeline).

The released DVM pipeline (the MMCL/TIP lineage that GAAL's DVM loader follows) is, per image,
in this order::

    with probability p = 0.95 (else: Resize(size) only, which is the identity on 128x128 DVM):
        RandomApply([ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8)], p=0.8)
        RandomGrayscale(p=0.2)
        RandomApply([GaussianBlur(kernel_size=29, sigma=(0.1, 2.0))], p=0.5)
        RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(3/4, 4/3))
        RandomHorizontalFlip(p=0.5)

applied by the dataset to ``read_image(path) / 255`` (float images in [0, 1], so nothing is
quantised between the steps). :class:`ImageAugment` reproduces it on a whole ``(B, 3, H, W)``
batch at once, with every random parameter drawn per sample as a tensor, without a Python loop
over samples and without host synchronisation (no ``.item()``, no data-dependent branches).

Semantic choices (read these before changing the defaults)
----------------------------------------------------------
* **ColorJitter(0.8).** ``torchvision.transforms.ColorJitter(0.8)`` would set *only*
  brightness (its signature is ``(brightness=0, contrast=0, saturation=0, hue=0)``). The DVM
  recipe's "ColorJitter(0.8)" is shorthand: every released DVM pipeline of this lineage writes
  ``ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8)`` -- three factors, **no hue**
  (unlike SimCLR's ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)``). The default is therefore
  ``jitter=(0.8, 0.8, 0.8, 0.0)``; the four factors are configurable (a number ``v`` means
  torchvision's ``[max(0, 1 - v), 1 + v]`` for brightness/contrast/saturation and ``[-v, v]``
  for hue; a pair ``[lo, hi]`` is taken as the range itself). A factor of 0 disables that op.
* **Jitter order.** torchvision applies the enabled jitter ops in a random order per call
  (``randperm``). This is reproduced per sample (``jitter_random_order=True``, default): the ops
  run along a fixed *supersequence* that contains every permutation of the enabled ops as a
  subsequence (length 3/7/12 for 2/3/4 ops; hue occurs twice in the 12-long one), and each
  sample enables, at each position, only the op that its own permutation needs next (greedy
  leftmost embedding, vectorised over the batch). Disabled positions are exact identities.
  ``jitter_random_order=False`` uses the fixed order brightness, contrast, saturation, hue (one
  pass each; cheaper, slightly different distribution).
* **Jitter maths** follow torchvision on float images: brightness ``clamp(f x)``; contrast
  ``clamp(f x + (1 - f) mean(gray(x)))`` with the mean over the whole image; saturation
  ``clamp(f x + (1 - f) gray(x))``; gray = ITU-R 601-2 luma ``0.2989 R + 0.587 G + 0.114 B``.
* **Hue** goes through RGB -> HSV -> RGB in torch (not a YIQ rotation): that is what
  torchvision's ``adjust_hue`` does, so the result matches it to float precision, whereas a YIQ
  rotation changes luma and saturation differently and only approximates it. It is the costly
  op, and it is off by default (see above).
* **Grayscale**: three equal channels holding the luma above.
* **GaussianBlur**: kernel ``exp(-i^2 / (2 sigma^2))``, ``i = -(k-1)/2 .. (k-1)/2``, normalised,
  sigma ~ U(blur_sigma) per sample, reflect padding, applied separably as two grouped (depthwise)
  convolutions with one kernel per sample; a sample that is not blurred gets a delta kernel
  (exactly the identity).
* **RandomResizedCrop** uses torchvision's sampler, vectorised: 10 candidate (scale, log-ratio)
  draws per sample, the first valid one is taken (``w = round(sqrt(A s r))``,
  ``h = round(sqrt(A s / r))``, ``0 < w <= W``, ``0 < h <= H``; top/left uniform integers),
  otherwise torchvision's centre-crop fallback. The crop is resampled bilinearly with
  ``align_corners=False`` with source coordinates clamped *inside the crop* (exactly
  "crop, then resize"); the horizontal flip reverses the output column coordinates, so crop,
  resize and flip are one ``grid_sample``. No antialiasing: identical to torchvision whenever the
  crop is not larger than the output (always so for DVM, 128 -> 128); a crop larger than the
  output (inputs larger than ``size``) is downsampled without torchvision's antialias filter.
* **p = 0.95** is read as in the released loader: with probability ``p`` a sample gets the whole
  pipeline *including* RandomResizedCrop and the flip; otherwise it is only resized to ``size``
  (the identity when the input already has that size, returned exactly).
* Quantisation happens once, at the end (``round(255 y)`` to uint8), as the released pipeline
  worked in float; with ``float_output=True`` the float result in [0, 1] is returned instead.

Determinism and resume
----------------------
All randomness comes from one ``torch.rand(B, 54)`` draw per call on ``generator`` (or on the
device's default generator when ``generator`` is None). Give it a generator on the same device
as the batches (``torch.Generator(device="cuda")``) so the draw never touches the host; a CPU
generator with CUDA batches works but copies the (B, 54) parameters to the device. The
generator's state is part of the training state: checkpoint ``get_state()`` and restore it with
``set_state()`` (or checkpoint ``generator.get_state()`` yourself when the script owns the
generator) -- otherwise a resumed run sees different augmentations. ``.to(device)`` does not
move the generator.

``forward`` is the identity in ``.eval()`` mode and when ``enabled`` is False (``build_augment``
of None / {}). Imports: torch only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ImageAugment", "build_augment", "AUGMENT_DEFAULTS", "JITTER_SUPERSEQUENCES"]

# Defaults = the released DVM pipeline (see the module docstring).
AUGMENT_DEFAULTS: dict[str, Any] = {
    "p": 0.95,
    "size": 128,
    "scale": (0.6, 1.0),
    "ratio": (3.0 / 4.0, 4.0 / 3.0),
    "jitter": (0.8, 0.8, 0.8, 0.0),
    "jitter_p": 0.8,
    "jitter_random_order": True,
    "gray_p": 0.2,
    "blur_kernel": 29,
    "blur_sigma": (0.1, 2.0),
    "blur_p": 0.5,
    "hflip_p": 0.5,
    "float_output": False,
    "enabled": True,
}

# Shortest sequences over n symbols containing every permutation of range(n) as a subsequence
# (found by exhaustive search; the last symbol -- hue when enabled -- occurs least often).
JITTER_SUPERSEQUENCES: dict[int, tuple[int, ...]] = {
    1: (0,),
    2: (0, 1, 0),
    3: (0, 1, 0, 2, 0, 1, 0),
    4: (0, 1, 2, 3, 0, 1, 2, 0, 3, 1, 0, 2),
}

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision
_CROP_TRIES = 10
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")

# Columns of the per-call uniform draw u (B, _NCOL).
_C_APPLY, _C_JIT, _C_FACT, _C_ORDER, _C_GRAY, _C_BLUR, _C_SIGMA, _C_FLIP = 0, 1, 2, 6, 10, 11, 12, 13
_C_SCALE = 14
_C_RATIO = _C_SCALE + _CROP_TRIES
_C_TOP = _C_RATIO + _CROP_TRIES
_C_LEFT = _C_TOP + _CROP_TRIES
_NCOL = _C_LEFT + _CROP_TRIES  # 54


def _pair(v: Any, name: str) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return float(v), float(v)
    v = tuple(float(a) for a in v)
    if len(v) != 2 or v[0] > v[1]:
        raise ValueError(f"{name} must be a number or an increasing pair, got {v}")
    return v


def _jitter_range(v: Any, i: int) -> tuple[float, float] | None:
    """torchvision's ColorJitter._check_input: None when the op is a no-op."""
    name = _JITTER_NAMES[i]
    centre = 0.0 if i == 3 else 1.0
    if isinstance(v, (int, float)):
        if v < 0:
            raise ValueError(f"jitter {name} must be non-negative, got {v}")
        lo, hi = (-float(v), float(v)) if i == 3 else (max(0.0, 1.0 - v), 1.0 + float(v))
    else:
        lo, hi = _pair(v, f"jitter {name}")
    if i == 3 and not (-0.5 <= lo <= hi <= 0.5):
        raise ValueError(f"jitter hue range must lie in [-0.5, 0.5], got {(lo, hi)}")
    if i < 3 and lo < 0:
        raise ValueError(f"jitter {name} range must be non-negative, got {(lo, hi)}")
    if lo == hi == centre:
        return None
    return lo, hi


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """clamp(f x + (1 - f) other) with a per-sample factor f (B,)."""
    f = f.view(-1, 1, 1, 1)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def _adjust(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness: blend with black
        return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == 1:  # contrast: blend with the mean luma of the image
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: blend with the luma image
        return _blend(x, _gray(x), f)
    return _shift_hue(x, f)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue += shift (per sample, in turns), HSV -> RGB. x in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    h = torch.where(
        maxc == r,
        ((g - b) / d).remainder(6.0),
        torch.where(maxc == g, (b - r) / d + 2.0, (r - g) / d + 4.0),
    )
    h = torch.where(flat, torch.zeros_like(h), h)  # sixths of a turn, in [0, 6)
    h = (h + 6.0 * shift.view(-1, 1, 1)).remainder(6.0)
    vs = maxc * s
    out = []
    for n in (5.0, 3.0, 1.0):  # r, g, b: v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6
        k = (h + n).remainder(6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


class ImageAugment(nn.Module):
    """Per-sample random augmentation of a uint8 (B, 3, H, W) batch on its own device.

    ``forward(x)`` -> uint8 ``(B, 3, S, S)`` (``S = size``; ``size=None`` keeps ``(H, W)``), or
    float in [0, 1] with ``float_output=True`` or a floating input (taken to be in [0, 1]).
    ``sample_params`` and ``apply_params`` split the two halves (drawing, then a deterministic
    function of the parameters) for tests and for applying one draw to several tensors.
    """

    def __init__(
        self,
        p: float = AUGMENT_DEFAULTS["p"],
        size: int | Sequence[int] | None = AUGMENT_DEFAULTS["size"],
        scale: Sequence[float] = AUGMENT_DEFAULTS["scale"],
        ratio: Sequence[float] = AUGMENT_DEFAULTS["ratio"],
        jitter: Sequence[Any] = AUGMENT_DEFAULTS["jitter"],
        jitter_p: float = AUGMENT_DEFAULTS["jitter_p"],
        jitter_random_order: bool = AUGMENT_DEFAULTS["jitter_random_order"],
        gray_p: float = AUGMENT_DEFAULTS["gray_p"],
        blur_kernel: int = AUGMENT_DEFAULTS["blur_kernel"],
        blur_sigma: Sequence[float] | float = AUGMENT_DEFAULTS["blur_sigma"],
        blur_p: float = AUGMENT_DEFAULTS["blur_p"],
        hflip_p: float = AUGMENT_DEFAULTS["hflip_p"],
        float_output: bool = AUGMENT_DEFAULTS["float_output"],
        enabled: bool = AUGMENT_DEFAULTS["enabled"],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("p", p), ("jitter_p", jitter_p), ("gray_p", gray_p),
                        ("blur_p", blur_p), ("hflip_p", hflip_p)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        self.p, self.jitter_p, self.gray_p = float(p), float(jitter_p), float(gray_p)
        self.blur_p, self.hflip_p = float(blur_p), float(hflip_p)
        if size is None:
            self.size: tuple[int, int] | None = None
        elif isinstance(size, int):
            self.size = (size, size)
        else:
            self.size = (int(size[0]), int(size[1]))
        self.scale = _pair(scale, "scale")
        self.ratio = _pair(ratio, "ratio")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        jitter = list(jitter)
        if len(jitter) != 4:
            raise ValueError(f"jitter takes 4 factors (brightness, contrast, saturation, hue), got {jitter}")
        self.jitter_ranges = [_jitter_range(v, i) for i, v in enumerate(jitter)]
        self.jitter_ops = [i for i, r in enumerate(self.jitter_ranges) if r is not None]
        self.jitter_random_order = bool(jitter_random_order)
        n = len(self.jitter_ops)
        if n == 0:
            self._jitter_seq: tuple[int, ...] = ()
        elif self.jitter_random_order:
            self._jitter_seq = JITTER_SUPERSEQUENCES[n]
        else:
            self._jitter_seq = tuple(range(n))
        blur_kernel = int(blur_kernel)
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {blur_kernel}")
        self.blur_kernel = blur_kernel
        self.blur_sigma = _pair(blur_sigma, "blur_sigma")
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        self.float_output = bool(float_output)
        self.enabled = bool(enabled)
        self.generator = generator

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """What a checkpoint must hold for an exact resume (the generator's state)."""
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        g = state.get("generator")
        if g is None:
            return
        if self.generator is None:
            raise ValueError("set_state: the checkpoint holds a generator state but this "
                             "ImageAugment has no generator")
        self.generator.set_state(g)

    def extra_repr(self) -> str:
        return (f"enabled={self.enabled}, p={self.p}, size={self.size}, scale={self.scale}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, jitter={self.jitter_ranges}, "
                f"jitter_p={self.jitter_p}, random_order={self.jitter_random_order}, "
                f"gray_p={self.gray_p}, blur=({self.blur_kernel}, {self.blur_sigma}, p={self.blur_p}), "
                f"hflip_p={self.hflip_p}, float_output={self.float_output}")

    # ------------------------------------------------------------------ sampling
    def sample_params(self, batch: int, height: int, width: int,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Draw every per-sample parameter as a tensor (one uniform draw, no host sync)."""
        g = self.generator
        draw_device = g.device if g is not None else torch.device(device if device is not None else "cpu")
        u = torch.rand((batch, _NCOL), generator=g, device=draw_device)
        if device is not None and u.device != torch.device(device):
            u = u.to(device, non_blocking=True)
        H, W = height, width

        apply = u[:, _C_APPLY] < self.p
        jit = apply & (u[:, _C_JIT] < self.jitter_p)
        factors = torch.zeros(batch, 4, device=u.device)
        for i, rng in enumerate(self.jitter_ranges):
            neutral = 0.0 if i == 3 else 1.0
            if rng is None:
                factors[:, i] = neutral
            else:
                factors[:, i] = rng[0] + (rng[1] - rng[0]) * u[:, _C_FACT + i]
        n = len(self.jitter_ops)
        if n and self.jitter_random_order:  # a random permutation of 0..n-1 per sample
            order = torch.argsort(u[:, _C_ORDER:_C_ORDER + n], dim=1)
        else:
            order = torch.arange(n, device=u.device).expand(batch, n)
        gray = apply & (u[:, _C_GRAY] < self.gray_p)
        blur = apply & (u[:, _C_BLUR] < self.blur_p)
        s0, s1 = self.blur_sigma
        sigma = s0 + (s1 - s0) * u[:, _C_SIGMA]
        flip = apply & (u[:, _C_FLIP] < self.hflip_p)

        # RandomResizedCrop: 10 candidates per sample, the first valid one wins.
        area = float(H * W)
        s_lo, s_hi = self.scale
        target = area * (s_lo + (s_hi - s_lo) * u[:, _C_SCALE:_C_SCALE + _CROP_TRIES])
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lr0 + (lr1 - lr0) * u[:, _C_RATIO:_C_RATIO + _CROP_TRIES])
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        valid = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
        ctop = torch.floor(u[:, _C_TOP:_C_TOP + _CROP_TRIES] * (H - ch + 1)).clamp_(min=0).minimum(H - ch)
        cleft = torch.floor(u[:, _C_LEFT:_C_LEFT + _CROP_TRIES] * (W - cw + 1)).clamp_(min=0).minimum(W - cw)
        first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)
        found = valid.any(dim=1)
        in_ratio = W / H  # torchvision's fallback: a centre crop at the nearest allowed ratio
        if in_ratio < self.ratio[0]:
            fw, fh = W, int(round(W / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(H * self.ratio[1])), H
        else:
            fw, fh = W, H
        fallback = ((H - fh) // 2, (W - fw) // 2, fh, fw)
        full = (0, 0, H, W)  # outside the pipeline: the whole image, i.e. Resize(size) only
        crop = torch.stack([
            torch.where(apply, torch.where(found, t.gather(1, first).squeeze(1), float(fb)), float(fu))
            for t, fb, fu in zip((ctop, cleft, ch, cw), fallback, full)
        ], dim=1)  # (B, 4): top, left, height, width (integer-valued floats)
        return {"apply": apply, "jitter": jit, "factors": factors, "order": order, "gray": gray,
                "blur": blur, "sigma": sigma, "flip": flip, "crop": crop}

    # ------------------------------------------------------------------ application
    def _jitter(self, x: torch.Tensor, jit: torch.Tensor, factors: torch.Tensor,
                order: torch.Tensor) -> torch.Tensor:
        n = len(self.jitter_ops)
        ptr = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for sym in self._jitter_seq:
            op = self.jitter_ops[sym]
            want = order.gather(1, ptr.clamp(max=n - 1)[:, None]).squeeze(1)
            active = jit & (ptr < n) & (want == sym)
            ptr = ptr + active.long()
            if op == 3:
                x = torch.where(active.view(-1, 1, 1, 1), _shift_hue(x, factors[:, 3]), x)
            else:  # neutral factor 1 -> exactly x (values already lie in [0, 1])
                x = _adjust(x, op, torch.where(active, factors[:, op], torch.ones_like(factors[:, op])))
        return x

    def _blur(self, x: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        k = self.blur_kernel
        half = (k - 1) // 2
        t = torch.arange(k, device=x.device, dtype=x.dtype) - half
        ker = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
        ker = ker / ker.sum(dim=1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(B, k)
        ker = torch.where(blur[:, None], ker, delta)
        ker = ker[:, None, :].expand(B, C, k).reshape(B * C, k)  # one kernel per (sample, channel)
        y = x.reshape(1, B * C, H, W)
        y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), ker.view(B * C, 1, 1, k), groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), ker.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)

    def _resample(self, x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor,
                  out_hw: tuple[int, int]) -> torch.Tensor:
        """Crop (top, left, h, w), resize to out_hw (bilinear, clamped inside the crop), flip."""
        B, _, H, W = x.shape
        So_h, So_w = out_hw
        top, left, ch, cw = crop.to(x.dtype).unbind(1)

        def coords(n_out: int, start: torch.Tensor, length: torch.Tensor, n_in: int) -> torch.Tensor:
            o = torch.arange(n_out, device=x.device, dtype=x.dtype)
            src = (o[None, :] + 0.5) * (length[:, None] / n_out) - 0.5
            src = torch.minimum(src.clamp(min=0.0), length[:, None] - 1.0) + start[:, None]
            return (2.0 * src + 1.0) / n_in - 1.0  # grid_sample, align_corners=False

        gx = coords(So_w, left, cw, W)
        gx = torch.where(flip[:, None], gx.flip(1), gx)
        gy = coords(So_h, top, ch, H)
        grid = torch.stack((gx[:, None, :].expand(B, So_h, So_w),
                            gy[:, :, None].expand(B, So_h, So_w)), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def apply_params(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The deterministic half: augment x (B, 3, H, W) with drawn parameters."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ImageAugment expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        is_uint8 = x.dtype == torch.uint8
        if not (is_uint8 or x.is_floating_point()):
            raise ValueError(f"ImageAugment expects uint8 or floating images in [0, 1], got {x.dtype}")
        xf = x.float().div_(255.0) if is_uint8 else x.float()
        B, _, H, W = x.shape
        out_hw = self.size if self.size is not None else (H, W)
        y = xf
        if self._jitter_seq:
            y = self._jitter(y, params["jitter"], params["factors"], params["order"])
        if self.gray_p > 0:
            y = torch.where(params["gray"].view(-1, 1, 1, 1), _gray(y).expand(B, 3, H, W), y)
        if self.blur_p > 0 and self.blur_kernel > 1:
            y = self._blur(y, params["blur"], params["sigma"])
        y = self._resample(y, params["crop"], params["flip"], out_hw)
        if out_hw == (H, W):  # samples outside the pipeline are returned exactly
            y = torch.where(params["apply"].view(-1, 1, 1, 1), y, xf)
        if not is_uint8:
            return y.to(x.dtype)
        if self.float_output:
            return y
        return y.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.enabled:
            return x
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3], device=x.device)
        return self.apply_params(x, params)


_CFG_KEYS = ("p", "size", "scale", "ratio", "jitter", "jitter_p", "jitter_random_order", "gray_p",
             "blur_kernel", "blur_sigma", "blur_p", "hflip_p", "float_output", "enabled")


def build_augment(cfg: Mapping[str, Any] | None,
                  generator: torch.Generator | None = None) -> ImageAugment:
    """Config dict -> :class:`ImageAugment`. None or {} gives a disabled (identity) module.

    Keys (defaults = the released DVM pipeline, ``AUGMENT_DEFAULTS``): p, size, scale, ratio,
    jitter (4 factors: brightness, contrast, saturation, hue), jitter_p, jitter_random_order,
    gray_p, blur_kernel, blur_sigma, blur_p, hflip_p, float_output, enabled.
    """
    if not cfg:
        return ImageAugment(enabled=False, generator=generator)
    unknown = sorted(set(cfg) - set(_CFG_KEYS))
    if unknown:
        raise ValueError(f"unknown augment config keys {unknown}; known: {list(_CFG_KEYS)}")
    return ImageAugment(**dict(cfg), generator=generator)
