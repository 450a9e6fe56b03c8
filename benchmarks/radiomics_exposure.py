"""The exposure confound of radiomics positives: does an ROI's first-order Mean follow its
whole image's mean grey level?

Raw 8-bit first-order features carry each image's exposure, so a model can match an image
to its radiomics positive by brightness alone. pyradiomics' ``normalize`` (kacl:
``kacl_cli/stages/radiomics/normalized_params.yaml``) should remove that. This reads a
workspace's radiomics of one round (one settings hash), and prints the Pearson correlation
between ``original_firstorder_Mean`` of each ROI and the mean of its whole stored image,
over all ROIs and over the lesion-free ones (the ROI's finding is not among the image's
labels, so the rectangle shows anatomy and exposure, not the lesion). A correlation with
the image mean is not all of the confound (normalised values are ``(x - mu) / sigma``, which
can follow ``mu`` by construction), so it also prints how much of each feature the image's
own (mean, SD) predict: the cross-validated R^2 of a linear fit, for the Mean and the
median over all features. That is what "matching an image to its radiomics by exposure"
needs.

Usage (after prepare, pretrain, cam, and radiomics once with and once without the params):
    python -m benchmarks.radiomics_exposure -w WS [--round 0] [--settings-hash H ...]
Without --settings-hash, every settings hash that has radiomics for the round is reported.
    python -m benchmarks.radiomics_exposure --nih [../shared/nih-sample] [--size 256]
runs the same numbers on real X-rays instead: every sample image at the store size, 4 real
NIH boxes each (sizes and positions of ``BBox_List_2017.csv``, so they lie on anatomy), fast
backend, default vs normalised settings (no lesion-free split: no labels are read).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kacl_cli.catalog import quote_ident
from kacl_cli.workspace import Workspace

MEAN = "original_firstorder_Mean"


def rows(ws: Workspace, round_: int, shash: str
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ROI Mean, store row, lesion-free flag, all features) of every ROI with features."""
    names = [n for (n,) in ws.catalog.query(
        "SELECT name FROM radiomics_features WHERE settings_hash = ? ORDER BY feature_index",
        [shash])]
    j = names.index(MEAN)
    data = ws.catalog.query(
        "SELECT r.features, i.row, r.finding, r.image_id FROM radiomics r "
        "JOIN images i USING (image_id) WHERE r.round = ? AND r.settings_hash = ? "
        "AND r.features IS NOT NULL ORDER BY i.row", [round_, shash])
    findings = sorted({f for _, _, f, _ in data})
    labels: dict[tuple[str, str], int] = {}
    for f in findings:
        try:
            for image_id, v in ws.catalog.query(
                    f"SELECT image_id, {quote_ident(f)} FROM labels"):
                labels[(image_id, f)] = int(v or 0)
        except Exception:  # noqa: BLE001 - a finding without a label column (e.g. No Finding)
            continue
    feats = np.array([f for f, _, _, _ in data], dtype=np.float64)
    mean = feats[:, j]
    row = np.array([r for _, r, _, _ in data], dtype=np.int64)
    free = np.array([labels.get((i, f), 1) == 0 for _, _, f, i in data], dtype=bool)
    return mean, row, free, feats


def r2_from_exposure(x: np.ndarray, y: np.ndarray) -> float:
    """5-fold cross-validated R^2 of a linear fit of y on the image statistics x."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_score

    if not np.isfinite(y).all() or np.std(y) == 0:
        return float("nan")
    folds = KFold(5, shuffle=True, random_state=0)  # ROIs come sorted by image
    return float(cross_val_score(LinearRegression(), x, y, cv=folds, scoring="r2").mean())


def report(name: str, mean: np.ndarray, feats: np.ndarray, image_mean: np.ndarray,
           image_sd: np.ndarray, free: np.ndarray | None = None) -> None:
    """One line: correlations with the image mean and R^2 from the image's (mean, SD)."""
    r_all = np.corrcoef(mean, image_mean)[0, 1]
    r_free, n_free = float("nan"), 0
    if free is not None and free.sum() > 2:
        r_free, n_free = np.corrcoef(mean[free], image_mean[free])[0, 1], int(free.sum())
    x = np.column_stack([image_mean, image_sd])
    r2 = [r2_from_exposure(x, feats[:, k]) for k in range(feats.shape[1])]
    print(f"{name:>18}{len(mean):>6}{r_all:>9.3f}{n_free:>13}{r_free:>9.3f}"
          f"{r2_from_exposure(x, mean):>9.3f}{np.nanmedian(r2):>19.3f}")


HEADER = (f"{'settings':>18}{'ROIs':>6}{'r(all)':>9}{'lesion-free':>13}{'r(free)':>9}"
          f"{'R2 Mean':>9}{'R2 median feature':>19}")


def nih(sample: Path, size: int, per_image: int = 4, seed: int = 0) -> None:
    from benchmarks.radiomics_pyrad_bench import read_boxes
    from kacl_cli.imageio import load_for_store
    from kacl_cli.stages.radiomics import settings as S
    from kacl_cli.stages.radiomics.backends.fast.backend import FastBackend
    from kacl_cli.stages.radiomics.rois import store_box

    rng = np.random.default_rng(seed)
    boxes = read_boxes(sample)
    pixels = [load_for_store(f, size)[0] for f in sorted((sample / "images").glob("*.png"))]
    images, rois = [], []
    for px in pixels:
        for b in rng.choice(len(boxes), per_image, replace=False):
            images.append(px)
            rois.append(store_box(tuple(boxes[b]), 1024, 1024, size))
    image_mean = np.array([im.mean() for im in images])
    image_sd = np.array([im.std() for im in images])
    print(f"NIH sample: {len(pixels)} images at {size} px, {per_image} real boxes each")
    print(HEADER)
    for name, params in (("default", None), ("normalized", S.NORMALIZED_PARAMS)):
        settings = S.load_settings(params)
        feats = FastBackend().extract(images, rois, settings).features
        j = S.feature_names(settings).index(MEAN)
        ok = np.isfinite(feats[:, j])
        report(name, feats[ok, j], feats[ok], image_mean[ok], image_sd[ok])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", type=Path)
    ap.add_argument("--nih", type=Path, nargs="?", const=Path("../shared/nih-sample"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--settings-hash", action="append", default=None)
    args = ap.parse_args()
    if args.nih is not None:
        nih(args.nih, args.size)
        return
    if args.workspace is None:
        ap.error("-w WORKSPACE or --nih")
    ws = Workspace(args.workspace)
    hashes = args.settings_hash or [h for (h,) in ws.catalog.query(
        "SELECT DISTINCT settings_hash FROM radiomics WHERE round = ? AND features IS NOT NULL",
        [args.round])]
    pixels = ws.store.read_images(np.arange(ws.store.n_rows())).reshape(ws.store.n_rows(), -1)
    image_means, image_sds = pixels.mean(axis=1), pixels.std(axis=1)
    print(HEADER)
    for shash in hashes:
        mean, row, free, feats = rows(ws, args.round, shash)
        report(shash, mean, feats, image_means[row], image_sds[row], free)


if __name__ == "__main__":
    main()
