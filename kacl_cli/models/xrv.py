"""torchxrayvision DenseNet-121 -> a kacl image network (round 0 without training).

Why: most people in this field start from torchxrayvision's NIH-trained DenseNet-121
(Cohen et al. 2022). Its network is kacl's ``densenet121`` already: torchvision's DenseNet
``features`` on one input channel, then ReLU, global average pooling and one ``Linear(1024,
18)`` (``classifier``). So the conversion is a renaming plus a choice of head rows, and the
imported net stays GAP + linear: kacl's one-forward Grad-CAM is exact on it.

What differs, and where it is kept:

- **Outputs.** xrv predicts 18 targets (:data:`XRV_TARGETS`, its ``default_pathologies``
  order); each weights file is trained on a subset (the others are ``""`` in
  ``model.targets`` and NaN in ``op_threshs``). Rows are matched to kacl's 14 FINDINGS by
  name (case, ``_`` and spaces ignored). A finding the source did not learn gets a *fresh
  head row* (zero weights: an empty Grad-CAM map, never invented evidence; bias at the
  finding's prior log-odds) and is reported, or refused with ``strict=True``.
- **Input scaling.** xrv feeds pixels scaled to [-1024, 1024] (``xrv.datasets.normalize(img,
  255)``): ``2048 * p - 1024`` for p in [0, 1], which is kacl's ``(p - mean) / std`` with
  mean 0.5 and std 1/2048. The checkpoint meta records exactly that, so
  :func:`kacl_cli.models.checkpoint.preprocess` (training, cam, evaluate, predict, export)
  gives the imported net the input it was trained on.
- **Input size.** xrv's DenseNets are trained at 224 x 224 (its forward resizes any other size
  to 224); the meta's ``image_size`` is 224.
- **Calibration.** xrv's ``op_threshs`` (one operating point per output) are recorded in the
  meta. ``calibrate=True`` folds them into the head *bias* (``b_c - logit(t_c)``): p = 0.5 is
  then xrv's operating point, exactly as for its ``op_norm``, and the maps (which depend on
  the weights only) are unchanged. :func:`op_norm` is xrv's piecewise-linear rescaling, for
  anyone who needs its exact numbers.

Sources are plain tensor files (safetensors, or ``torch.save(model.state_dict())`` read with
``weights_only=True``): xrv's own weights files are pickled modules, which kacl never loads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kacl_cli.errors import CheckpointError
from kacl_cli.findings import BOX_LABEL_ALIASES, FINDINGS
from kacl_cli.models.image_net import ImageNet, build_image_net, load_weights

# torchxrayvision's ``datasets.default_pathologies`` (= ``DenseNet.targets``): output order.
XRV_TARGETS: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
XRV_IMAGE_SIZE = 224
XRV_RANGE = 1024.0
# safetensors metadata key holding the JSON list of the source's targets (``model.targets``).
TARGETS_KEY = "targets"
CONVERSION = (
    'python -c "import json, torchxrayvision as xrv, safetensors.torch as st; '
    "m = xrv.models.DenseNet(weights='densenet121-res224-nih'); "
    "st.save_file(m.state_dict(), 'xrv-nih.safetensors', "
    "metadata={'targets': json.dumps(m.targets)})\""
)

_OLD_KEY = re.compile(r"^(.*(?:denselayer\d+\.(?:norm|relu|conv)))\.([12]\.(?:weight|bias|"
                      r"running_mean|running_var))$")


def xrv_normalisation() -> dict[str, Any]:
    """kacl's ``(p - mean) / std`` that reproduces xrv's [-1024, 1024] pixel scaling."""
    return {"mean": 0.5, "std": 1.0 / (2.0 * XRV_RANGE), "range": [-XRV_RANGE, XRV_RANGE],
            "source": "torchxrayvision"}


def _norm_name(name: str) -> str:
    name = BOX_LABEL_ALIASES.get(name, name)
    return re.sub(r"[\s_]+", "", name).lower()


@dataclass
class XrvMapping:
    """Which source row feeds each kacl finding, and what was left out."""

    rows: list[int | None]
    missing: list[str] = field(default_factory=list)  # kacl findings the source lacks
    unused: list[str] = field(default_factory=list)   # source targets kacl has no slot for
    untrained: list[str] = field(default_factory=list)  # named but NaN op_thresh (untrained)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "missing": self.missing, "unused": self.unused,
                "untrained": self.untrained}


def map_targets(targets: list[str], op_threshs: torch.Tensor | None = None) -> XrvMapping:
    """Match source targets to FINDINGS by name; NaN operating points mark untrained rows."""
    index: dict[str, int] = {}
    untrained: list[str] = []
    for j, name in enumerate(targets):
        if not name:
            continue
        if op_threshs is not None and not bool(torch.isfinite(op_threshs[j])):
            untrained.append(name)
            continue
        index.setdefault(_norm_name(name), j)
    rows: list[int | None] = [index.get(_norm_name(f)) for f in FINDINGS]
    used = {j for j in rows if j is not None}
    return XrvMapping(
        rows=rows,
        missing=[f for f, j in zip(FINDINGS, rows, strict=True) if j is None],
        unused=[t for j, t in enumerate(targets) if t and j not in used and t not in untrained],
        untrained=untrained,
    )


def read_source(path: Path | str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(state dict, targets from the file's metadata or None) of a source weights file.

    Never unpickles: safetensors, or ``torch.load(weights_only=True)`` (tensors only).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    targets: list[str] | None = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(TARGETS_KEY)
            if raw is not None:
                targets = json.loads(raw)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # both loaders raise many types on foreign/corrupt files
        raise CheckpointError(
            f"{path}: not a safetensors or weights-only torch state dict "
            f"({type(exc).__name__}); convert with: {CONVERSION}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    if targets is not None and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise CheckpointError(f"{path}: metadata {TARGETS_KEY!r} is not a JSON list of names")
    return state, targets


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class Imported:
    """The converted network and what the conversion decided (for meta and the report)."""

    model: ImageNet
    mapping: XrvMapping
    targets: list[str]
    op_threshs: list[float | None] | None  # per kacl finding, None where missing/absent
    calibrated: bool


def convert(state: dict[str, torch.Tensor], targets: list[str] | None = None, *,
            calibrate: bool = False, strict: bool = False,
            prior: dict[str, float] | None = None, source: str = "source") -> Imported:
    """Build kacl's densenet121 ImageNet from an xrv DenseNet-121 state dict.

    ``targets``: the source's output names (``model.targets``); default :data:`XRV_TARGETS`.
    ``prior``: per-finding prevalence for the bias of fresh rows (default 0.5 -> bias 0).
    """
    if "classifier.weight" not in state or "features.conv0.weight" not in state:
        raise CheckpointError(
            f"{source}: not a torchxrayvision DenseNet state dict (needs features.* and "
            f"classifier.*); convert with: {CONVERSION}")
    weight, bias = state["classifier.weight"], state.get("classifier.bias")
    n_out = weight.shape[0]
    targets = list(targets) if targets is not None else list(XRV_TARGETS)
    if len(targets) != n_out:
        raise CheckpointError(
            f"{source}: classifier has {n_out} outputs but {len(targets)} target names were "
            "given")
    op = state.get("op_threshs")
    if op is not None and tuple(op.shape) != (n_out,):
        raise CheckpointError(f"{source}: op_threshs has shape {tuple(op.shape)}, not ({n_out},)")
    mapping = map_targets(targets, op)
    if strict and mapping.missing:
        raise CheckpointError(
            f"{source}: lacks {len(mapping.missing)} of kacl's findings "
            f"({', '.join(mapping.missing)}); drop --strict to give them fresh head rows")
    if calibrate and op is None:
        raise CheckpointError(f"{source}: --calibrate needs op_threshs, which this file lacks")

    model = build_image_net("densenet121", n_classes=len(FINDINGS))
    own = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        m = _OLD_KEY.match(key)
        tensors[f"{m.group(1)}{m.group(2)}" if m else key] = value
    for key, value in own.items():  # old BatchNorms were saved without the step counter
        if key.endswith("num_batches_tracked") and key not in tensors:
            tensors[key] = torch.zeros_like(value)
    w = torch.zeros(len(FINDINGS), weight.shape[1], dtype=torch.float32)
    b = torch.zeros(len(FINDINGS), dtype=torch.float32)
    threshs: list[float | None] = []
    for i, (name, j) in enumerate(zip(FINDINGS, mapping.rows, strict=True)):
        if j is None:
            p = (prior or {}).get(name, 0.5)
            b[i] = _logit(min(max(float(p), 1e-3), 1 - 1e-3))
            threshs.append(None)
            continue
        w[i] = weight[j].float()
        b[i] = 0.0 if bias is None else float(bias[j])
        t = None if op is None else float(op[j])
        threshs.append(t)
        if calibrate and t is not None:
            b[i] -= _logit(min(max(t, 1e-7), 1 - 1e-7))
    tensors["head.weight"], tensors["head.bias"] = w, b
    load_weights(model, tensors, source, allow_missing_head=False)
    return Imported(model.eval(), mapping, targets, None if op is None else threshs, calibrate)


def op_norm(probs: np.ndarray, threshs: np.ndarray) -> np.ndarray:
    """xrv's operating-point rescaling: maps each output's threshold t to 0.5, piecewise
    linearly (p / 2t below t, 1 - (1 - p) / (2 (1 - t)) above); NaN thresholds give 0.5."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshs, dtype=np.float64), p.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = p / (t * 2)
        high = 1.0 - (1.0 - p) / ((1.0 - t) * 2)
    out = np.where(p < t, low, high)
    return np.where(np.isnan(t), 0.5, out)
