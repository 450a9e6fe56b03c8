"""What the evaluate stage reads for one (round, split): labels, cam_boxes, GT boxes, and the
ranked boxes 2..K of ``cam --max-boxes K`` (``cam_boxes_ranked``) for the "any of K" column.

:func:`load_eval_data` queries the catalog once and returns an :class:`EvalData` of aligned
arrays (one row per image, ordered by store row; one pair per ground-truth box of a box
finding), which the pure metrics (:mod:`kacl_cli.stages.evaluate.metrics`) and the report
(:mod:`kacl_cli.stages.evaluate.report`) take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from kacl_cli.catalog import label_columns_sql
from kacl_cli.errors import NotReadyError
from kacl_cli.findings import BOX_FINDINGS, BOX_LABEL_ALIASES, FINDINGS
from kacl_cli.stages.cam.parts import state_key as cam_state_key
from kacl_cli.workspace import Workspace

# Patients any of whose images lent its boxes to training (box_supervision).
_SUP_PATIENTS = ("SELECT DISTINCT si.patient_id FROM images si "
                 "JOIN box_supervision sb USING (image_id)")


@dataclass
class EvalData:
    """Everything the metrics and the report need for one (round, split)."""

    round: int
    split: str
    image_ids: np.ndarray            # n, ordered by store row
    rows: np.ndarray                 # n store rows
    orig_size: np.ndarray            # n x 2 (width, height) original pixels
    labels: np.ndarray               # n x 14 bool
    probs: np.ndarray                # n x 14, NaN where cam_boxes has no row
    pred: np.ndarray                 # n x 14 x 4 predicted boxes (original px), NaN if none
    # localization pairs: one per ground-truth box of a box finding, minus excluded images
    pair_image: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    pair_finding: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    pair_gt: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))
    n_excluded_images: int = 0       # split images with GT boxes that supervised training
    n_excluded_pairs: int = 0
    n_missing_cam_images: int = 0    # split images without any cam_boxes row for the round
    n_other_gt: int = 0              # GT boxes of findings outside the 8 box findings (ignored)
    n_fit_pairs: int = 0             # GT boxes of the split the box rules were fitted on
    map_hw: tuple[int, int] | None = None  # the round's map size (grid ceiling)
    box_rules: list = field(default_factory=list)  # box_rules.source rows of the round
    # boxes 2..K of `cam --max-boxes K` (n x 14 x K-1 x 4, NaN where a map had fewer
    # components); K = 1 (no ranked boxes asked for) leaves it n x 14 x 0 x 4
    ranked: np.ndarray | None = None
    max_boxes: int = 1

    @property
    def pair_pred(self) -> np.ndarray:
        return self.pred[self.pair_image, self.pair_finding]

    @property
    def pair_pred_k(self) -> np.ndarray:
        """Every ranked box of each pair's (image, finding), top box first: m x K x 4."""
        top = self.pair_pred[:, None, :]
        if self.ranked is None or self.ranked.shape[2] == 0:
            return top
        return np.concatenate([top, self.ranked[self.pair_image, self.pair_finding]], axis=1)


def _index_of(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each value in ``keys`` (-1 when absent)."""
    lookup = {k: i for i, k in enumerate(keys.tolist())}
    return np.fromiter((lookup.get(v, -1) for v in values.tolist()), dtype=np.int64,
                       count=len(values))


def _canonical(names: np.ndarray) -> np.ndarray:
    return np.array([BOX_LABEL_ALIASES.get(n, n) for n in names.tolist()], dtype=object)


def load_eval_data(ws: Workspace, round_: int, split: str) -> EvalData:
    """Read labels, cam_boxes of the round and GT boxes of one split from the catalog."""
    cat = ws.catalog
    cat.ensure_tables("box_rules", "box_rule_images", "cam_boxes_ranked")
    img = cat.query_df(
        f"SELECT i.image_id, i.row, i.orig_width, i.orig_height, {label_columns_sql()} "
        "FROM images i JOIN labels l USING (image_id) WHERE i.split = ? "
        f"AND i.patient_id NOT IN ({_SUP_PATIENTS}) ORDER BY i.row",
        [split],
    )
    # Every image of a patient whose boxes supervised training leaves every evaluation, AUC
    # included: follow-ups of that patient are near-duplicates of the supervised images.
    n_sup_images, n_sup_pairs = cat.query(
        "SELECT count(DISTINCT i.image_id), count(g.image_id) FROM images i "
        f"LEFT JOIN gt_boxes g USING (image_id) WHERE i.patient_id IN ({_SUP_PATIENTS}) "
        "AND i.split = ?",
        [split],
    )[0]
    # GT boxes the round's box rules were fitted on are not scored (never fit on the scored).
    n_fit_pairs = cat.query(
        "SELECT count(*) FROM gt_boxes g JOIN images i USING (image_id) WHERE i.split = ? AND "
        "g.image_id IN (SELECT image_id FROM box_rule_images WHERE round = ?)", [split, round_],
    )[0][0]
    ids = np.asarray(img["image_id"], dtype=object)
    n = len(ids)
    if n == 0:
        raise NotReadyError(f"no labelled images in split {split!r} of {ws.root}")
    labels = np.stack([np.asarray(img[f], dtype=bool) for f in FINDINGS], axis=1)
    cam = cat.query_df(
        "SELECT c.image_id, c.finding, c.probability, c.x, c.y, c.w, c.h FROM cam_boxes c "
        "JOIN images i USING (image_id) WHERE c.round = ? AND i.split = ?",
        [round_, split],
    )
    probs = np.full((n, len(FINDINGS)), np.nan)
    pred = np.full((n, len(FINDINGS), 4), np.nan)
    ii = _index_of(np.asarray(cam["image_id"], dtype=object), ids)
    ff = _index_of(_canonical(np.asarray(cam["finding"], dtype=object)), np.array(FINDINGS))
    ok = (ii >= 0) & (ff >= 0)
    probs[ii[ok], ff[ok]] = np.asarray(cam["probability"], dtype=np.float64)[ok]
    box = np.stack([np.ma.filled(np.ma.asarray(cam[k], dtype=np.float64), np.nan)
                    for k in ("x", "y", "w", "h")], axis=1) if len(ii) else np.empty((0, 4))
    pred[ii[ok], ff[ok]] = box[ok]
    has_cam = np.zeros(n, dtype=bool)
    has_cam[ii[ok]] = True
    max_boxes, ranked = _ranked_boxes(ws, round_, split, ids)

    gt = cat.query_df(
        "SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h FROM gt_boxes g "
        "JOIN images i USING (image_id) WHERE i.split = ? "
        f"AND i.patient_id NOT IN ({_SUP_PATIENTS}) "
        "AND g.image_id NOT IN (SELECT image_id FROM box_rule_images WHERE round = ?) "
        "ORDER BY g.image_id, g.finding, g.x, g.y",
        [split, round_],
    )
    gi = _index_of(np.asarray(gt["image_id"], dtype=object), ids)
    gf = _index_of(_canonical(np.asarray(gt["finding"], dtype=object)), np.array(BOX_FINDINGS))
    gbox = np.stack([np.asarray(gt[k], dtype=np.float64) for k in ("x", "y", "w", "h")], axis=1)
    in_split = gi >= 0  # GT of an image without a labels row: not evaluable
    keep = in_split & (gf >= 0)
    return EvalData(
        round=round_, split=split, image_ids=ids,
        rows=np.asarray(img["row"], dtype=np.int64),
        orig_size=np.stack([np.asarray(img["orig_width"], dtype=np.float64),
                            np.asarray(img["orig_height"], dtype=np.float64)], axis=1),
        labels=labels, probs=probs, pred=pred,
        pair_image=gi[keep], pair_finding=gf[keep], pair_gt=gbox[keep],
        n_excluded_images=int(n_sup_images),
        n_excluded_pairs=int(n_sup_pairs),
        n_missing_cam_images=int((~has_cam).sum()),
        n_other_gt=int((in_split & (gf < 0)).sum()),
        n_fit_pairs=int(n_fit_pairs), map_hw=_map_hw(ws, round_),
        box_rules=cat.query("SELECT DISTINCT source FROM box_rules WHERE round = ?", [round_]),
        ranked=ranked, max_boxes=max_boxes,
    )


def _ranked_boxes(ws: Workspace, round_: int, split: str, ids: np.ndarray
                  ) -> tuple[int, np.ndarray]:
    """(K, n x 14 x K-1 x 4 boxes 2..K). K is what the round's cam run asked for
    (``--max-boxes``, kept in its state) or, without that state (rows written another way),
    the highest rank present: K > 1 although no map had a second component still says that
    any-of-K was measured (and equals top-1)."""
    state = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [cam_state_key(round_)])
    try:
        asked = int(json.loads(state[0][0]).get("max_boxes") or 1) if state else 1
    except (ValueError, TypeError, AttributeError):
        asked = 1
    rows = ws.catalog.query_df(
        "SELECT r.image_id, r.finding, r.rank, r.x, r.y, r.w, r.h FROM cam_boxes_ranked r "
        "JOIN images i USING (image_id) WHERE r.round = ? AND i.split = ? AND r.rank >= 2",
        [round_, split])
    ranks = np.asarray(rows["rank"], dtype=np.int64)
    k = max(asked, int(ranks.max()) if len(ranks) else 1)
    out = np.full((len(ids), len(FINDINGS), k - 1, 4), np.nan)
    if len(ranks):
        ii = _index_of(np.asarray(rows["image_id"], dtype=object), ids)
        ff = _index_of(_canonical(np.asarray(rows["finding"], dtype=object)),
                       np.array(FINDINGS))
        ok = (ii >= 0) & (ff >= 0)
        box = np.stack([np.ma.filled(np.ma.asarray(rows[c], dtype=np.float64), np.nan)
                        for c in ("x", "y", "w", "h")], axis=1)
        out[ii[ok], ff[ok], ranks[ok] - 2] = box[ok]
    return k, out


def _map_hw(ws: Workspace, round_: int) -> tuple[int, int] | None:
    """The round's stored map size (for the grid ceiling), None without maps."""
    if not ws.store.has_cams(round_):
        return None
    with ws.store.open("r") as f:
        return tuple(int(v) for v in f[f"cams/round-{round_}"].shape[-2:])
