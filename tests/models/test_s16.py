"""Stride-16 backbones: maps twice as fine, same weights as their stride-32 base, and the
one-forward GAP + linear Grad-CAM still exactly the autograd one."""

from __future__ import annotations

import pytest
import torch

from kacl_cli.models.image_net import BACKBONES, build_image_net
from kacl_cli.stages.cam.gradcam import autograd_gradcam, batched_gradcam

torch.set_num_threads(1)


@pytest.mark.parametrize("backbone,base", [("resnet50-s16", "resnet50"),
                                           ("densenet121-s16", "densenet121")])
def test_s16_maps_are_twice_as_fine_and_exact(backbone: str, base: str) -> None:
    assert backbone in BACKBONES
    torch.manual_seed(0)
    model = build_image_net(backbone, n_classes=14).eval()
    ref = build_image_net(base, n_classes=14).eval()
    # the same parameters: a stride-32 checkpoint loads into the stride-16 net and back
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert model.features(x).shape[-2:] == (4, 4)
        assert ref.features(x).shape[-2:] == (2, 2)
    logits, maps = batched_gradcam(model, x)
    ref_logits, ref_maps = autograd_gradcam(model, x)
    assert maps.shape == (1, 14, 4, 4)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert (maps - ref_maps).abs().max() < 1e-5 and maps.max() > 0
