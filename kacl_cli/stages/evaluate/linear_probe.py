"""Linear evaluation of a round's features: a probe head refit on the labelled training images.

Why a second AUC beside the model's own: ``kacl study`` asks whether radiomics positives put
knowledge into the image network. The contrastive term acts on the pooled features ``h``; the
classifier head reads ``h`` but learns only from the classification loss of the labelled
images (``--label-fraction``), so while the term moves ``h`` the jointly trained head can lag
behind it. On the 128 px phantoms (docs/contrast.md) the oracle's pooled features were better
than classification-only ones under a refit head, while its own head scored lower: the
model's AUC then mixes "better features" with "a head that did not keep up". The linear
probe separates the two, as the linear evaluation protocol of contrastive learning does
(SimCLR, CLIP): freeze the network, refit one logistic regression per finding on the pooled
features, score the test split.

The probe sees exactly what training saw and nothing more: the train split's labelled
fraction (:func:`kacl_cli.stages.contrast.weak.labelled_mask`, the same images as every
round) with the labels as stored (noisy under ``--label-noise``), standardised with the
statistics of all training images' features (unlabelled images are training data too).
Never the test labels, never ``true_labels``. The L2 strength is fixed (:data:`PROBE_C`),
not tuned per cell. Results are cached beside the workspace's catalog, keyed by the
checkpoint's bytes and the probe's settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from kacl_cli.findings import FINDINGS
from kacl_cli.stages.evaluate.data import EvalData, load_eval_data
from kacl_cli.workspace import Workspace

# Strong L2: a few hundred labelled images against 64-1024 feature dimensions. Fixed before
# any study used it, the same for every setting (a paired comparison needs one rule).
PROBE_C = 0.05
BATCH = 128


def pooled_features(ws: Workspace, round_: int, rows: np.ndarray,
                    device: str = "cpu") -> np.ndarray:
    """The round's global-average-pooled features (what its head reads), in ``rows`` order."""
    import torch

    from kacl_cli.models.checkpoint import load_image_net, preprocess

    model, meta = load_image_net(ws.checkpoint_dir(round_), device=device)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            x = preprocess(torch.from_numpy(ws.store.read_images(rows[i:i + BATCH])), meta,
                           device)
            out.append(model.forward_all(x)[1].float().cpu().numpy())
    dim = int(model.feature_dim)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
              c: float = PROBE_C) -> np.ndarray:
    """Test probabilities (n_test x F) of one logistic regression per finding.

    A finding whose labelled training images are all of one class gets NaN (no score), which
    the metrics leave out of the mean, as they do for a finding without test positives.
    """
    from sklearn.linear_model import LogisticRegression

    out = np.full((len(x_test), y_train.shape[1]), np.nan)
    for j in range(y_train.shape[1]):
        y = y_train[:, j].astype(bool)
        if y.all() or not y.any():
            continue
        clf = LogisticRegression(C=c, max_iter=3000).fit(x_train, y)
        out[:, j] = clf.predict_proba(x_test)[:, 1]
    return out


def _key(ws: Workspace, round_: int, label_fraction: float, c: float) -> str:
    h = hashlib.sha1()
    for p in sorted(ws.checkpoint_dir(round_).glob("*.safetensors")):
        h.update(p.read_bytes())
    h.update(json.dumps({"label_fraction": label_fraction, "c": c}).encode())
    return h.hexdigest()


def probe_eval(ws: Workspace, round_: int, label_fraction: float = 1.0, split: str = "test",
               c: float = PROBE_C, device: str = "cpu",
               data: EvalData | None = None) -> EvalData:
    """``split``'s evaluation data with the model's probabilities replaced by the probe's.

    Everything else (labels, boxes, exclusions) is the model's own, so the result pairs with
    any other evaluation of the same split (:func:`kacl_cli.stages.evaluate.paired.pair_eval`).
    ``data``: that evaluation when the caller has already read it (not read twice).
    """
    from kacl_cli.stages.contrast.weak import labelled_mask
    from kacl_cli.training.loader import load_split

    if data is None:
        data = load_eval_data(ws, round_, split)
    cache = ws.root / f"probe-round-{round_}-{split}.npz"
    key = _key(ws, round_, label_fraction, c)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key and np.array_equal(z["image_ids"].astype(object),
                                                       data.image_ids):
                return replace(data, probs=z["probs"])
    train = load_split(ws, "train")
    mask = labelled_mask(train.image_ids, label_fraction)
    x_train = pooled_features(ws, round_, train.rows, device)
    x_test = pooled_features(ws, round_, data.rows, device)
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    probs = fit_probe((x_train[mask] - mu) / sd, train.labels[mask], (x_test - mu) / sd, c)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, key=np.array(key), image_ids=data.image_ids.astype(str), probs=probs)
    Path(tmp).replace(cache)
    return replace(data, probs=probs)


def mean_auc(data: EvalData) -> float | None:
    """Mean AUC over the findings with both classes and a score (the headline's rule)."""
    from kacl_cli.stages.evaluate.metrics import roc_auc

    aucs = [roc_auc(data.labels[:, j], data.probs[:, j])
            for j in range(len(FINDINGS))
            if data.labels[:, j].any() and not data.labels[:, j].all()
            and np.isfinite(data.probs[:, j]).all()]
    return float(np.mean(aucs)) if aucs else None
