"""Inference on a user's X-ray files: probabilities per finding, and Grad-CAM boxes in the
input image's own pixel coordinates.

The pixels go through the same path as training: ``imageio.read_gray`` (PNG/JPEG/16-bit/
RGBA/DICOM -> 8-bit gray), ``resize_square`` to the store size the model was trained from,
then ``preprocess`` (resize to the model's size, scale, normalise). Boxes come from
``kacl_cli.stages.cam.localize`` (the cam stage's rule: the map upsampled to the model's input
size S, cut with the checkpoint's fitted per-finding rules from ``box_rules.json``) and are
mapped back per axis: ``x_orig = x * orig_width / S`` and ``y_orig = y * orig_height / S``, so
non-square inputs get correct boxes too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kacl_cli.errors import KaclError
from kacl_cli.findings import FINDINGS, POSITIVE_PROBABILITY
from kacl_cli.imageio import read_gray, resize_square
from kacl_cli.models.checkpoint import load_image_net, preprocess
from kacl_cli.stages.cam.config import CamConfig
from kacl_cli.stages.rounds import resolve_round


@dataclass
class FindingResult:
    finding: str
    probability: float
    positive: bool
    box: tuple[float, float, float, float] | None = None  # x, y, w, h in original pixels
    box_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"finding": self.finding, "probability": self.probability,
                             "positive": self.positive}
        if self.box is not None:
            d["box"] = dict(zip(("x", "y", "w", "h"), self.box, strict=True))
        elif self.box_reason is not None:
            d["box"] = None
            d["box_reason"] = self.box_reason
        return d


@dataclass
class ImageResult:
    path: str
    width: int | None = None
    height: int | None = None
    findings: list[FindingResult] = field(default_factory=list)
    error: str | None = None
    overlay: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "width": self.width, "height": self.height}
        if self.error is not None:
            d["error"] = self.error
        else:
            d["findings"] = [f.to_dict() for f in self.findings]
        if self.overlay is not None:
            d["overlay"] = self.overlay
        return d


def resolve_checkpoint(ws, round_: int | None, checkpoint: Path | None) -> Path:
    """``--checkpoint PATH``, else ``--round K`` of the workspace, else its latest round."""
    if checkpoint is not None:
        return Path(checkpoint)
    return ws.checkpoint_dir(resolve_round(ws, round_))


def map_box_to_original(box: Sequence[float], map_hw: tuple[int, int], width: int,
                        height: int) -> tuple[float, float, float, float]:
    """A box in map cells -> the input image's pixels (separate x and y scales)."""
    sx, sy = width / map_hw[1], height / map_hw[0]
    x, y, w, h = (float(v) for v in box)
    return (x * sx, y * sy, w * sx, h * sy)


def _overlay_path(directory: Path, src: Path, used: set[str]) -> Path:
    name = f"{src.stem}.kacl.png"
    i = 1
    while name in used:
        name = f"{src.stem}-{i}.kacl.png"
        i += 1
    used.add(name)
    return directory / name


def draw_overlay(pixels: np.ndarray, heat: np.ndarray | None, findings: list[FindingResult],
                 path: Path) -> None:
    """Write the X-ray with a jet heatmap (alpha-blended where the map is hot) and boxes."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    base = Image.fromarray(pixels, mode="L").convert("RGB")
    if heat is not None and float(heat.max()) > 0:
        h = Image.fromarray((heat / float(heat.max())).astype(np.float32), mode="F")
        h = np.asarray(h.resize(base.size, Image.Resampling.BILINEAR), dtype=np.float32)
        rgb = (colormaps["jet"](np.clip(h, 0, 1))[..., :3] * 255).astype(np.float32)
        alpha = (0.45 * np.clip(h, 0, 1))[..., None]
        blended = np.asarray(base, np.float32) * (1 - alpha) + rgb * alpha
        base = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    width = max(1, round(min(base.size) / 256))
    for f in findings:
        if f.box is None:
            continue
        x, y, w, h = f.box
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0), width=width)
        draw.text((x + 2, y + 2), f"{f.finding} {f.probability:.2f}", fill=(0, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    base.save(path)


def predict_files(
    paths: Sequence[Path | str],
    model: torch.nn.Module,
    meta: dict[str, Any],
    device: torch.device,
    *,
    boxes: bool = False,
    threshold: float = POSITIVE_PROBABILITY,
    cam_threshold: float | None = CamConfig.threshold,
    rules=None,
    overlay_dir: Path | None = None,
    batch_size: int = 8,
    on_result: Callable[[ImageResult], None] | None = None,
) -> list[ImageResult]:
    """Classify (and localise) each file; an unreadable file gets ``error``, the rest go on."""
    from kacl_cli.stages.cam.box_rules import uniform
    from kacl_cli.stages.cam.gradcam import batched_gradcam
    from kacl_cli.stages.cam.localize import DEFAULT_RULE, BoxRule, localize

    if rules is None:
        rule = BoxRule(cam_threshold, "peak") if cam_threshold is not None else DEFAULT_RULE
        rules = uniform(rule, "fixed")
    image_size = int(meta["image_size"])
    store_size = int(meta.get("store_size") or meta["image_size"])
    findings = list(meta["findings"])
    want_maps = boxes or overlay_dir is not None
    used: set[str] = set()
    results: list[ImageResult] = []
    model.eval()
    for start in range(0, len(paths), batch_size):
        chunk = [Path(p) for p in paths[start:start + batch_size]]
        decoded: list[tuple[ImageResult, np.ndarray]] = []
        chunk_results = []
        for p in chunk:
            res = ImageResult(str(p))
            chunk_results.append(res)
            try:
                dec = read_gray(p)
            except KaclError as exc:
                res.error = str(exc)
                continue
            except Exception as exc:  # any per-file failure is that file's, not the batch's
                res.error = f"{p}: unreadable ({type(exc).__name__}: {exc})"
                continue
            res.width, res.height = dec.width, dec.height
            decoded.append((res, dec.pixels))
        if decoded:
            pixels = np.stack([resize_square(px, store_size) for _, px in decoded])
            x = preprocess(torch.from_numpy(pixels), meta, device)
            with torch.no_grad():
                if want_maps:
                    logits, maps = batched_gradcam(model, x)
                    maps_np = maps.float().cpu().numpy()
                else:
                    logits, maps_np = model(x), None
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            found = None
            if boxes and maps_np is not None:
                n_f = maps.shape[1]
                found = localize(maps.reshape(-1, *maps.shape[-2:]), (image_size, image_size),
                                 rules.rule_list(findings) * len(decoded))
            for i, (res, px) in enumerate(decoded):
                for j, name in enumerate(findings):
                    p = float(probs[i, j])
                    fr = FindingResult(name, p, p >= threshold)
                    if fr.positive and found is not None:
                        mb = found[i * n_f + j][0]
                        if mb.box is not None:
                            fr.box = map_box_to_original(mb.box, (image_size, image_size),
                                                         res.width, res.height)
                        else:
                            fr.box_reason = mb.reason
                    res.findings.append(fr)
                if overlay_dir is not None and maps_np is not None:
                    pos = [j for j, f in enumerate(res.findings) if f.positive]
                    sel = pos or [int(np.argmax(probs[i]))]
                    # Each map scaled to its own peak, so a weak finding's region still shows.
                    peaks = maps_np[i, sel].reshape(len(sel), -1).max(axis=1)
                    heat = (maps_np[i, sel] / np.maximum(peaks, 1e-12)[:, None, None]).max(0)
                    out_path = _overlay_path(Path(overlay_dir), Path(res.path), used)
                    draw_overlay(px, heat, res.findings, out_path)
                    res.overlay = str(out_path)
        for res in chunk_results:
            results.append(res)
            if on_result is not None:
                on_result(res)
    return results


def load_predict_rules(ckpt: Path, cam_threshold: float | None):
    """``--cam-threshold`` for every finding, else the checkpoint's fitted rules
    (``box_rules.json``, refused with one line when made for another checkpoint/vocabulary),
    else the 0.5/peak default."""
    from kacl_cli.models.checkpoint_files import checkpoint_fingerprint
    from kacl_cli.stages.cam.box_rules import read_rules_file, uniform
    from kacl_cli.stages.cam.localize import DEFAULT_RULE, BoxRule

    if cam_threshold is not None:
        return uniform(BoxRule(cam_threshold, "peak"), f"--cam-threshold {cam_threshold}")
    fitted = read_rules_file(Path(ckpt), checkpoint_fingerprint(Path(ckpt)))
    return fitted if fitted is not None else uniform(
        DEFAULT_RULE, "default 0.5 x peak (no box_rules.json: run `kacl cam` to fit)")


def load_for_predict(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's image net (contrast's ``objective.`` tensors are ignored)."""
    model, meta = load_image_net(path, device)
    if list(meta["findings"]) != list(FINDINGS):  # pragma: no cover - load_image_net checks
        raise KaclError(f"{path}: another vocabulary")
    return model, meta
