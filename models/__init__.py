"""nn.Modules: one encoder per modality kind, heads and fusion modules (imports torch only)."""
from .encoders import (
    ENCODER_DEFAULTS,
    RESNET_ARCHS,
    BasicBlock,
    Bottleneck,
    FeatureMLP,
    FramesEncoder,
    ImageEncoder,
    ResNet,
    SequenceCore,
    SequenceEncoder,
    SpectrogramEncoder,
    TabularMLP,
    VolumeEncoder,
    build_encoder,
    load_pretrained,
    resnet18,
    resnet10,
    resnet34,
    resnet50,
    resnet101,
)
from .heads import (
    FusionTransformer,
    IGMHead,
    LateFusionHeads,
    LinearHead,
    ModalityClassifier,
    ResidualHead,
)

__all__ = [
    "ENCODER_DEFAULTS", "RESNET_ARCHS", "BasicBlock", "Bottleneck", "FeatureMLP",
    "FramesEncoder", "ImageEncoder", "ResNet", "SequenceCore", "SequenceEncoder",
    "SpectrogramEncoder", "TabularMLP", "VolumeEncoder", "build_encoder", "load_pretrained",
    "resnet10", "resnet18", "resnet34", "resnet50", "resnet101",
    "FusionTransformer", "IGMHead", "LateFusionHeads", "LinearHead", "ModalityClassifier",
    "ResidualHead",
]
