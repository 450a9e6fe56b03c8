"""The batched data path: determinism, parity with the item path, extras and affines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from kacl_cli.training.batches import DeviceBatches, device_batches, unwrap
from kacl_cli.training.distributed import EpochSampler
from kacl_cli.training.gpu_augment import augment_batch, draw_params, transform_boxes, uniforms
from kacl_cli.training.loader import StoreDataset, load_split

CPU = torch.device("cpu")


def _epoch_images(ds: StoreDataset, epoch: int, batch: int, workers: int) -> dict[int, tuple]:
    """index -> (image, image2 or None, affine) of one epoch, whatever the batching."""
    sampler = EpochSampler(len(ds), seed=7)
    sampler.set_epoch(epoch)
    it = DeviceBatches(ds, sampler, batch, CPU, workers)
    it.set_epoch(epoch)
    out = {}
    for b in it:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (1, 24, 24)
        for k, i in enumerate(b["index"].tolist()):
            out[i] = (b["image"][k], b["image2"][k] if "image2" in b else None, b["affine"][k])
    return out


def test_epoch_images_do_not_depend_on_workers_or_batch_size(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    split = load_split(ws, "train")
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=True, views=2,
                      image_size=24, seed=3)
    a = _epoch_images(ds, 2, batch=3, workers=0)  # augmented in the main process
    b = _epoch_images(ds, 2, batch=5, workers=2)  # augmented in two worker processes
    assert sorted(a) == sorted(b) == list(range(len(ds)))
    for i in a:
        for x, y in zip(a[i], b[i], strict=True):
            assert torch.equal(x, y)
        assert not torch.equal(a[i][0], a[i][1])  # two independent views
    c = _epoch_images(ds, 3, batch=3, workers=0)
    assert not torch.equal(a[0][0], c[0][0])  # another epoch, other draws


def test_warp_is_torchvisions_affine() -> None:
    """Same inverse matrix and centre as torchvision (compared where no padding is sampled)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 40, 40, generator=g) * 255
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2).round().to(torch.uint8)
    params = draw_params(11, 4, range(6), 0, 40)
    params[:, 4:6] = 1.0  # warp only
    out, _ = augment_batch(x, params, 40)
    cover, _ = augment_batch(torch.full_like(x, 255), params, 40)
    for k in range(6):
        angle, scale, tx, ty = params[k, :4].tolist()
        ref = TF.affine(x[k].float() / 255, angle=angle, translate=[int(tx), int(ty)],
                        scale=scale, shear=[0.0, 0.0],
                        interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        inside = cover[k] > 0.9999
        assert inside.float().mean() > 0.5
        torch.testing.assert_close(out[k][inside], ref[inside], rtol=0, atol=1e-4)


def test_items_and_batches_give_the_same_pixels(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    split = load_split(ws, "train")
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=True, views=2,
                      image_size=24, seed=9)
    batched = _epoch_images(ds, 1, batch=4, workers=0)
    ds.set_epoch(1)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["image"], batched[i][0])
        assert torch.equal(item["image2"], batched[i][1])


def test_uniforms_are_a_function_of_their_key() -> None:
    u = uniforms(1, 2, 0, np.arange(5000), 7)
    assert u.shape == (5000, 7) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    assert np.array_equal(uniforms(1, 2, 0, [4321, 7], 7), u[[4321, 7]])
    for other in (uniforms(1, 3, 0, range(50), 7), uniforms(1, 2, 1, range(50), 7),
                  uniforms(2, 2, 0, range(50), 7)):
        assert not np.isclose(other, u[:50]).any(axis=1).all()


def test_unaugmented_batches_are_the_items(tiny_workspace) -> None:
    ws = tiny_workspace(n=12, size=32)
    split = load_split(ws, "train")
    extras = {"boxes": np.arange(len(split) * 4, dtype=np.float32).reshape(-1, 4),
              "mask": np.arange(len(split)) % 2 == 0}
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=False, extras=extras,
                      image_size=24)
    sampler = EpochSampler(len(ds), seed=1)  # shuffled: rows leave the batch out of order
    for batch in DeviceBatches(ds, sampler, 4, CPU):
        idx = batch["index"].tolist()
        for k, i in enumerate(idx):
            item = ds[i]
            torch.testing.assert_close(batch["image"][k], item["image"].float() / 255,
                                       rtol=0, atol=1e-6)
            assert int(batch["row"][k]) == int(item["row"])
            assert torch.equal(batch["labels"][k], item["labels"])
            assert torch.equal(batch["boxes"][k], item["boxes"])
            assert bool(batch["mask"][k]) == bool(item["mask"])
        # resize only: the affine is the store -> training scale
        expect = torch.tensor([[24 / 32, 0, 0], [0, 24 / 32, 0]], dtype=torch.float32)
        assert torch.allclose(batch["affine"], expect.expand(len(idx), 2, 3))


def test_affine_follows_the_warp() -> None:
    """A bright square drawn in the store image lands where batch["affine"] sends it."""
    x = torch.zeros(8, 1, 64, 64, dtype=torch.uint8)
    x[:, :, 20:28, 36:44] = 255  # box x=36, y=20, w=h=8 in store pixels
    params = draw_params(5, 0, range(8), 0, 48)
    params[:, 4:6] = 1.0
    params[::2, 6] = 1.0  # flip half of them: the matrix must follow
    out, affine = augment_batch(x, params, 48)
    boxes = transform_boxes(torch.tensor([36.0, 20, 8, 8]).expand(8, 4), affine)
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    for k in range(8):
        w = out[k, 0]
        cx, cy = float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())
        bx, by, bw, bh = boxes[k].tolist()
        assert abs(cx - (bx + bw / 2)) < 0.5 and abs(cy - (by + bh / 2)) < 0.5
        assert 5 < bw < 8 and 5 < bh < 8  # 8 * 48/64 = 6, times scale 0.9-1.1, grown by rotation


def test_transform_boxes_identity_and_leading_dims() -> None:
    boxes = torch.tensor([[[1.0, 2, 3, 4], [5, 6, 7, 8]]])  # B=1, K=2
    eye = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    torch.testing.assert_close(transform_boxes(boxes, eye), boxes)
    half = torch.tensor([[[0.5, 0, 1], [0, 0.5, 0]]])
    torch.testing.assert_close(transform_boxes(boxes, half)[0, 0],
                               torch.tensor([1.5, 1.0, 1.5, 2.0]))


def test_subsets_unwrap_and_others_fall_back(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    split = load_split(ws, "train")
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=False,
                      extras={"e": np.arange(len(split))})
    sub = unwrap(torch.utils.data.Subset(ds, [2, 0]))
    assert sub is not None and sub.rows.tolist() == ds.rows[[2, 0]].tolist()
    assert sub.extras["e"].tolist() == [2, 0]
    assert device_batches(torch.utils.data.TensorDataset(torch.zeros(3)), None, 2, CPU) is None


@pytest.mark.parametrize("data_path", ["items", "batched"])
def test_fit_runs_on_both_paths(tiny_workspace, data_path) -> None:
    from kacl_cli.models.checkpoint import model_meta
    from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
    from kacl_cli.models.losses import ClassificationObjective
    from kacl_cli.training.fit import TrainConfig, fit

    ws = tiny_workspace(n=16, size=32)
    tr, va = load_split(ws, "train"), load_split(ws, "val")
    cfg = TrainConfig(epochs=1, batch_size=4, image_size=24, workers=0, device="cpu",
                      data_path=data_path)
    torch.manual_seed(0)
    summary = fit(ws=ws, run=None, stage="pretrain", round_=0, model=build_image_net("tiny"),
                  objective=ClassificationObjective(),
                  train_set=StoreDataset(ws.store.path, tr.rows, tr.labels, augment=True,
                                         image_size=24),
                  val_set=StoreDataset(ws.store.path, va.rows, va.labels, augment=False,
                                       image_size=24),
                  cfg=cfg, meta=model_meta("tiny", 24, 32, GRAY_MEAN, GRAY_STD, 0, "pretrain"),
                  resume=False)
    assert summary["train_images"] == len(tr) and np.isfinite(summary["train_loss"])
