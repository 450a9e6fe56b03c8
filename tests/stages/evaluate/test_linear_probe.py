"""The linear probe of `kacl study`: refit on the labelled training images only, cached."""

from __future__ import annotations

import numpy as np

from kacl_cli.findings import FINDINGS
from kacl_cli.stages.contrast.weak import labelled_mask
from kacl_cli.stages.evaluate import linear_probe
from kacl_cli.stages.evaluate.linear_probe import fit_probe, mean_auc, probe_eval
from kacl_cli.training.loader import load_split


def test_fit_probe_learns_a_separable_finding_and_skips_one_class_ones() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = np.zeros((60, 3), bool)
    y[:, 0] = x[:, 1] > 0  # finding 0 follows feature 1
    y[:, 2] = True  # finding 2 never negative: nothing to fit
    xt = rng.normal(size=(40, 4))
    p = fit_probe(x, y, xt)
    assert np.isnan(p[:, 1]).all() and np.isnan(p[:, 2]).all()
    assert np.isfinite(p[:, 0]).all()
    assert ((p[:, 0] > 0.5) == (xt[:, 1] > 0)).mean() > 0.9


def _set_labels(ws, image_ids: list[str], value: bool) -> None:
    for f in FINDINGS[:4]:
        for i in image_ids:
            ws.catalog.execute(f'UPDATE labels SET "{f}" = ? WHERE image_id = ?', [value, i])


def test_probe_reads_only_the_labelled_training_images(pretrained_ws, monkeypatch) -> None:
    ws = pretrained_ws
    first = probe_eval(ws, 0, label_fraction=0.5)
    assert first.probs.shape == (len(first.image_ids), len(FINDINGS))
    assert np.isfinite(first.probs).any()

    # the cache answers a second call without running the network
    def no_net(*_a, **_k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(linear_probe, "pooled_features", no_net)
    again = probe_eval(ws, 0, label_fraction=0.5)
    np.testing.assert_array_equal(again.probs, first.probs)
    monkeypatch.undo()

    train = load_split(ws, "train")
    mask = labelled_mask(train.image_ids, 0.5)
    ids = np.asarray(train.image_ids)
    # other labels on images outside the labelled fraction: the probe cannot see them
    _set_labels(ws, list(ids[~mask]), True)
    for f in ws.root.glob("probe-round-*"):
        f.unlink()
    unseen = probe_eval(ws, 0, label_fraction=0.5)
    np.testing.assert_allclose(unseen.probs, first.probs, equal_nan=True)
    # other labels on the labelled images change the fit (another key: recomputed anyway)
    _set_labels(ws, list(ids[mask][: max(1, mask.sum() // 2)]), True)
    for f in ws.root.glob("probe-round-*"):
        f.unlink()
    seen = probe_eval(ws, 0, label_fraction=0.5)
    assert not np.allclose(seen.probs[:, :4], first.probs[:, :4], equal_nan=True)
    # another labelled fraction is another cache key, not the cached answer
    whole = probe_eval(ws, 0, label_fraction=1.0)
    assert whole.probs.shape == first.probs.shape
    value = mean_auc(whole)
    assert value is None or 0.0 <= value <= 1.0


def test_probe_keeps_the_models_pairs(pretrained_ws) -> None:
    from kacl_cli.stages.evaluate.data import load_eval_data

    model = load_eval_data(pretrained_ws, 0, "test")
    probe = probe_eval(pretrained_ws, 0, label_fraction=1.0)
    np.testing.assert_array_equal(model.image_ids, probe.image_ids)
    np.testing.assert_array_equal(model.labels, probe.labels)
    np.testing.assert_array_equal(model.pair_image, probe.pair_image)


def test_mean_auc_without_scores_is_none(pretrained_ws) -> None:
    data = probe_eval(pretrained_ws, 0, label_fraction=1.0)
    data.probs[:] = np.nan
    assert mean_auc(data) is None
