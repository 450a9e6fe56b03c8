"""The image network: a torchvision backbone on 1-channel X-rays with a GAP + linear head.

Why this shape: with global average pooling followed by one linear layer, the Grad-CAM
channel weights of class c are exactly row c of the head divided by the map area, so
``kacl_cli.stages.cam.gradcam`` gets every finding's map from one forward pass.
``features(x)`` is the output of the last conv block after its final activation (the Grad-CAM
target layer).

Grayscale: the first convolution takes one channel. ImageNet weights are folded into it by
summing the RGB filters, which is exactly what the 3-channel net would compute on a gray
image copied into R, G and B, without the 3x copy.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from kacl_cli.errors import CheckpointError, KaclError
from kacl_cli.models.checkpoint_files import MODEL_FILE

BACKBONES = ("densenet121", "resnet50", "resnet18", "densenet121-s16", "resnet50-s16", "tiny")
# Stride-16 variants (finer Grad-CAM maps: 14 x 14 at 224 px, 32 x 32 at 512) keep the
# parameters, and so the state-dict keys and ImageNet weights, of their stride-32 base:
# resnet50-s16 dilates layer4 instead of striding it (torchvision's
# replace_stride_with_dilation); densenet121-s16 drops the average pool of the last transition.
S16_BASE = {"densenet121-s16": "densenet121", "resnet50-s16": "resnet50"}


def base_backbone(backbone: str) -> str:
    """The stride-32 architecture a backbone's weights belong to."""
    return S16_BASE.get(backbone, backbone)

# ImageNet statistics averaged over RGB: the right normalisation for a gray image fed to
# folded ImageNet filters, and a sensible fixed one for nets trained from scratch.
GRAY_MEAN = 0.449
GRAY_STD = 0.226

# torchvision's weight enums, to find the cached file name (never to download).
_WEIGHTS = {
    "densenet121": "DenseNet121_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet18": "ResNet18_Weights",
}

# Old DenseNet checkpoints name layers "norm.1" where the module is "norm1" (torchvision's
# own loader applies the same rename).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class ImageNet(nn.Module):
    """Backbone (``features``) + global average pool + ``head`` (Linear to n_classes)."""

    def __init__(self, backbone: str, features: nn.Module, feature_dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.features = features
        self.head = nn.Linear(feature_dim, n_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature map B x C x h x w, pooled B x C, logits B x n_classes) in one pass."""
        fmap = self.features(x)
        pooled = fmap.mean(dim=(2, 3))
        return fmap, pooled, self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[2]


def _tiny_features() -> tuple[nn.Module, int]:
    """Four conv blocks (16-64 channels), stride 8 overall: seconds per epoch at 64 px on CPU."""
    layers: list[tuple[str, nn.Module]] = []
    chans = [1, 16, 32, 64, 64]
    for i in range(4):
        layers += [
            (f"conv{i}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False)),
            (f"norm{i}", nn.BatchNorm2d(chans[i + 1])),
            (f"relu{i}", nn.ReLU()),
        ]
        if i < 3:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
    return nn.Sequential(OrderedDict(layers)), chans[-1]


def _gray_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def _make(backbone: str, n_classes: int) -> ImageNet:
    if backbone == "tiny":
        feats, dim = _tiny_features()
        return ImageNet(backbone, feats, dim, n_classes)
    if base_backbone(backbone) == "densenet121":
        tv = torchvision.models.densenet121(weights=None)
        body = tv.features
        if backbone == "densenet121-s16":
            body.transition3.pool = nn.Identity()
        body.conv0 = _gray_conv(body.conv0)
        # torchvision applies the final ReLU in forward(), outside `features`; make it a module
        # (not in-place) so the Grad-CAM target is the activated map.
        body.add_module("relu5", nn.ReLU())
        return ImageNet(backbone, body, tv.classifier.in_features, n_classes)
    if base_backbone(backbone) in ("resnet18", "resnet50"):
        dilate = [False, False, backbone == "resnet50-s16"]
        tv = getattr(torchvision.models, base_backbone(backbone))(
            weights=None, replace_stride_with_dilation=dilate)
        tv.conv1 = _gray_conv(tv.conv1)
        body = nn.Sequential(OrderedDict(
            (name, getattr(tv, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                         "layer4")
        ))
        return ImageNet(backbone, body, tv.fc.in_features, n_classes)
    raise KaclError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")


def first_conv_key(backbone: str) -> str:
    """State-dict key of the 1-channel stem convolution's weight."""
    return {"densenet121": "features.conv0.weight", "tiny": "features.conv0.weight"}.get(
        base_backbone(backbone), "features.conv1.weight"
    )


def imagenet_weights_path(backbone: str) -> Path:
    """Where torchvision would cache this backbone's ImageNet weights (may not exist)."""
    if base_backbone(backbone) not in _WEIGHTS:
        raise KaclError(f"--init imagenet: no ImageNet weights exist for backbone {backbone!r}")
    enum = getattr(torchvision.models, _WEIGHTS[base_backbone(backbone)]).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name


def _torchvision_to_ours(backbone: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision state-dict keys to ImageNet's; drop its 1000-class head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("fc.", "classifier.")):
            continue
        if base_backbone(backbone) == "densenet121":
            m = _DENSENET_KEY.match(key)
            if m:
                key = m.group(1) + m.group(2)
        else:
            key = "features." + key
        out[key] = value
    return out


def fold_rgb(weight: torch.Tensor) -> torch.Tensor:
    """Sum an RGB stem filter over its input channels: conv(gray x3, W) == conv(gray, sum W)."""
    return weight.sum(dim=1, keepdim=True) if weight.shape[1] == 3 else weight


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch file (never unpickles objects)."""
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"--init {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # both loaders raise many types on foreign/corrupt files
        raise CheckpointError(
            f"{path}: not a safetensors or weights-only torch state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    return state


def load_weights(
    model: ImageNet, state: dict[str, torch.Tensor], source: str, allow_missing_head: bool
) -> None:
    """Load a state dict into ``model`` with one-line errors on any mismatch.

    Accepts kacl checkpoints (``image_net.`` prefix, ``objective.`` tensors ignored),
    plain ImageNet state dicts, and torchvision-named ones (renamed, RGB stem folded).
    """
    if any(k.startswith("image_net.") for k in state):
        state = {k[len("image_net."):]: v for k, v in state.items() if k.startswith("image_net.")}
    own = model.state_dict()
    if not any(k in own for k in state):
        state = _torchvision_to_ours(model.backbone, state)
    stem = first_conv_key(model.backbone)
    if stem in state:
        state[stem] = fold_rgb(state[stem])
    missing = [k for k in own if k not in state]
    if allow_missing_head:
        missing = [k for k in missing if not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source}: weights do not fit a {model.backbone} net: {', '.join(what)} tensors"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the {model.backbone} "
                f"net with {model.n_classes} classes needs {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=not allow_missing_head)


PRIOR_FLOOR = 1e-3


def init_head_bias(model: ImageNet, labels, floor: float = PRIOR_FLOOR) -> torch.Tensor:
    """Set the head's bias to the log-odds of each finding's prevalence in ``labels`` (n x F).

    Why (Lin et al. 2017, "prior probability" initialisation): with the default zero bias every
    finding starts at p = 0.5, while most are present in ~1-10 % of images. The fastest way for
    the net to lower all 14 outputs is then to push the head *weights* negative on the (ReLU,
    non-negative) feature channels, and AdamW moves the bias by only ~lr per step (a few
    hundredths over a demo's ~100 steps, where -3 is needed). The result was a net whose
    ``sum_k W_ck A_k`` is negative almost everywhere: Grad-CAM maps empty or lit only at the
    image border, and the weights spent on calibration instead of features. Starting at the
    prior lets the weights carry evidence only. Prevalences are clipped to [floor, 1 - floor]
    (a finding absent from the train split gets logit(floor), not -inf).
    """
    prev = np.clip(np.asarray(labels, dtype=np.float64).mean(axis=0), floor, 1.0 - floor)
    bias = torch.as_tensor(np.log(prev / (1.0 - prev)), dtype=model.head.bias.dtype)
    if bias.shape != model.head.bias.shape:
        raise ValueError(f"labels have {bias.numel()} findings, the head {model.n_classes}")
    with torch.no_grad():
        model.head.bias.copy_(bias)
    return bias


def build_image_net(backbone: str, n_classes: int = 14, init: str | Path = "none") -> ImageNet:
    """Build a 1-channel classifier; ``init`` is ``none``, ``imagenet`` or a local weights path.

    ``imagenet`` only uses weights already in torch's hub cache (``torch.hub.get_dir()``):
    kacl never downloads, so offline clusters behave the same as laptops.
    """
    model = _make(backbone, n_classes)
    init_s = str(init)
    if init_s == "none":
        return model
    if init_s == "imagenet":
        path = imagenet_weights_path(backbone)
        if not path.is_file():
            raise KaclError(
                f"--init imagenet: {backbone} ImageNet weights are not in the local torch hub "
                f"cache ({path}); kacl never downloads: copy the file there, or use --init none "
                "or --init PATH"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable weights ({type(exc).__name__})") from None
        load_weights(model, _torchvision_to_ours(backbone, state), str(path),
                     allow_missing_head=True)
        return model
    load_weights(model, _read_state_file(Path(init_s)), init_s, allow_missing_head=True)
    return model
