"""Checkpoints: atomic safetensors + meta.json, refusal of broken/foreign ones, preprocess."""

from __future__ import annotations

import json

import pytest
import torch

from kacl_cli.errors import CheckpointError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import (
    load_image_net,
    model_meta,
    preprocess,
    read_checkpoint,
    save_checkpoint,
)
from kacl_cli.models.image_net import build_image_net


def _save(directory, **meta_overrides):
    """A tiny net's checkpoint (meta fields overridable to forge broken ones)."""
    torch.manual_seed(0)
    model = build_image_net("tiny").eval()
    tensors = {f"image_net.{k}": v for k, v in model.state_dict().items()}
    tensors["objective.proj.weight"] = torch.ones(3, 2)
    meta = model_meta("tiny", 32, 64, 0.5, 0.25, 0, "pretrain") | meta_overrides
    save_checkpoint(directory, tensors, meta)
    return model


def test_roundtrip_and_no_temp_left(tmp_path) -> None:
    ckpt = tmp_path / "checkpoints" / "round-0"
    model = _save(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors"]
    assert [p.name for p in ckpt.parent.iterdir()] == ["round-0"]
    tensors, meta = read_checkpoint(ckpt)
    assert meta["kind"] == "kacl-checkpoint" and meta["findings"] == list(FINDINGS)
    assert meta["image_size"] == 32 and meta["in_chans"] == 1
    assert torch.equal(tensors["objective.proj.weight"], torch.ones(3, 2))
    loaded, _ = load_image_net(ckpt)  # objective.* is ignored
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # overwrite in place: still exactly one directory
    _save(ckpt, round=3)
    assert read_checkpoint(ckpt)[1]["round"] == 3
    assert [p.name for p in ckpt.parent.iterdir()] == ["round-0"]


def test_channels_last_in_and_contiguous_out(tmp_path) -> None:
    """Loaded for inference in the fast CPU layout (same outputs), saved contiguous, and the
    plain layout on request (export)."""
    ckpt = tmp_path / "c"
    model = _save(ckpt)
    fast, _ = load_image_net(ckpt)
    plain, _ = load_image_net(ckpt, channels_last=False)
    conv = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv and all(w.is_contiguous(memory_format=torch.channels_last)
                        and not w.is_contiguous() for w in conv if w.shape[1] > 1)
    assert all(m.weight.is_contiguous() for m in plain.modules()
               if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(plain(x), model(x))
    save_checkpoint(tmp_path / "again", {f"image_net.{k}": v
                                         for k, v in fast.state_dict().items()},
                    model_meta("tiny", 32, 64, 0.5, 0.25, 0, "pretrain"))
    tensors, _ = read_checkpoint(tmp_path / "again")
    assert all(t.is_contiguous() for t in tensors.values())


def test_file_path_of_a_checkpoint_is_accepted(tmp_path) -> None:
    _save(tmp_path / "c")
    model, meta = load_image_net(tmp_path / "c" / "model.safetensors")
    assert meta["backbone"] == "tiny" and not model.training


def test_refuses_missing_and_half_written(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    (half / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(half)


def test_refuses_foreign_files(tmp_path) -> None:
    ckpt = tmp_path / "c"
    _save(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(CheckpointError, match="not a kacl checkpoint"):
        read_checkpoint(ckpt)
    (ckpt / "meta.json").write_text("not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(ckpt)
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    with pytest.raises(CheckpointError, match="not a kacl checkpoint"):
        read_checkpoint(plain)


def test_refuses_corrupt_tensors(tmp_path) -> None:
    ckpt = tmp_path / "c"
    _save(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable tensors"):
        load_image_net(ckpt)


def test_refuses_other_vocabulary_and_shapes(tmp_path) -> None:
    _save(tmp_path / "vocab", findings=list(FINDINGS[:13]))
    with pytest.raises(CheckpointError, match="another vocabulary"):
        load_image_net(tmp_path / "vocab")
    _save(tmp_path / "shape", backbone="resnet18")  # tiny tensors, resnet18 meta
    with pytest.raises(CheckpointError, match="do not fit a resnet18"):
        load_image_net(tmp_path / "shape")


def test_preprocess_uint8_and_float_agree() -> None:
    meta = model_meta("tiny", 16, 32, 0.5, 0.25, 0, "pretrain")
    u8 = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8)
    a = preprocess(u8, meta)
    b = preprocess(u8.float().unsqueeze(1) / 255.0, meta)
    assert a.shape == (2, 1, 16, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    flat = preprocess(torch.full((1, 16, 16), 255, dtype=torch.uint8), meta)
    torch.testing.assert_close(flat, torch.full((1, 1, 16, 16), 2.0))  # (1 - 0.5) / 0.25
