"""torchxrayvision DenseNet-121 import: names, logits, maps, calibration, the CLI.

torchxrayvision is an optional extra (``kacl[xrv]``). Without it, the source state dict is
built from the recorded list of its parameter names and shapes (:func:`xrv_param_shapes`,
written from xrv's ``models.DenseNet``: torchvision-style ``features.*`` on one input
channel, ``classifier = Linear(1024, 18)``, an ``op_threshs`` buffer of 18 operating points
with NaN for untrained outputs), and the source forward is the reference one xrv runs:
``features -> relu -> adaptive_avg_pool2d -> classifier`` (then sigmoid + ``op_norm`` when
op_threshs are set). With torchxrayvision installed, :func:`test_real_xrv_class` builds the
source with the real class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.errors import CheckpointError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import load_image_net, preprocess
from kacl_cli.models.xrv import XRV_TARGETS, convert, map_targets, op_norm, read_source
from kacl_cli.stages.cam.gradcam import autograd_gradcam, batched_gradcam

runner = CliRunner()
# densenet121-res224-nih: trained on NIH's 14, the last four outputs untrained (NaN op_threshs)
NIH_OP = [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932,
          0.012037827, 0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467,
          0.037198864, 0.0004403434] + [float("nan")] * 4


def _bn(prefix: str, c: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{name}", (c,)
    yield f"{prefix}.num_batches_tracked", ()


def xrv_param_shapes() -> Iterator[tuple[str, tuple[int, ...]]]:
    """xrv DenseNet-121's state-dict names and shapes (growth 32, blocks 6/12/24/16, bn_size
    4, 64 initial features, 1 input channel, 18 outputs, op_threshs buffer)."""
    yield "features.conv0.weight", (64, 1, 7, 7)
    yield from _bn("features.norm0", 64)
    c = 64
    for b, n_layers in enumerate((6, 12, 24, 16), start=1):
        for i in range(1, n_layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            yield from _bn(f"{p}.norm1", c)
            yield f"{p}.conv1.weight", (128, c, 1, 1)
            yield from _bn(f"{p}.norm2", 128)
            yield f"{p}.conv2.weight", (32, 128, 3, 3)
            c += 32
        if b < 4:
            yield from _bn(f"features.transition{b}.norm", c)
            yield f"features.transition{b}.conv.weight", (c // 2, c, 1, 1)
            c //= 2
    yield from _bn("features.norm5", c)
    yield "classifier.weight", (18, c)
    yield "classifier.bias", (18,)
    yield "op_threshs", (18,)


def xrv_state(seed: int = 0, op: list[float] | None = None) -> dict[str, torch.Tensor]:
    """A random but well-scaled xrv DenseNet-121 state dict (BatchNorm stats plausible)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in xrv_param_shapes():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith(("running_mean", ".bias")):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name == "op_threshs":
            state[name] = torch.tensor(op if op is not None else NIH_OP, dtype=torch.float32)
        elif name.endswith("norm0.weight") or ".norm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # conv / linear: He-scaled
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """xrv's DenseNet forward before the sigmoid, on torchvision's DenseNet (same layout):
    features -> relu -> adaptive_avg_pool2d -> classifier. Strict loading checks the names."""
    net = torchvision.models.densenet121(weights=None, num_classes=18)
    net.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.load_state_dict({k: v for k, v in state.items() if k != "op_threshs"}, strict=True)
    net.eval()
    with torch.no_grad():
        feats = net.features(x)
        pooled = F.adaptive_avg_pool2d(F.relu(feats), (1, 1)).flatten(1)
        return net.classifier(pooled)


def test_recorded_names_match_torchvision_layout() -> None:
    names = dict(xrv_param_shapes())
    assert names["features.denseblock4.denselayer16.conv2.weight"] == (32, 128, 3, 3)
    assert names["features.norm5.weight"] == (1024,)
    tv = torchvision.models.densenet121(weights=None).state_dict()
    assert set(names) - {"op_threshs"} == set(tv)  # every name, no extra, no missing


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return xrv_state(seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (2, 64, 64), generator=g, dtype=torch.uint8)


def _meta() -> dict:
    return {"image_size": 64, "normalisation": {"mean": 0.5, "std": 1 / 2048}}


def test_imported_logits_equal_source(source, images) -> None:
    imp = convert(source)
    assert imp.mapping.missing == [] and imp.mapping.untrained == list(XRV_TARGETS[14:])
    x = preprocess(images, _meta())
    assert float(x.min()) >= -1024 and float(x.max()) <= 1024 and float(x.max()) > 900
    ref = reference_forward(source, x)
    with torch.no_grad():
        ours = imp.model(x)
    rows = [XRV_TARGETS.index(f) for f in FINDINGS]
    assert torch.allclose(ours, ref[:, rows], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, ref[:, :14], atol=1e-3)  # the order really changed


def test_gradcam_stays_exact_on_imported_net(source, images) -> None:
    model = convert(source).model
    x = preprocess(images, _meta())
    logits, maps = batched_gradcam(model, x)
    ref_logits, ref_maps = autograd_gradcam(model, x)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    # float32 sums of ~1000 terms of size ~100: agree to 1e-5 of the peak
    assert torch.allclose(maps, ref_maps, atol=1e-5 * float(ref_maps.max()), rtol=1e-5)
    assert float(maps.max()) > 0


def test_preprocess_maps_pixels_to_xrv_range() -> None:
    px = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)
    x = preprocess(px, {"image_size": 2, "normalisation": {"mean": 0.5, "std": 1 / 2048}})
    expected = 2048 * px.float() / 255 - 1024  # xrv.datasets.normalize(img, 255)
    assert torch.allclose(x[0, 0], expected, atol=1e-3)


def test_calibration_puts_half_at_the_operating_point(source, images) -> None:
    x = preprocess(images, _meta())
    plain, cal = convert(source), convert(source, calibrate=True)
    with torch.no_grad():
        p_cal = torch.sigmoid(cal.model(x)).numpy()
        p_src = torch.sigmoid(reference_forward(source, x)).numpy()
    rows = [XRV_TARGETS.index(f) for f in FINDINGS]
    normed = op_norm(p_src, np.array(NIH_OP))[:, rows]
    assert ((p_cal > 0.5) == (normed > 0.5)).all()
    assert np.allclose(op_norm(np.array(NIH_OP[:3]), np.array(NIH_OP[:3])), 0.5)
    assert op_norm(np.array([0.3]), np.array([np.nan]))[0] == 0.5
    # maps depend on the weights only: calibration changes no map
    assert torch.equal(plain.model.head.weight, cal.model.head.weight)
    assert not torch.equal(plain.model.head.bias, cal.model.head.bias)
    assert plain.op_threshs[0] == pytest.approx(NIH_OP[0])


def test_missing_findings_get_fresh_rows_or_refusal(source) -> None:
    chex = ["Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "",
            "Effusion", "Pneumonia", "", "Cardiomegaly", "", "", "", "Lung Lesion",
            "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
    op = [0.1] * 18
    state = {**source, "op_threshs": torch.tensor(op)}
    imp = convert(state, chex, prior={"Mass": 0.05})
    assert set(imp.mapping.missing) == {"Infiltration", "Mass", "Nodule", "Emphysema",
                                        "Fibrosis", "Pleural_Thickening", "Hernia"}
    assert "Fracture" in imp.mapping.unused
    mass = FINDINGS.index("Mass")
    assert float(imp.model.head.weight[mass].detach().abs().sum()) == 0.0
    assert float(imp.model.head.bias[mass].detach()) == pytest.approx(np.log(0.05 / 0.95), abs=1e-5)
    with pytest.raises(CheckpointError, match="lacks 7"):
        convert(state, chex, strict=True)
    with pytest.raises(CheckpointError, match="18 outputs"):
        convert(state, chex[:10])


def test_name_matching_ignores_case_and_separators() -> None:
    m = map_targets(["pleural thickening", "EFFUSION", "Infiltrate"])
    assert m.rows[FINDINGS.index("Pleural_Thickening")] == 0
    assert m.rows[FINDINGS.index("Effusion")] == 1
    assert m.rows[FINDINGS.index("Infiltration")] == 2


def test_cli_import_then_skip_then_refuse_other(tmp_path, tiny_workspace, source) -> None:
    from safetensors.torch import save_file

    ws = tiny_workspace(n=8, size=32)
    f = tmp_path / "xrv-nih.safetensors"
    save_file(source, str(f), metadata={"targets": json.dumps(list(XRV_TARGETS[:14]) + [""] * 4)})
    res = runner.invoke(app, ["import", "xrv", str(f), "-w", str(ws.root), "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["mapped"] == 14 and summary["missing"] == []
    model, meta = load_image_net(ws.checkpoint_dir(0))
    assert meta["normalisation"]["range"] == [-1024.0, 1024.0] and meta["image_size"] == 224
    assert meta["store_size"] == 32 and meta["source"]["kind"] == "torchxrayvision"
    x = torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8)
    xin = preprocess(x, {**meta, "image_size": 64})
    rows = [XRV_TARGETS.index(fd) for fd in FINDINGS]
    with torch.no_grad():
        ours, ref = model(xin), reference_forward(source, xin)[:, rows]
        # float32 sums over 1024 features of a randomly initialised net reach ~1e3 here: equal
        # to 1e-5 of that scale (an absolute 1e-5 would test the summation order, not the import)
        assert torch.allclose(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    cam = runner.invoke(app, ["cam", "--round", "0", "--split", "test", "--device", "cpu",
                              "-w", str(ws.root), "--json"])  # stages use it unchanged
    assert cam.exit_code == 0, cam.stderr
    assert ws.catalog.count("cam_boxes", "round = 0") == 2 * len(FINDINGS)
    again = runner.invoke(app, ["import", "xrv", str(f), "-w", str(ws.root)])
    assert again.exit_code == 0 and "done, skipping" in again.stderr
    pt = tmp_path / "other.pt"
    torch.save({**source, "classifier.bias": source["classifier.bias"] + 1}, pt)
    other = runner.invoke(app, ["import", "xrv", str(pt), "-w", str(ws.root)])
    assert other.exit_code == 1 and "--force" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    forced = runner.invoke(app, ["import", "xrv", str(pt), "-w", str(ws.root), "--force"])
    assert forced.exit_code == 0, forced.stderr


def test_pickled_module_is_refused(tmp_path) -> None:
    f = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), f)  # a pickled module, as xrv's own weights files
    with pytest.raises(CheckpointError, match="weights-only"):
        read_source(f)


def test_real_xrv_class() -> None:
    xrv = pytest.importorskip(
        "torchxrayvision", reason="torchxrayvision not installed (pip install 'kacl[xrv]')")
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None, op_threshs=torch.tensor(NIH_OP))
    net.eval()
    state = net.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(xrv_param_shapes())
    imp = convert(state, list(net.targets))
    x = preprocess(torch.randint(0, 256, (2, 224, 224), dtype=torch.uint8),
                   {"image_size": 224, "normalisation": {"mean": 0.5, "std": 1 / 2048}})
    with torch.no_grad():
        logits = net.classifier(net.features2(x))
        ours = imp.model(x)
    rows = [list(net.targets).index(f) for f in FINDINGS]
    assert torch.allclose(ours, logits[:, rows], atol=1e-5, rtol=1e-5)
    # --calibrate decides like xrv's own op_norm output at 0.5
    with torch.no_grad():
        normed = net(x)[:, rows]
        p_cal = torch.sigmoid(convert(state, list(net.targets), calibrate=True).model(x))
    assert torch.equal(p_cal > 0.5, normed > 0.5)
