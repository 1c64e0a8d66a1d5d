"""Tests for models/ (encoders, heads). CPU, fast."""

import resource

import pytest
import torch
import torch.nn as nn
import torchvision

from models import (
    ENCODER_DEFAULTS,
    FeatureMLP,
    FramesEncoder,
    FusionTransformer,
    IGMHead,
    ImageEncoder,
    LateFusionHeads,
    LinearHead,
    ModalityClassifier,
    ModelConfigError,
    ResidualHead,
    ResNet,
    SequenceEncoder,
    SpectrogramEncoder,
    TabularMLP,
    VolumeEncoder,
    build_encoder,
    load_pretrained,
    resnet18,
    resnet50,
)
from models import encoders

torch.set_num_threads(2)

TV = {"resnet18": (torchvision.models.resnet18, resnet18),
      "resnet50": (torchvision.models.resnet50, resnet50)}


def _tv(arch, seed=0):
    torch.manual_seed(seed)
    m = TV[arch][0](weights=None)
    # random BN statistics so that eval-mode outputs really test the running buffers
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def _tv_features(m, x):
    m.fc = nn.Identity()
    with torch.no_grad():
        return m(x)


# ----------------------------------------------------------------------------------- ResNet
@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def tv_model(request):
    return request.param, _tv(request.param)


def test_resnet_state_dict_strict_and_outputs_match_torchvision(tv_model):
    arch, tv = tv_model
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours = TV[arch][1]()
    own = ours.state_dict()
    assert list(own) == list(sd)  # same names, same order
    assert all(own[k].shape == sd[k].shape for k in sd)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    assert isinstance(ours.out_dim, int)
    assert ours.out_dim == (512 if arch == "resnet18" else 2048)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
    ref = _tv_features(_tv(arch), x)
    assert got.shape == (2, ours.out_dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_resnet_init_matches_torchvision_scheme():
    torch.manual_seed(0)
    m = resnet18(base_width=16)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    w = m.layer3[0].conv2.weight  # fan_out = 64 * 9
    assert abs(w.std().item() - (2.0 / (64 * 9)) ** 0.5) < 0.01


def test_load_pretrained_from_file_drops_fc(tmp_path):
    tv = _tv("resnet18", seed=1)
    path = tmp_path / "resnet18.pt"
    torch.save(tv.state_dict(), path)  # includes fc.*
    enc = ImageEncoder("resnet18", in_channels=3, normalize="none")
    assert load_pretrained(enc, str(path)) is enc
    enc.eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        got = enc(x)
    torch.testing.assert_close(got, _tv_features(_tv("resnet18", seed=1), x),
                               rtol=1e-4, atol=1e-5)
    # same through build_encoder's `pretrained` key, also with a wrapped/"module."-prefixed file
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}, wrapped)
    enc2 = build_encoder("img", {"kind": "image", "shape": [3, 48, 48], "dtype": "float32"},
                         {"pretrained": str(wrapped)}).eval()
    with torch.no_grad():
        torch.testing.assert_close(enc2(x), got)


def test_load_pretrained_in_channels_1_sums_rgb():
    tv = _tv("resnet18", seed=2)
    sd = tv.state_dict()
    net = resnet18(in_channels=1)
    load_pretrained(net, sd)
    torch.testing.assert_close(net.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))
    net.eval()
    g = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(net(g), _tv_features(tv, g.repeat(1, 3, 1, 1)),
                                   rtol=1e-4, atol=1e-4)
    spec = SpectrogramEncoder("resnet18")
    load_pretrained(spec, sd)
    torch.testing.assert_close(spec.backbone.conv1.weight, net.conv1.weight)


def test_load_pretrained_errors_list_keys(tmp_path):
    sd = torchvision.models.resnet50(weights=None).state_dict()
    with pytest.raises(ValueError) as ei:
        load_pretrained(resnet18(), sd)
    msg = str(ei.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "layer1.0.conv3.weight" in msg  # an unexpected key is named
    with pytest.raises(FileNotFoundError):
        load_pretrained(resnet18(), str(tmp_path / "nope.pt"))


def test_small_input_keeps_conv1_and_warns():
    sd = torchvision.models.resnet18(weights=None).state_dict()
    net = resnet18(small_input=True)
    assert net.conv1.weight.shape == (64, 3, 3, 3)
    assert isinstance(net.maxpool, nn.Identity)
    before = net.conv1.weight.clone()
    with pytest.warns(UserWarning, match="conv1"):
        load_pretrained(net, sd)
    torch.testing.assert_close(net.conv1.weight, before)
    torch.testing.assert_close(net.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


# ------------------------------------------------------------------------------- encoders
IMG_CFG = {"arch": "resnet18", "base_width": 8, "small_input": True, "normalize": "none"}
SPECS = {
    "image": ({"kind": "image", "shape": [3, 32, 32], "dtype": "uint8"}, IMG_CFG),
    "image_r50": ({"kind": "image", "shape": [3, 32, 32], "dtype": "uint8"},
                  {**IMG_CFG, "arch": "resnet50", "normalize": "imagenet"}),
    "frames": ({"kind": "frames", "shape": [2, 3, 32, 32], "dtype": "uint8"}, IMG_CFG),
    "spectrogram": ({"kind": "spectrogram", "shape": [40, 30], "dtype": "float32"},
                    {"arch": "resnet18", "base_width": 8}),
    "sequence": ({"kind": "sequence", "shape": [10, 12], "dtype": "float32"},
                 {"d_model": 16, "n_layers": 2, "n_heads": 4}),
    "features": ({"kind": "features", "shape": [20], "dtype": "float32"},
                 {"hidden": 32, "out_dim": 24}),
    "tabular": ({"kind": "tabular", "shape": [5], "dtype": "float32",
                 "continuous": ["a", "b", "c"], "categorical": {"color": 4, "fuel": 3}},
                {"hidden": 32, "out_dim": 16}),
    "volume": ({"kind": "volume", "shape": [1, 8, 8, 8], "dtype": "float32"},
               {"widths": [4, 8]}),
    "volume3": ({"kind": "volume", "shape": [8, 8, 8], "dtype": "float32"}, {"widths": [4]}),
}


def _sample(spec, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, *spec["shape"])
    if spec["dtype"] == "uint8":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if spec["kind"] == "tabular":
        n_cont = len(spec["continuous"])
        cont = torch.randn(b, n_cont, generator=g)
        codes = [torch.randint(0, c, (b, 1), generator=g).float()
                 for c in spec["categorical"].values()]
        return torch.cat([cont] + codes, dim=1)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", list(SPECS))
def test_build_encoder_shape_dtype_and_grad(name):
    spec, cfg = SPECS[name]
    torch.manual_seed(0)
    enc = build_encoder(name, spec, cfg)
    assert isinstance(enc.out_dim, int)
    x = _sample(spec)
    assert x.dtype == (torch.uint8 if spec["dtype"] == "uint8" else torch.float32)
    enc.train()
    out = enc(x)
    assert out.shape == (3, enc.out_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (out ** 2).mean().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, f"{name}: no grad for {pname}"
    assert any(p.grad.abs().sum() > 0 for p in enc.parameters())


def test_expected_out_dims():
    assert build_encoder("i", *SPECS["image"]).out_dim == 64
    assert build_encoder("i", *SPECS["image_r50"]).out_dim == 256
    assert build_encoder("s", *SPECS["sequence"]).out_dim == 16
    assert build_encoder("f", *SPECS["features"]).out_dim == 24
    assert build_encoder("t", *SPECS["tabular"]).out_dim == 16
    assert build_encoder("v", *SPECS["volume"]).out_dim == 8


def test_image_encoder_uint8_and_normalisation():
    torch.manual_seed(0)
    enc = ImageEncoder("resnet18", 3, base_width=8, small_input=True, normalize="imagenet").eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.backbone((x.float() / 255 - mean) / std))
        torch.testing.assert_close(enc(x), enc(x.float() / 255))
    assert "prep.mean" not in enc.state_dict()  # buffers are not checkpointed
    plain = ImageEncoder("resnet18", 3, base_width=8, small_input=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain.backbone(x.float() / 255))
    with pytest.raises(ValueError):
        ImageEncoder("resnet18", 1, normalize="imagenet")


def test_frames_encoder_is_mean_of_per_frame_features():
    torch.manual_seed(0)
    enc = FramesEncoder("resnet18", 3, base_width=8, small_input=True).eval()
    x = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        got = enc(x)
        per = torch.stack([enc.backbone(x[:, i].float() / 255) for i in range(4)], 1)
    torch.testing.assert_close(got, per.mean(1), rtol=1e-5, atol=1e-6)


def test_spectrogram_encoder_accepts_channel_dim():
    torch.manual_seed(0)
    enc = SpectrogramEncoder("resnet18", base_width=8).eval()
    x = torch.randn(2, 40, 30)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x.unsqueeze(1)))
    assert enc.backbone.conv1.in_channels == 1


def test_tabular_one_hot_matches_manual():
    cats = {"color": 4, "gear": 2, "fuel": 3}
    m = TabularMLP(2, cats, hidden=16, out_dim=8)
    assert m.d_tab == 2 + 9
    assert m.net[0].in_features == 11
    x = torch.tensor([[0.5, -1.0, 3.0, 0.0, 2.0],
                      [1.5, 2.0, 0.0, 1.0, 1.0]])
    oh = m.one_hot(x)
    manual = torch.cat([x[:, :2],
                        nn.functional.one_hot(x[:, 2].long(), 4).float(),
                        nn.functional.one_hot(x[:, 3].long(), 2).float(),
                        nn.functional.one_hot(x[:, 4].long(), 3).float()], dim=1)
    torch.testing.assert_close(oh, manual)
    m.eval()
    torch.testing.assert_close(m(x), m.net(manual))
    # init: kaiming fan_in, bias 0
    for lin in (m.net[0], m.net[3]):
        assert torch.all(lin.bias == 0)
    big = TabularMLP(3, {"c": 5}, hidden=2048, out_dim=2048)
    assert abs(big.net[3].weight.std().item() - (2 / 2048) ** 0.5) < 2e-3
    assert isinstance(big.net[1], nn.BatchNorm1d)


def test_tabular_out_of_range_codes():
    cats = {"color": 4, "fuel": 3}
    x = torch.tensor([[0.1, 1.0, 3.0]])  # fuel code 3 is out of range [0, 3)
    safe = TabularMLP(1, cats, hidden=8, out_dim=4)
    oh = safe.one_hot(x)
    torch.testing.assert_close(oh, torch.tensor([[0.1, 0, 1, 0, 0, 0, 0, 0]]))  # fuel block zero
    strict = TabularMLP(1, cats, hidden=8, out_dim=4, validate_codes=True)
    with pytest.raises(ValueError, match="fuel"):
        strict.one_hot(x)
    with pytest.raises(ValueError, match="color"):
        strict.one_hot(torch.tensor([[0.1, -1.0, 0.0]]))
    strict.one_hot(torch.tensor([[0.1, 3.0, 2.0]]))  # in range: fine
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        safe(torch.zeros(2, 4))


def test_sequence_encoder_return_sequence_and_parts():
    torch.manual_seed(0)
    enc = SequenceEncoder(12, d_model=16, n_layers=1, n_heads=4, max_len=10, dropout=0.0).eval()
    assert isinstance(enc.proj, nn.Linear) and enc.proj.in_features == 12
    assert not any(p is q for p in enc.proj.parameters() for q in enc.core.parameters())
    x = torch.randn(3, 10, 12)
    with torch.no_grad():
        seq = enc(x, return_sequence=True)
        pooled = enc(x)
    assert seq.shape == (3, 10, 16) and pooled.shape == (3, 16)
    torch.testing.assert_close(pooled, seq.mean(1))
    assert enc(x[:, :7]).shape == (3, 16)  # shorter sequences are fine
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.randn(1, 11, 12))
    # padding mask: padded steps do not change the pooled features
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 6:] = True
    noisy = x.clone()
    noisy[:, 6:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(enc(noisy, padding_mask=mask), enc(x[:, :6]),
                                   rtol=1e-4, atol=1e-5)


def test_feature_mlp_layers():
    m = FeatureMLP(10, hidden=8, out_dim=4, n_layers=3)
    assert sum(isinstance(l, nn.Linear) for l in m.modules()) == 3
    assert FeatureMLP(10, out_dim=5, n_layers=1)(torch.randn(2, 10)).shape == (2, 5)


def test_volume_encoder_channel_dim():
    torch.manual_seed(0)
    enc = VolumeEncoder(1, (4, 8)).eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x.unsqueeze(1)))


# ---------------------------------------------------------------------------- build_encoder
def test_build_encoder_errors_name_modality_and_key():
    spec, _ = SPECS["image"]
    with pytest.raises(ValueError, match=r"'cam'.*'widht'"):
        build_encoder("cam", spec, {"widht": 3})
    with pytest.raises(ValueError, match=r"'gps'.*'kind'.*'trajectory'"):
        build_encoder("gps", {"kind": "trajectory", "shape": [3]}, {})
    with pytest.raises(ValueError, match=r"'cam'.*'arch'"):
        build_encoder("cam", spec, {"arch": "vgg16"})
    with pytest.raises(ValueError, match=r"'cam'.*'normalize'"):
        build_encoder("cam", {"kind": "image", "shape": [1, 8, 8], "dtype": "float32"},
                      {"normalize": "imagenet"})
    tspec = dict(SPECS["tabular"][0], shape=[7])
    with pytest.raises(ValueError, match=r"'table'.*'shape'"):
        build_encoder("table", tspec, {})
    with pytest.raises(ValueError, match=r"'audio'.*'normalize'"):  # not a spectrogram key
        build_encoder("audio", SPECS["spectrogram"][0], {"normalize": "none"})
    with pytest.raises(ValueError, match=r"'text'.*'n_heads'"):
        build_encoder("text", SPECS["sequence"][0], {"d_model": 10, "n_heads": 4})
    assert set(ENCODER_DEFAULTS) == {"image", "frames", "spectrogram", "sequence", "features",
                                     "tabular", "volume"}


def test_build_encoder_types_and_defaults():
    assert isinstance(build_encoder("a", *SPECS["spectrogram"]), SpectrogramEncoder)
    assert isinstance(build_encoder("v", *SPECS["frames"]), FramesEncoder)
    seq = build_encoder("t", SPECS["sequence"][0], {})
    assert seq.out_dim == 64 and seq.core.max_len == 10
    tab = build_encoder("t", SPECS["tabular"][0], {})
    assert tab.out_dim == 2048 and tab.d_tab == 3 + 7
    img = build_encoder("i", {"kind": "image", "shape": [3, 64, 64], "dtype": "uint8"}, None)
    assert isinstance(img.backbone, ResNet) and img.backbone.base_width == 64
    assert not img.backbone.small_input


# ------------------------------------------------- sizes that cannot fit the data or the memory
def test_build_encoder_sequence_max_len_is_the_stored_length():
    spec, cfg = SPECS["sequence"]   # stored padded to T = 10 steps
    assert build_encoder("text", spec, cfg).core.max_len == 10
    assert build_encoder("text", spec, {**cfg, "max_len": None}).core.max_len == 10
    assert build_encoder("text", spec, {**cfg, "max_len": 10}).core.max_len == 10
    for bad in (11, 9, 40_000_000):
        with pytest.raises(ModelConfigError) as err:
            build_encoder("text", spec, {**cfg, "max_len": bad})
        assert str(err.value) == (f"modality 'text' (kind 'sequence'): config key 'max_len' = {bad} is invalid; "
                                  "expected the stored length 10 (every sequence of 'text' is stored padded to 10 "
                                  "steps); leave max_len unset")


BIG = {   # encoders whose float32 weights + gradients + Adam moments exceed 8 GiB
    "features": ("clip", {"kind": "features", "shape": [1000, 1000], "dtype": "float32"},
                 {"hidden": 100_000}, ("input width=1000*1000=1000000", "hidden=100000")),
    "tabular": ("table", SPECS["tabular"][0], {"hidden": 1_000_000}, ("hidden=1000000", "input width=10")),
    "sequence": ("text", SPECS["sequence"][0], {"d_model": 100_000}, ("d_model=100000", "max_len=10")),
    "image": ("cam", SPECS["image"][0], {"base_width": 4096}, ("arch=resnet18", "base_width=4096")),
}


@pytest.mark.parametrize("kind", list(BIG))
def test_build_encoder_refuses_an_encoder_too_big_for_memory(monkeypatch, kind):
    name, spec, cfg, sizes = BIG[kind]
    monkeypatch.setattr(encoders, "_available_memory", lambda: 8 * 2 ** 30)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelConfigError) as err:
        build_encoder(name, spec, cfg)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2 ** 20   # KiB: nothing big allocated
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"modality {name!r} (kind {kind!r}): the encoder has ")
    assert "more than the 8.59 GB of memory available on this host" in message, message
    for size in sizes:
        assert size in message, (size, message)


def test_build_encoder_memory_limit_is_16_bytes_a_parameter(monkeypatch):
    spec, cfg = SPECS["sequence"]
    n = sum(p.numel() for p in build_encoder("text", spec, cfg).parameters())
    monkeypatch.setattr(encoders, "_available_memory", lambda: 16 * n)
    build_encoder("text", spec, cfg)                                    # fits exactly
    monkeypatch.setattr(encoders, "_available_memory", lambda: 16 * n - 1)
    with pytest.raises(ModelConfigError, match=rf"'text'.*has {n:,} parameters \(d_model=16, n_layers=2"):
        build_encoder("text", spec, cfg)
    monkeypatch.setattr(encoders, "_available_memory", lambda: None)   # not known: nothing refused
    build_encoder("text", spec, cfg)


def test_build_encoder_too_big_for_this_host_and_impossible_sizes():
    with pytest.raises(ModelConfigError, match=r"'text' \(kind 'sequence'\): the encoder has .*d_model=100000"):
        build_encoder("text", SPECS["sequence"][0], {"d_model": 100_000})   # ~2.4e11 parameters, ~3.8 TB
    with pytest.raises(ModelConfigError, match=r"'text' \(kind 'sequence'\): cannot build the encoder \(d_model=-4"):
        build_encoder("text", SPECS["sequence"][0], {"d_model": -4, "n_heads": 2})
    with pytest.raises(ModelConfigError, match=r"'clip' \(kind 'features'\): cannot build the encoder .*overflow"):
        build_encoder("clip", {"kind": "features", "shape": [10 ** 6]}, {"hidden": 10 ** 14})


def test_available_memory_reads_meminfo_then_sysconf(monkeypatch):
    have = encoders._available_memory()
    assert isinstance(have, int) and have > 0
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(have - kib * 1024) < 2 ** 30

    def no_meminfo(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")
    monkeypatch.setattr(encoders, "open", no_meminfo, raising=False)
    fallback = encoders._available_memory()
    assert isinstance(fallback, int) and fallback > 0


@pytest.mark.parametrize("name", ["sequence", "image", "tabular"])
def test_sizing_on_the_meta_device_draws_no_random_numbers(name):
    spec, cfg = SPECS[name]
    direct = {"sequence": lambda: SequenceEncoder(12, 16, 2, 4, 10),
              "image": lambda: ImageEncoder(cfg["arch"], 3, cfg["base_width"], cfg["small_input"]),
              "tabular": lambda: TabularMLP(3, spec["categorical"], 32, 16)}[name]
    torch.manual_seed(0)
    built = build_encoder(name, spec, cfg).state_dict()
    after = torch.randn(3)
    torch.manual_seed(0)
    expected = direct().state_dict()
    assert torch.equal(after, torch.randn(3))
    assert list(built) == list(expected)
    for key in expected:
        assert built[key].device.type == "cpu" and torch.equal(built[key], expected[key]), key


# ----------------------------------------------------------------------------------- heads
def test_linear_head_is_linear():
    h = LinearHead(8, 3)
    assert isinstance(h, nn.Linear)
    assert [n for n, _ in h.named_parameters()] == ["weight", "bias"]
    assert h(torch.randn(2, 8)).shape == (2, 3)


def test_igm_head_three_linears():
    torch.manual_seed(0)
    h = IGMHead(32, 5)
    lins = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert len(h.linears) == 3 and len(lins) == 3
    assert all(a is b for a, b in zip(h.linears, lins))
    assert [(l.in_features, l.out_features) for l in h.linears] == [(32, 256), (256, 64), (64, 5)]
    x = torch.randn(4, 32)
    l0, l1, l2 = h.linears
    manual = l2(l1(torch.relu(l0(x))))  # no activation between the 2nd and 3rd Linear
    torch.testing.assert_close(h(x), manual)
    out, inputs = h(x, return_inputs=True)
    torch.testing.assert_close(out, manual)
    assert [a.shape[1] for a in inputs] == [32, 256, 64]
    assert torch.equal(inputs[0], x)
    torch.testing.assert_close(inputs[1], torch.relu(l0(x)))
    torch.testing.assert_close(l1(inputs[1]), inputs[2])
    torch.testing.assert_close(l2(inputs[2]), out)


def test_late_fusion_heads():
    heads = LateFusionHeads({"audio": 8, "video": 6}, 3)
    feats = {"audio": torch.randn(2, 8), "video": torch.randn(2, 6)}
    logits = heads(feats)
    assert set(logits) == {"audio", "video"}
    torch.testing.assert_close(LateFusionHeads.fuse(logits), logits["audio"] + logits["video"])
    assert set(heads({"audio": feats["audio"]})) == {"audio"}
    with pytest.raises(KeyError):
        heads({"text": torch.randn(2, 4)})


def test_cggm_pieces():
    torch.manual_seed(0)
    encs = {m: SequenceEncoder(5 + i, d_model=16, n_layers=1, n_heads=2, max_len=8)
            for i, m in enumerate(["text", "audio", "vision"])}
    xs = {m: torch.randn(3, 4 + i, 5 + i) for i, m in enumerate(encs)}
    hs = {m: encs[m](xs[m], return_sequence=True) for m in encs}
    fusion = FusionTransformer(16, n_layers=1, n_heads=2, modalities=list(encs))
    head = ResidualHead(16, 32, 1)
    assert isinstance(head.out, nn.Linear) and head.out.out_features == 1
    fused = fusion(hs)
    assert fused.shape == (3, 16)
    y = head(fused)
    assert y.shape == (3, 1)
    # pooled (B, d) inputs are accepted as length-1 sequences
    assert fusion({m: h.mean(1) for m, h in hs.items()}).shape == (3, 16)
    with pytest.raises(KeyError, match="vision"):
        fusion({"text": hs["text"], "audio": hs["audio"]})
    # the whole model gets gradient through the fusion path
    y.sum().backward()
    assert all(p.grad is not None for e in encs.values() for p in e.parameters())


@pytest.mark.parametrize("n_layers", [1, 2])
def test_modality_classifier_sends_no_gradient(n_layers):
    torch.manual_seed(0)
    enc = SequenceEncoder(6, d_model=16, n_layers=1, n_heads=2, max_len=8)
    clf = ModalityClassifier(16, 4, n_layers=n_layers, n_heads=2)
    assert isinstance(clf.out, nn.Linear)
    h = enc(torch.randn(3, 8, 6), return_sequence=True)
    assert h.requires_grad
    loss = nn.functional.cross_entropy(clf(h), torch.tensor([0, 1, 2]))  # NOT detached by caller
    loss.backward()
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in clf.parameters())
    leaf = torch.randn(3, 16, requires_grad=True)  # pooled input
    clf(leaf).sum().backward()
    assert leaf.grad is None


# ------------------------------------------------------------------------- GPU (host syncs)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(SPECS))
def test_forward_has_no_host_sync_on_gpu(name):
    spec, cfg = SPECS[name]
    enc = build_encoder(name, spec, cfg).cuda()
    x = _sample(spec).cuda()
    enc(x)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = enc(x)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (3, enc.out_dim)


def test_half_precision_shards_are_read_as_float32():
    """Converters may store features as float16 (half the bytes); encoders compute in float32."""
    from models.encoders import build_encoder
    torch.manual_seed(0)
    enc = build_encoder("text", {"kind": "sequence", "shape": [5, 8]}, {"d_model": 16, "n_layers": 1, "dropout": 0.0})
    x = torch.randn(2, 5, 8).half()
    torch.testing.assert_close(enc(x), enc(x.float()))
