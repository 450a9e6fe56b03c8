"""kacl export: the exportable module equals kacl's own outputs; ONNX when installed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.models.checkpoint import IMAGE_PREFIX, model_meta, preprocess, save_checkpoint
from kacl_cli.models.export import ExportModule
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.stages.cam.gradcam import batched_gradcam

runner = CliRunner()
SIZE = 32


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_image_net("tiny")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (n, SIZE, SIZE), generator=g, dtype=torch.uint8)


def _kacl_outputs(model, meta, images):
    x = preprocess(images, meta)
    logits, maps = batched_gradcam(model, x)
    return torch.sigmoid(logits), maps


@pytest.mark.parametrize("norm", [(GRAY_MEAN, GRAY_STD), (0.5, 1 / 2048)])
def test_export_module_equals_kacl(norm) -> None:
    model = _model()
    meta = {"image_size": SIZE, "normalisation": {"mean": norm[0], "std": norm[1]}}
    images = _images()
    probs, maps = ExportModule(model, meta)(images.float().unsqueeze(1) / 255.0)
    ref_probs, ref_maps = _kacl_outputs(model, meta, images)
    assert probs.shape == (3, 14) and maps.shape == ref_maps.shape
    assert torch.allclose(probs, ref_probs, atol=1e-4)
    assert torch.allclose(maps, ref_maps, atol=1e-4 * (1 + float(ref_maps.max())))
    assert float(ref_maps.max()) > 0  # maps are not trivially zero


def _workspace_with_round(tmp_path):
    from kacl_cli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.init()
    model = _model(1)
    meta = model_meta("tiny", SIZE, SIZE, GRAY_MEAN, GRAY_STD, 0, "pretrain")
    save_checkpoint(ws.checkpoint_dir(0),
                    {IMAGE_PREFIX + k: v for k, v in model.state_dict().items()}, meta)
    run = ws.begin("cam", {"round": 0, "threshold": 0.4, "split": "all"}, "fp", round_=0)
    run.finish({})
    return ws, model, meta


def test_missing_onnx_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    ws, _, _ = _workspace_with_round(tmp_path)
    res = runner.invoke(app, ["export", "--round", "0", "-w", str(ws.root)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'kacl[onnx]'" in lines[0]


def test_onnx_runtime_matches_kacl(tmp_path) -> None:
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'kacl[onnx]')")
    ort = pytest.importorskip("onnxruntime",
                              reason="onnxruntime not installed (pip install 'kacl[onnx]')")
    ws, model, meta = _workspace_with_round(tmp_path)
    res = runner.invoke(app, ["export", "--round", "0", "--format", "onnx", "-w", str(ws.root),
                              "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    side = json.loads(open(summary["sidecar"]).read())
    assert side["findings"][0] == "Atelectasis" and side["input"]["shape"][-1] == SIZE
    assert side["boxes"]["frac"] == 0.4 and side["normalisation"]["mean"] == GRAY_MEAN
    session = ort.InferenceSession(summary["model"], providers=["CPUExecutionProvider"])
    images = _images(5)  # another batch size than the export example: dynamic batch
    probs, maps = session.run(None, {"image": images.numpy()[:, None].astype(np.float32) / 255})
    ref_probs, ref_maps = _kacl_outputs(model, meta, images)
    assert np.allclose(probs, ref_probs.numpy(), atol=1e-4)
    assert np.allclose(maps, ref_maps.numpy(), atol=1e-4 * (1 + float(ref_maps.max())))
    assert list(side["outputs"]["cam_maps"]["shape"][2:]) == list(maps.shape[2:])
