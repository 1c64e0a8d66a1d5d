"""Tests for models/augment.py (batched on-device image augmentation). CPU, fast."""

import itertools
import time

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from models.augment import (
    AUGMENT_DEFAULTS,
    JITTER_SUPERSEQUENCES,
    LUMA,
    ImageAugment,
    build_augment,
)

torch.set_num_threads(2)

H, W = 40, 48  # non-square on purpose: catches height/width mix-ups


def _images(b=6, h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content plus noise so that every op visibly changes something
    base = torch.rand(b, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    x = (x * 0.8 + 0.2 * torch.rand(b, 3, h, w, generator=g)) * 255
    return x.round().clamp(0, 255).to(torch.uint8)


def _aug(**kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return ImageAugment(**kw).train()


def _off(**kw):
    """Every op switched off (the crop sampler always picks the full H x W image: scale 1 at
    the image's own aspect ratio); turn single ones on through kw."""
    base = dict(p=1.0, size=None, scale=(1.0, 1.0), ratio=(W / H, W / H), jitter=(0, 0, 0, 0), jitter_p=0.0,
                gray_p=0.0, blur_p=0.0, hflip_p=0.0)
    base.update(kw)
    return _aug(**base)


def _neutral_params(a, x, **over):
    """Parameters under which every op runs but does nothing; override single entries."""
    B, _, h, w = x.shape
    t = torch.ones(B, dtype=torch.bool)
    p = {"apply": t, "jitter": t.clone(), "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(B, 1),
         "order": torch.arange(len(a.jitter_ops)).repeat(B, 1), "gray": ~t, "blur": ~t,
         "sigma": torch.full((B,), 1.0), "flip": ~t,
         "crop": torch.tensor([[0.0, 0.0, h, w]]).repeat(B, 1)}
    p.update(over)
    return p


def _levels(y):
    return y.float() if y.dtype == torch.uint8 else y.float() * 255


def _max_level_diff(a, b):
    return (_levels(a) - _levels(b)).abs().max().item()


# ---------------------------------------------------------------- API, shapes, identity
def test_shape_dtype_and_sizes():
    x = _images(4)
    y = _aug(size=32)(x)
    assert y.shape == (4, 3, 32, 32) and y.dtype == torch.uint8
    y = _aug(size=(24, 36))(x)
    assert y.shape == (4, 3, 24, 36)
    y = _aug(size=None)(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    yf = _aug(size=None, float_output=True)(x)
    assert yf.dtype == torch.float32 and 0 <= yf.min() and yf.max() <= 1
    yf = _aug(size=None)(x.float() / 255)  # float input -> float output
    assert yf.dtype == torch.float32 and yf.shape == x.shape
    with pytest.raises(ValueError):
        _aug()(x[:, :1])
    with pytest.raises(ValueError):
        _aug()(x.long())


def test_defaults_are_the_released_dvm_pipeline():
    a = build_augment(dict(AUGMENT_DEFAULTS))
    assert a.enabled and a.p == 0.95 and a.size == (128, 128) and a.scale == (0.6, 1.0)
    assert a.jitter_ranges[:3] == [(pytest.approx(0.2), 1.8)] * 3 and a.jitter_ranges[3] is None
    assert a.jitter_ops == [0, 1, 2] and a.gray_p == 0.2 and a.blur_kernel == 29 and a.blur_p == 0.5


def test_identity_when_eval_disabled_or_p0():
    x = _images(5)
    a = _aug()
    assert torch.equal(a.eval()(x), x)
    for cfg in (None, {}):
        b = build_augment(cfg).train()
        assert not b.enabled and b(x) is x
    assert torch.equal(_aug(p=0.0, size=None)(x), x)
    xf = x.float() / 255
    assert torch.equal(_aug(p=0.0, size=None)(xf), xf)
    with pytest.raises(ValueError, match="unknown augment config keys"):
        build_augment({"p": 0.5, "colour": 1})


def test_all_ops_forced_on_with_neutral_parameters_is_identity():
    x = _images(6)
    # config level: every stage active for every sample, neutral ranges -> exact
    a = _off(jitter_p=1.0, jitter=((1, 1), (1, 1), (1, 1), (0, 0)))
    assert torch.equal(a(x), x)
    # parameter level: every op (all four jitter ops incl. the HSV round trip, grayscale
    # stage, blur with a delta, full crop, flip stage) really runs with neutral values
    a = _off(jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.5, blur_p=0.5, hflip_p=0.5)
    y = a.apply_params(x, _neutral_params(a, x))
    assert _max_level_diff(y, x) <= 1
    # a tiny sigma is a delta too
    y = a.apply_params(x, _neutral_params(a, x, blur=torch.ones(6, dtype=torch.bool),
                                          sigma=torch.full((6,), 0.1)))
    assert _max_level_diff(y, x) <= 1


def test_deterministic_per_seed_and_state_resume():
    x = _images(8)
    y1 = _aug(generator=torch.Generator().manual_seed(7))(x)
    y2 = _aug(generator=torch.Generator().manual_seed(7))(x)
    y3 = _aug(generator=torch.Generator().manual_seed(8))(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # get_state / set_state: an exact resume
    a = _aug(generator=torch.Generator().manual_seed(3))
    a(x)
    state = a.get_state()
    after = [a(x), a(x)]
    b = _aug(generator=torch.Generator().manual_seed(999))
    b.set_state(state)
    assert all(torch.equal(u, b(x)) for u in after)


def test_samples_get_different_parameters():
    B = 256
    a = _aug(jitter=(0.8, 0.8, 0.8, 0.2))
    p = a.sample_params(B, 128, 128)
    for k in ("apply", "jitter", "gray", "blur", "flip"):
        assert 0 < p[k].sum() < B, k
    assert p["factors"][:, :4].unique(dim=0).shape[0] == B
    assert p["sigma"].unique().numel() == B
    assert p["crop"].unique(dim=0).shape[0] > B // 2
    assert p["order"].unique(dim=0).shape[0] == 24  # all permutations of the 4 jitter ops occur
    # frequencies (loose bounds)
    p = a.sample_params(20000, 128, 128)
    assert abs(p["apply"].float().mean() - 0.95) < 0.01
    assert abs(p["jitter"].float().mean() - 0.95 * 0.8) < 0.015
    assert abs(p["gray"].float().mean() - 0.95 * 0.2) < 0.015
    assert abs(p["blur"].float().mean() - 0.95 * 0.5) < 0.015
    assert abs(p["flip"].float().mean() - 0.95 * 0.5) < 0.015
    # one image repeated: every output differs from the others
    x = _images(1).expand(16, -1, -1, -1).contiguous()
    y = _aug(p=1.0, size=None)(x).flatten(1)
    assert y.unique(dim=0).shape[0] == 16


# ---------------------------------------------------------------- single ops
def test_hflip_alone_equals_torch_flip():
    x = _images(6)
    a = _off(hflip_p=1.0)
    assert torch.equal(a(x), torch.flip(x, dims=[-1]))
    a = _off(hflip_p=0.5)
    p = a.sample_params(6, H, W)
    y = a.apply_params(x, p)
    ref = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.equal(y, ref)


def test_grayscale_alone():
    x = _images(6)
    y = _off(gray_p=1.0)(x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    xf = x.float()
    luma = xf[:, 0] * LUMA[0] + xf[:, 1] * LUMA[1] + xf[:, 2] * LUMA[2]
    assert (y[:, 0].float() - luma).abs().max() <= 0.5 + 1e-3
    ref = TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3)
    assert _max_level_diff(y, ref) <= 0.5 + 1e-3


def test_blur_constant_image_and_vs_torchvision():
    x = torch.full((3, 3, H, W), 173, dtype=torch.uint8)
    x[1] = 0
    x[2] = 255
    a = _off(blur_p=1.0, blur_kernel=29, blur_sigma=(0.1, 2.0))
    assert torch.equal(a(x), x)
    # per-sample sigma against torchvision's gaussian_blur (float, reflect padding)
    x = _images(4)
    a = _off(blur_p=1.0, blur_kernel=29, float_output=True)
    p = a.sample_params(4, H, W)
    y = a.apply_params(x, p)
    for b in range(4):
        s = float(p["sigma"][b])
        ref = TF.gaussian_blur(x[b].float() / 255, kernel_size=[29, 29], sigma=[s, s])
        torch.testing.assert_close(y[b], ref, atol=2e-6, rtol=0)


def test_crop_identity_fallback_and_vs_torchvision():
    x = _images(4, 32, 32)
    a = _aug(p=1.0, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=(0, 0, 0, 0), gray_p=0, blur_p=0,
             hflip_p=0)
    assert torch.equal(a(x), x)
    # no candidate is valid -> torchvision's centre-crop fallback (ratio 2..3 on a square)
    b = _aug(p=1.0, size=32, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    fallback = torch.tensor([[8.0, 0.0, 16.0, 32.0]]).repeat(5, 1)
    assert torch.equal(b.sample_params(5, 32, 32)["crop"], fallback)
    # crop, resize, flip == torchvision resized_crop (+ hflip) on float images
    x = _images(4)
    c = _off(size=(36, 44), float_output=True)
    crops = torch.tensor([[3.0, 5.0, 30.0, 40.0], [0.0, 0.0, 40.0, 48.0], [10.0, 20.0, 17.0, 23.0],
                          [39.0, 47.0, 1.0, 1.0]])
    flips = torch.tensor([False, True, True, False])
    y = c.apply_params(x, _neutral_params(c, x, crop=crops, flip=flips))
    for b in range(4):
        t, l, h, w = (int(v) for v in crops[b])
        # the crop of sample 1 is larger than the output: documented, no antialias filter there
        ref = TF.resized_crop(x[b].float() / 255, t, l, h, w, size=[36, 44], antialias=b != 1)
        if flips[b]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=0)


def test_crop_sampler_statistics():
    a = _aug(p=1.0, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))
    c = a.sample_params(4000, 128, 128)["crop"]
    top, left, h, w = c.unbind(1)
    assert torch.equal(c, c.round()) and (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 128).all() and (left + w <= 128).all()
    frac = h * w / 128 ** 2
    assert frac.min() > 0.58 and frac.max() <= 1.0
    assert (w / h).min() > 0.74 and (w / h).max() < 1.35
    assert top.float().std() > 3 and left.float().std() > 3  # positions vary


# ---------------------------------------------------------------- colour jitter vs torchvision
@pytest.mark.parametrize("op,fn,f", [
    (0, TF.adjust_brightness, 1.63), (0, TF.adjust_brightness, 0.31),
    (1, TF.adjust_contrast, 1.7), (1, TF.adjust_contrast, 0.25),
    (2, TF.adjust_saturation, 1.8), (2, TF.adjust_saturation, 0.4),
    (3, TF.adjust_hue, 0.17), (3, TF.adjust_hue, -0.2),
])
def test_jitter_ops_match_torchvision(op, fn, f):
    x = _images(3)
    a = _off(jitter=(0.8, 0.8, 0.8, 0.2), float_output=True)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(3, 1)
    factors[1, op] = f
    jit = torch.tensor([False, True, False])
    y = a.apply_params(x, _neutral_params(a, x, factors=factors, jitter=jit))
    ref_f = fn(x[1].float() / 255, f)
    torch.testing.assert_close(y[1], ref_f, atol=2e-5 if op == 3 else 1e-6, rtol=0)
    assert _max_level_diff(y[[0, 2]], x[[0, 2]]) <= 1e-3  # the other samples untouched
    # uint8 in/out against torchvision's own uint8 path: within one level
    a.float_output = False
    y8 = a.apply_params(x, _neutral_params(a, x, factors=factors, jitter=jit))
    assert _max_level_diff(y8[1], fn(x[1], f)) <= 1
    assert torch.equal(y8[[0, 2]], x[[0, 2]])


def test_supersequences_contain_every_permutation():
    for n, seq in JITTER_SUPERSEQUENCES.items():
        for perm in itertools.permutations(range(n)):
            k = 0
            for s in seq:
                k += k < n and s == perm[k]
            assert k == n, (n, perm)


@pytest.mark.parametrize("random_order", [True, False])
def test_jitter_order_per_sample_matches_sequential_torchvision(random_order):
    B = 12
    x = _images(B)
    a = _off(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.9, float_output=True, jitter_random_order=random_order)
    p = a.sample_params(B, H, W)
    assert p["jitter"].any()
    y = a.apply_params(x, p)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for b in range(B):
        ref = x[b].float() / 255
        if p["jitter"][b]:
            for sym in p["order"][b].tolist():
                ref = fns[sym](ref, float(p["factors"][b, sym]))
        torch.testing.assert_close(y[b], ref, atol=5e-5, rtol=0)
    if not random_order:
        assert (p["order"] == torch.arange(4)).all()


def test_full_pipeline_matches_composition_of_single_ops():
    """The whole pipeline on drawn parameters equals the torchvision ops chained by hand."""
    B = 8
    x = _images(B)
    a = _aug(p=0.9, size=(H, W), jitter=(0.8, 0.8, 0.8, 0.1), jitter_p=0.8, gray_p=0.3, blur_p=0.5,
             hflip_p=0.5, float_output=True, generator=torch.Generator().manual_seed(5))
    p = a.sample_params(B, H, W)
    y = a.apply_params(x, p)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for b in range(B):
        r = x[b].float() / 255
        if p["jitter"][b]:
            for sym in p["order"][b].tolist():
                r = fns[sym](r, float(p["factors"][b, sym]))
        if p["gray"][b]:
            r = TF.rgb_to_grayscale(r, num_output_channels=3)
        if p["blur"][b]:
            s = float(p["sigma"][b])
            r = TF.gaussian_blur(r, kernel_size=[29, 29], sigma=[s, s])
        t, l, h, w = (int(v) for v in p["crop"][b])
        r = TF.resized_crop(r, t, l, h, w, size=[H, W], antialias=True)
        if p["flip"][b]:
            r = TF.horizontal_flip(r)
        torch.testing.assert_close(y[b], r, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [dict(jitter=(0.8, 0.8, 0.8, 0.2)), dict(), dict(p=0.95)],
                         ids=["with hue", "defaults (DVM)", "p=0.95 (GAAL's DVM recipe)"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_no_host_sync_and_matches_cpu(recipe, channels_last):
    """On CUDA (also on a channels_last batch, as GAAL/IGM feed with --channels_last true): no host
    sync, the same parameters applied on the CPU give the same images (within one uint8 level), and
    the same device generator seed gives the same batch twice."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x = _images(32, 128, 128)
    a = _aug(**recipe, generator=torch.Generator(device="cuda").manual_seed(0))
    xc = x.cuda()
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
    a(xc)  # warm-up (cuDNN / kernel selection)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = a.sample_params(32, 128, 128, device=xc.device)
        y = a.apply_params(xc, p)
        a(xc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.is_cuda and y.dtype == torch.uint8
    cpu = {k: v.cpu() for k, v in p.items()}
    assert _max_level_diff(y.cpu(), a.apply_params(x, cpu)) <= 1
    again = _aug(**recipe, generator=torch.Generator(device="cuda").manual_seed(0))
    first, second = _aug(**recipe, generator=torch.Generator(device="cuda").manual_seed(0))(xc), again(xc)
    assert torch.equal(first, second)


# ---------------------------------------------------------------- benchmark
BENCH_BATCH, BENCH_BUDGET_S = (256, 3, 128, 128), 30.0   # DVM's batch; ~1-3 s on 2 CPU threads


@pytest.mark.slow
def test_benchmark_cpu_batch(capsys):
    """Times one DVM-sized uint8 batch through the default recipe and with hue jitter (printed), and
    checks that what was timed is the augmentation: the recipe's uint8 (B, 3, 128, 128) batch, not the
    input returned as is, different with hue jitter on, within a budget of
    ~10x the time measured here (a per-sample Python loop would blow it)."""
    x = torch.randint(0, 256, BENCH_BATCH, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, kw in (("defaults (DVM)", {}), ("with hue 0.2", {"jitter": (0.8, 0.8, 0.8, 0.2)})):
        a = _aug(**kw)
        a(x[:8])   # warm-up
        t0 = time.perf_counter()
        outputs[name] = a(x)
        dt = time.perf_counter() - t0
        with capsys.disabled():
            print(f"\n[augment benchmark] {name}: {dt * 1e3:.0f} ms per {'x'.join(map(str, BENCH_BATCH))} batch "
                  f"(CPU, {torch.get_num_threads()} threads)")
        assert outputs[name].shape == BENCH_BATCH and outputs[name].dtype == torch.uint8, name
        assert 0 < dt < BENCH_BUDGET_S, f"{name}: {dt:.1f} s"
    plain, hue = outputs.values()
    changed = float((plain != x).flatten(1).any(1).float().mean())
    assert changed > 0.9, f"only {changed:.0%} of the images changed"   # p = 0.95 per sample; the crop alone moves pixels
    assert not torch.equal(plain, hue), "hue jitter changed nothing"
