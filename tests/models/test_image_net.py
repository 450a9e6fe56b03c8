"""The image network: shapes, the Grad-CAM contract, gray folding of RGB weights, init paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kacl_cli.errors import CheckpointError, KaclError
from kacl_cli.models import image_net as imnet
from kacl_cli.models.image_net import build_image_net, fold_rgb


@pytest.mark.parametrize("backbone,dim", [("tiny", 64), ("resnet18", 512), ("resnet50", 2048),
                                          ("densenet121", 1024)])
def test_forward_all_contract(backbone: str, dim: int) -> None:
    torch.manual_seed(0)
    model = build_image_net(backbone).eval()
    assert model.backbone == backbone and model.n_classes == 14 and model.feature_dim == dim
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        fmap, pooled, logits = model.forward_all(x)
        plain = model(x)
    assert fmap.shape[:2] == (2, dim) and fmap.ndim == 4
    assert (fmap >= 0).all(), "features must be the activated map (Grad-CAM target)"
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.head(pooled))
    torch.testing.assert_close(plain, logits)
    assert logits.shape == (2, 14)


def test_tiny_map_resolution() -> None:
    fmap = build_image_net("tiny").features(torch.zeros(1, 1, 64, 64))
    assert fmap.shape[-2:] == (8, 8)


def test_unknown_backbone() -> None:
    with pytest.raises(KaclError, match="unknown backbone"):
        build_image_net("vgg11")


def test_fold_rgb_equals_replicated_gray() -> None:
    torch.manual_seed(1)
    rgb = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    gray = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    gray.weight.data = fold_rgb(rgb.weight.data)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def _hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_imagenet_init_never_downloads(tmp_path, monkeypatch) -> None:
    _hub(tmp_path, monkeypatch)
    with pytest.raises(KaclError, match="never downloads"):
        build_image_net("resnet18", init="imagenet")
    with pytest.raises(KaclError, match="no ImageNet weights"):
        build_image_net("tiny", init="imagenet")


def test_imagenet_init_from_cache_folds_stem(tmp_path, monkeypatch) -> None:
    """A cached torchvision file is loaded, its 3-channel stem folded: the gray net computes
    exactly the RGB net's features on the gray image copied into R, G and B."""
    cache = _hub(tmp_path, monkeypatch)
    cache.mkdir(parents=True)
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None).eval()
    torch.save(tv.state_dict(), cache / imnet.imagenet_weights_path("resnet18").name)
    ours = build_image_net("resnet18", init="imagenet").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tv.fc = torch.nn.Identity()
        expected = tv(x.repeat(1, 3, 1, 1))
        got = ours.forward_all(x)[1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_old_densenet_keys_are_renamed() -> None:
    state = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1),
             "features.conv0.weight": torch.ones(1), "classifier.weight": torch.ones(1)}
    renamed = imnet._torchvision_to_ours("densenet121", state)
    assert set(renamed) == {"features.denseblock1.denselayer1.norm1.weight",
                            "features.conv0.weight"}


def test_init_from_path_safetensors_and_torch(tmp_path) -> None:
    torch.manual_seed(3)
    src = build_image_net("tiny")
    st = tmp_path / "w.safetensors"
    save_file({f"image_net.{k}": v.contiguous() for k, v in src.state_dict().items()}
              | {"objective.proj.weight": torch.zeros(2, 2)}, str(st))
    pt = tmp_path / "w.pt"
    torch.save(src.state_dict(), pt)
    for path in (st, pt):
        model = build_image_net("tiny", init=str(path))
        for key, value in src.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_init_from_path_mismatch_is_one_line(tmp_path) -> None:
    pt = tmp_path / "r18.pt"
    torch.save(build_image_net("resnet18").state_dict(), pt)
    with pytest.raises(CheckpointError, match="do not fit a tiny net") as exc:
        build_image_net("tiny", init=str(pt))
    assert "\n" not in str(exc.value)
    head13 = build_image_net("tiny", n_classes=13).state_dict()
    torch.save(head13, pt)
    with pytest.raises(CheckpointError, match="shape"):
        build_image_net("tiny", init=str(pt))


def test_init_from_path_refuses_pickled_objects(tmp_path) -> None:
    bad = tmp_path / "obj.pt"
    torch.save({"model": build_image_net("tiny")}, bad)  # a pickled module, not tensors
    with pytest.raises(CheckpointError, match="not a safetensors or weights-only"):
        build_image_net("tiny", init=str(bad))
    with pytest.raises(CheckpointError, match="no such file"):
        build_image_net("tiny", init=str(tmp_path / "missing.pt"))


def test_init_head_bias_is_the_prevalence_log_odds() -> None:
    model = build_image_net("tiny")
    labels = np.zeros((200, 14), np.float32)
    labels[:20, 0] = 1  # 10 %
    labels[:100, 1] = 1  # 50 %
    # finding 2 never present: clipped to the floor, not -inf
    bias = imnet.init_head_bias(model, labels)
    probs = torch.sigmoid(model.head.bias.detach())
    assert torch.equal(bias, model.head.bias.detach())
    assert probs[0].item() == pytest.approx(0.10, abs=1e-6)
    assert probs[1].item() == pytest.approx(0.50, abs=1e-6)
    assert probs[2].item() == pytest.approx(imnet.PRIOR_FLOOR, rel=1e-4)
    assert torch.isfinite(model.head.bias).all()
    with pytest.raises(ValueError, match="findings"):
        imnet.init_head_bias(model, labels[:, :3])
