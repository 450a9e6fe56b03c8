"""`kacl export`: one round's network as an ONNX file + a JSON sidecar for integrators.

The model (:class:`kacl_cli.models.export.ExportModule`) maps grey pixels in [0, 1] to the 14
probabilities and the 14 raw Grad-CAM maps in one forward pass. The sidecar carries what a
runtime needs besides the graph: the vocabulary (output order), the input size and how to get
there, the normalisation (already applied inside the model; recorded for audit), the box rule
and its threshold (the one the workspace's ``cam`` run of that round used, and per-finding
fitted thresholds when the checkpoint meta has them), and where the weights came from.

onnx / onnxruntime are an optional extra (``pip install 'kacl[onnx]'``); without them the
command ends with one line saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from kacl_cli import __version__
from kacl_cli.errors import KaclError
from kacl_cli.models.checkpoint import MODEL_FILE, load_image_net
from kacl_cli.models.export import INPUT, OUTPUTS, ExportModule
from kacl_cli.workspace import Workspace

FORMATS = ("onnx",)
OPSET = 18
MISSING = ("--format onnx needs the onnx packages, which are not installed: "
           "pip install 'kacl[onnx]'")
DEFAULT_FRAC = 0.5


def cam_threshold(ws: Workspace | None, round_: int | None) -> tuple[float, str]:
    """The map -> box threshold (fraction of the peak) of the round's latest cam run."""
    if ws is not None and round_ is not None and ws.exists():
        rows = ws.catalog.query(
            "SELECT config_json FROM runs WHERE stage = 'cam' AND round = ? AND status = 'done' "
            "ORDER BY finished_at DESC LIMIT 1", [round_])
        if rows:
            frac = json.loads(rows[0][0]).get("threshold")
            if frac is not None:
                return float(frac), "the workspace's cam run of this round"
    return DEFAULT_FRAC, "kacl cam's default"


def sidecar(meta: dict[str, Any], module: ExportModule, model_file: str, frac: float,
            frac_source: str, checkpoint: Path) -> dict[str, Any]:
    """Everything besides the graph that a runtime needs to use the outputs correctly."""
    size = int(meta["image_size"])
    with torch.no_grad():
        _, maps = module(torch.zeros(1, 1, size, size))
    map_h, map_w = (int(v) for v in maps.shape[-2:])
    digest = hashlib.sha256((checkpoint / MODEL_FILE).read_bytes()).hexdigest()
    return {
        "kind": "kacl-export",
        "kacl_version": __version__,
        "model": model_file,
        "format": "onnx",
        "round": meta.get("round"),
        "backbone": meta.get("backbone"),
        "checkpoint_sha256": digest,
        "findings": list(meta["findings"]),
        "input": {
            "name": INPUT, "shape": ["batch", 1, size, size], "dtype": "float32",
            "range": [0.0, 1.0],
            "how": (f"8-bit grey image (DICOM: MONOCHROME1 inverted, scaled to 0..255), "
                    f"resized (stretched, no padding) to {size} x {size} with antialiased "
                    "bilinear, divided by 255. kacl itself resizes in two steps: to "
                    "store_size (PIL bilinear), then to the input size (torch, antialiased)"),
            "store_size": int(meta.get("store_size") or size),
        },
        "normalisation": {**meta["normalisation"], "applied_inside_model": True},
        "outputs": {
            OUTPUTS[0]: {"shape": ["batch", len(meta["findings"])],
                         "meaning": "sigmoid probability of each finding, in `findings` order"},
            OUTPUTS[1]: {"shape": ["batch", len(meta["findings"]), map_h, map_w],
                         "meaning": "raw Grad-CAM map of each finding: ReLU(W_c . A) / (h w); "
                                    f"map pixel (i, j) covers input pixels "
                                    f"[{size / map_h:g} i, {size / map_h:g} (i + 1)) x "
                                    f"[{size / map_w:g} j, {size / map_w:g} (j + 1))"},
        },
        "boxes": {
            "rule": "threshold the map at frac * its peak; 8-connected components; keep the "
                    "component with the largest sum of map values; its bounding box (map "
                    "pixels, scale to input pixels, then to the original image)",
            "frac": frac, "frac_source": frac_source,
            "fitted_thresholds": meta.get("box_thresholds"),
        },
        "calibration": (meta.get("source") or {}).get("op_threshs"),
    }


def export_onnx(module: ExportModule, path: Path, size: int) -> None:
    """Write the ONNX graph (torch.export-based exporter), batch dimension dynamic.

    The exporter's own progress lines go to stderr, so ``--json`` keeps stdout clean.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise KaclError(MISSING) from None
    example = torch.zeros(2, 1, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
            opset_version=OPSET, dynamo=True, verbose=False,
        )
        program.save(str(path), external_data=False)


def export_round(ws: Workspace, *, round_: int | None = None, checkpoint: Path | None = None,
                 fmt: str = "onnx", out: Path | None = None) -> dict[str, Any]:
    """Export a round (default: the latest) to ``out`` (default WS/export/round-K)."""
    from kacl_cli.stages.predict import resolve_checkpoint

    if fmt not in FORMATS:
        raise KaclError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    ckpt = resolve_checkpoint(ws, round_, checkpoint)
    model, meta = load_image_net(ckpt, "cpu", channels_last=False)
    module = ExportModule(model, meta).eval()
    rnd = meta.get("round") if round_ is None else round_
    out = Path(out) if out is not None else ws.root / "export" / f"round-{rnd}"
    name = f"kacl-round-{rnd}.onnx"
    export_onnx(module, out / name, int(meta["image_size"]))
    frac, frac_source = cam_threshold(ws if checkpoint is None else None, rnd)
    side = sidecar(meta, module, name, frac, frac_source, Path(ckpt))
    side_path = out / f"kacl-round-{rnd}.json"
    side_path.write_text(json.dumps(side, indent=2))
    return {"round": rnd, "format": fmt, "model": str(out / name), "sidecar": str(side_path),
            "image_size": int(meta["image_size"]), "findings": len(side["findings"])}
