"""Hand-written Grad-CAM outputs for evaluate/report tests (no model, no cam stage).

Loaded by path from the evaluate tests (pytest runs with --import-mode=importlib, so test
modules cannot import each other). Not a test module itself.
"""

from __future__ import annotations

import numpy as np

from kacl_cli.catalog import insert_rows, label_columns_sql
from kacl_cli.findings import FINDINGS
from kacl_cli.workspace import Workspace

MAP = 4  # side of the fake Grad-CAM maps


def write_fake_round(ws: Workspace, round_: int, *, seed: int = 0, signal: float = 2.0,
                     with_cams: bool = True) -> dict[tuple[str, str], str]:
    """cam_boxes rows for every image and finding of ``ws`` (and /cams/round-K maps).

    Probabilities: sigmoid(signal * (+1 positive / -1 negative) + N(0, 1)), so AUCs are high but
    not perfect. Boxes: the k-th ground-truth (image, finding) pair in catalog order gets the GT
    box itself (k % 3 == 0, IoU 1), the GT box shifted right by half its width (k % 3 == 1,
    IoU 1/3, IoBB 1/2) or no box (k % 3 == 2). Returns {(image_id, finding): kind}.
    """
    rng = np.random.default_rng(seed + 1000 * round_)
    img = ws.catalog.query_df(
        f"SELECT i.image_id, i.row, {label_columns_sql()} FROM images i JOIN labels l "
        "USING (image_id) ORDER BY i.row")
    gt = ws.catalog.query("SELECT image_id, finding, x, y, w, h FROM gt_boxes "
                          "ORDER BY image_id, finding")
    gt_of = {}
    for image_id, finding, x, y, w, h in gt:
        gt_of.setdefault((image_id, finding), (x, y, w, h))
    kinds: dict[tuple[str, str], str] = {}
    for k, key in enumerate(sorted(gt_of)):
        kinds[key] = ("exact", "shift", "none")[k % 3]
    rows = []
    for i, image_id in enumerate(img["image_id"].tolist()):
        for f in FINDINGS:
            pos = bool(img[f][i])
            p = 1.0 / (1.0 + np.exp(-(signal * (1 if pos else -1) + rng.normal())))
            kind = kinds.get((image_id, f))
            box: tuple = (None, None, None, None)
            reason = None
            if kind == "exact":
                box = gt_of[(image_id, f)]
            elif kind == "shift":
                x, y, w, h = gt_of[(image_id, f)]
                box = (x + w / 2, y, w, h)
            elif kind == "none":
                reason = "empty map"
            else:
                box = tuple(float(v) for v in rng.uniform(10, 80, size=4))
            rows.append((round_, image_id, f, float(p), *box, 1.0, 1.0, reason))
    with ws.catalog.connect() as con:
        con.execute("DELETE FROM cam_boxes WHERE round = ?", [round_])
        insert_rows(con, "cam_boxes", rows)
    if with_cams:
        n = len(img["image_id"])
        maps = rng.uniform(0, 1, size=(n, len(FINDINGS), MAP, MAP)).astype(np.float32)
        ws.store.write_cams(round_, np.asarray(img["row"]), maps, n)
    return kinds
