"""Chest X-ray augmentations, drawn from an explicit generator so training is reproducible.

Which and why:
- small rotation (+-7 deg), scale (0.9-1.1) and translation (+-6 % of the side): patient
  positioning varies by that much between radiographs;
- brightness (x0.9-1.1) and contrast (0.85-1.15): exposure and processing vary between
  machines and sites;
- NO vertical flip (a chest is never upside down) and NO horizontal flip by default: anatomy
  is lateralised (heart on the left, stomach bubble under the left hemidiaphragm, the aortic
  knob), so a flipped image is a different, rare condition (dextrocardia), and left/right
  matters for localisation. ``hflip_p`` exists for experiments but defaults to 0.

Every draw comes from the ``torch.Generator`` passed in, so the same (seed, epoch, index) gives
the same image in any worker process and after a resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.15
    hflip_p: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def item_generator(seed: int, epoch: int, index: int, view: int = 0) -> torch.Generator:
    """A generator unique to (seed, epoch, item, view): worker- and resume-independent."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), int(view)])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def augment_image(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig | None = None
                  ) -> torch.Tensor:
    """Augment one 1 x S x S float image in 0..1; returns the same shape, clamped to 0..1."""
    cfg = cfg or AugmentConfig()
    side = x.shape[-1]
    angle = _uniform(g, -cfg.rotate_deg, cfg.rotate_deg)
    scale = _uniform(g, *cfg.scale)
    tx = round(_uniform(g, -cfg.translate, cfg.translate) * side)
    ty = round(_uniform(g, -cfg.translate, cfg.translate) * side)
    brightness = _uniform(g, 1 - cfg.brightness, 1 + cfg.brightness)
    contrast = _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast)
    flip = cfg.hflip_p > 0 and float(torch.rand((), generator=g)) < cfg.hflip_p
    out = TF.affine(x, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    out = TF.adjust_brightness(out, brightness)
    out = TF.adjust_contrast(out, contrast)
    if flip:
        out = TF.horizontal_flip(out)
    return out.clamp_(0.0, 1.0)
