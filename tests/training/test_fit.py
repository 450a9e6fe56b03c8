"""The one training loop: resume == uninterrupted, best-epoch checkpoint, epochs rows,
objective parameters, two-view batches and failure on a non-finite loss."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from kacl_cli.errors import KaclError
from kacl_cli.models.checkpoint import model_meta, read_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.models.losses import ClassificationObjective, Objective
from kacl_cli.training import fit as train
from kacl_cli.training.config import TrainConfig
from kacl_cli.training.fit import fit, mean_auc
from kacl_cli.training.loader import StoreDataset, load_split
from kacl_cli.workspace import Workspace

_ORIGINAL_SAVE = train._save_partial


class Killed(Exception):
    """Stands in for SIGKILL right after an epoch's resume state hit the disk."""


def _setup(ws, views: int = 1):
    tr, va = load_split(ws, "train"), load_split(ws, "val")
    return (
        StoreDataset(ws.store.path, tr.rows, tr.labels, augment=True, views=views, seed=0,
                     image_size=32),
        StoreDataset(ws.store.path, va.rows, va.labels, augment=False, image_size=32),
    )


def _fit(ws, epochs=2, objective=None, views=1, resume=True, **cfg_kw):
    torch.manual_seed(123)  # the model's init; fit seeds everything else itself
    model = build_image_net("tiny")
    train_set, val_set = _setup(ws, views)
    cfg = TrainConfig(epochs=epochs, batch_size=4, image_size=32, workers=0, device="cpu",
                      lr=3e-3, **cfg_kw)
    meta = model_meta("tiny", 32, ws.store.image_size(), GRAY_MEAN, GRAY_STD, 0, "pretrain")
    summary = fit(ws=ws, run=None, stage="pretrain", round_=0, model=model,
                  objective=objective or ClassificationObjective(), train_set=train_set,
                  val_set=val_set, cfg=cfg, meta=meta, resume=resume)
    return model, summary


def _record_saves(monkeypatch, kill_after: int | None = None):
    saved: list[dict] = []
    original = _ORIGINAL_SAVE

    def spy(directory, state):
        original(directory, state)
        saved.append({"epoch": state["epoch"],
                      "model": {k: v.clone() for k, v in state["model"].items()}})
        if kill_after is not None and state["epoch"] == kill_after:
            raise Killed()

    monkeypatch.setattr(train, "_save_partial", spy)
    return saved


def test_resumed_run_equals_uninterrupted(tiny_workspace, monkeypatch) -> None:
    straight_ws = tiny_workspace(n=16, size=32, seed=0)
    ws = Workspace(shutil.copytree(straight_ws.root, straight_ws.root.with_name("twin")))
    straight_saves = _record_saves(monkeypatch)
    _fit(straight_ws, epochs=2)

    _record_saves(monkeypatch, kill_after=1)
    with pytest.raises(Killed):
        _fit(ws, epochs=2)
    assert (ws.checkpoints / "round-0.partial" / "state.pt").is_file()
    assert not ws.checkpoint_dir(0).exists()  # no half-finished final checkpoint

    saves = _record_saves(monkeypatch)
    _, summary = _fit(ws, epochs=2)
    assert [s["epoch"] for s in saves] == [2], "only the missing epoch is trained again"
    # The last epoch's weights (not only the best epoch's) must match.
    last, expected = saves[-1]["model"], straight_saves[-1]["model"]
    assert not torch.equal(expected["head.weight"], straight_saves[0]["model"]["head.weight"])
    for key, value in expected.items():
        torch.testing.assert_close(last[key], value, rtol=0, atol=1e-6)
    a, _ = read_checkpoint(straight_ws.checkpoint_dir(0))
    b, _ = read_checkpoint(ws.checkpoint_dir(0))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert not (ws.checkpoints / "round-0.partial").exists()
    assert ws.catalog.query("SELECT epoch FROM epochs ORDER BY epoch") == [(1,), (2,)]
    assert summary["epochs"] == 2


def test_changed_config_does_not_resume(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=16, size=32)
    _record_saves(monkeypatch, kill_after=1)
    with pytest.raises(Killed):
        _fit(ws, epochs=2)
    saves = _record_saves(monkeypatch)
    _fit(ws, epochs=2, weight_decay=0.5)
    assert [s["epoch"] for s in saves] == [1, 2]


def test_no_resume_starts_afresh(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=16, size=32)
    _record_saves(monkeypatch, kill_after=1)
    with pytest.raises(Killed):
        _fit(ws, epochs=2)
    saves = _record_saves(monkeypatch)
    _fit(ws, epochs=2, resume=False)
    assert [s["epoch"] for s in saves] == [1, 2]


def test_checkpoint_holds_the_best_epoch(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=16, size=32)
    saves = _record_saves(monkeypatch)
    _, summary = _fit(ws, epochs=3)
    tensors, meta = read_checkpoint(ws.checkpoint_dir(0))
    hist = meta["metrics"]["history"]
    aucs = [h["val_mean_auc"] for h in hist]
    best = meta["metrics"]["best_epoch"]
    assert aucs[best - 1] == max(aucs) and summary["best_epoch"] == best
    for key, value in saves[best - 1]["model"].items():
        assert torch.equal(tensors[f"image_net.{key}"], value), key
    rows = ws.catalog.query(
        "SELECT epoch, stage, train_loss, val_mean_auc FROM epochs ORDER BY epoch")
    assert [r[0] for r in rows] == [1, 2, 3] and {r[1] for r in rows} == {"pretrain"}
    assert [r[3] for r in rows] == pytest.approx(aucs)


class _ProjObjective(ClassificationObjective):
    """An objective with its own parameters that also checks the two-view batch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 4)
        self.seen: list[tuple[int, float, float]] = []  # (batch size, cls, agree) per step

    def forward(self, model, batch):
        assert batch["image2"].dtype == torch.float32
        assert batch["image2"].shape == batch["image"].shape
        _, pooled, logits = model.forward_all(batch["image"])
        _, pooled2, _ = model.forward_all(batch["image2"])
        agree = (self.proj(pooled) - self.proj(pooled2)).pow(2).mean()
        cls = self.classification_loss(logits, batch["labels"])
        if self.training:
            self.seen.append((len(batch["labels"]), float(cls.detach()), float(agree.detach())))
        return cls + agree, {"cls": cls.detach(), "contrastive": agree.detach()}


def test_objective_parameters_are_trained_and_saved(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    torch.manual_seed(0)
    objective = _ProjObjective()
    before = objective.proj.weight.detach().clone()
    _fit(ws, epochs=1, objective=objective, views=2)
    tensors, _ = read_checkpoint(ws.checkpoint_dir(0))
    assert not torch.equal(tensors["objective.proj.weight"], before)
    assert torch.equal(tensors["objective.proj.weight"], objective.proj.weight.detach())
    # the epochs row holds the image-weighted means of the steps' parts, and their sum
    train_loss, cls_loss, contrastive = ws.catalog.query(
        "SELECT train_loss, cls_loss, contrastive_loss FROM epochs")[0]
    sizes = np.array([s[0] for s in objective.seen], dtype=float)
    assert len(sizes) >= 2
    want_cls = float(np.average([s[1] for s in objective.seen], weights=sizes))
    want_con = float(np.average([s[2] for s in objective.seen], weights=sizes))
    assert want_con > 0
    assert contrastive == pytest.approx(want_con, rel=1e-5)
    assert cls_loss == pytest.approx(want_cls, rel=1e-5)
    assert train_loss == pytest.approx(want_cls + want_con, rel=1e-5)


class _NanObjective(Objective):
    def forward(self, model, batch):
        loss = model(batch["image"]).sum() * float("nan")
        return loss, {"cls": loss.detach()}

    def classification_loss(self, logits, labels):
        return logits.sum() * 0


def test_non_finite_loss_fails_clearly(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    with pytest.raises(KaclError, match="not finite"):
        _fit(ws, epochs=1, objective=_NanObjective())


def test_mean_auc_skips_single_class_findings() -> None:
    y = np.zeros((4, 14))
    y[:2, 0] = 1
    y[1:, 3] = 1
    p = np.zeros((4, 14))
    p[:, 0] = [0.9, 0.8, 0.1, 0.2]  # perfect
    p[:, 3] = [0.9, 0.1, 0.2, 0.3]  # 0 of 3 positive-negative pairs ranked right
    mean, per = mean_auc(y, p)
    assert set(per) == {"Atelectasis", "Infiltration"}
    assert per["Atelectasis"] == 1.0 and per["Infiltration"] == 0.0 and mean == 0.5
    assert np.isnan(mean_auc(np.zeros((3, 14)), np.zeros((3, 14)))[0])


def test_pretrain_starts_the_head_at_the_train_prevalence(tiny_workspace) -> None:
    """Regression: the head bias started at 0 (p = 0.5 for every finding). AdamW moves a bias
    by ~lr per step, so a short run pushed the logits down through negative head weights
    instead, and Grad-CAM maps (which leave out the bias) came out empty or border-lit."""
    from kacl_cli.stages import pretrain
    from kacl_cli.stages.pretrain import default_lr

    ws = tiny_workspace(n=16, size=32)
    cfg = TrainConfig(epochs=1, batch_size=4, image_size=32, workers=0, device="cpu",
                      lr=1e-9, augment=False)
    pretrain.run(ws, pretrain.PretrainConfig(backbone="tiny", init="none", train=cfg))
    tensors, meta = read_checkpoint(ws.checkpoint_dir(0))
    labels = load_split(ws, "train").labels
    prev = np.clip(labels.mean(axis=0), 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(torch.sigmoid(tensors["image_net.head.bias"]).numpy(), prev,
                               rtol=1e-3)
    assert json_config(ws)["head_bias"] == "prior"
    assert default_lr("none") > default_lr("imagenet")


def json_config(ws) -> dict:
    import json

    (config,) = ws.catalog.query("SELECT config_json FROM runs WHERE stage = 'pretrain'")[0]
    return json.loads(config)
