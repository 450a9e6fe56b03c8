"""The negative control of ``kacl study``: radiomics positives that belong to another image.

``contrast --shuffle-positives`` keeps every image's positive *set* (same features, same
statistics, same number of contrastive pairs) but hands each image the radiomics of another
training image: a derangement, so no image keeps its own. Whatever the objective gains from the
shuffled setting cannot come from image-specific knowledge, so on a valid benchmark shuffled -
none must not differ from 0 (the positive control, ``--positive-roi oracle``, lives in the ROI
rules: :mod:`kacl_cli.stages.radiomics.rois`).
"""

from __future__ import annotations

import numpy as np


def derangement(m: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..m-1 without fixed points (identity for m < 2: nothing to swap)."""
    if m < 2:
        return np.arange(m)
    order = rng.permutation(m)
    out = np.empty(m, dtype=np.int64)
    out[order] = np.roll(order, -1)  # each element takes its successor in a random cycle
    return out


def shuffle_positives(feats: np.ndarray, has: np.ndarray, seed: int) -> np.ndarray:
    """``feats`` with the rows of images that have a positive deranged among themselves."""
    idx = np.flatnonzero(has)
    perm = derangement(len(idx), np.random.default_rng([seed, 0x5AFF1E]))
    out = feats.copy()
    out[idx] = feats[idx[perm]]
    return out
