"""The deployable network: pixels in, 14 probabilities AND 14 raw Grad-CAM maps out, one forward.

Why one forward gives both: kacl's image network ends in global average pooling and one linear
layer, so class c's Grad-CAM map is ``ReLU(sum_k W_ck A_k) / (h w)`` (see
:mod:`kacl_cli.stages.cam.gradcam`): a plain function of the last feature map, no backward
pass. :class:`ExportModule` computes it next to the probabilities, so an ONNX runtime in a
hospital produces kacl's maps without autograd and without kacl.

The input is what kacl's own ``preprocess`` starts from after resizing: B x 1 x S x S float32
grey values in [0, 1] (pixel / 255), S the checkpoint's ``image_size``; the normalisation is
inside the module, so integrators cannot apply the wrong one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kacl_cli.models.image_net import ImageNet
from kacl_cli.stages.cam.gradcam import gap_linear_maps

INPUT = "image"
OUTPUTS = ("probabilities", "cam_maps")


class ExportModule(nn.Module):
    """ImageNet + fixed normalisation -> (probabilities B x F, raw maps B x F x h x w)."""

    def __init__(self, model: ImageNet, meta: dict[str, Any]):
        super().__init__()
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError("export needs kacl's GAP + linear image network")
        self.model = model.eval()
        norm = meta["normalisation"]
        self.register_buffer("mean", torch.tensor(float(norm["mean"])))
        self.register_buffer("std", torch.tensor(float(norm["std"])))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.mean) / self.std
        fmap = self.model.features(x)
        logits = self.model.head(fmap.mean(dim=(2, 3)))
        return torch.sigmoid(logits), gap_linear_maps(fmap, self.model.head.weight)
