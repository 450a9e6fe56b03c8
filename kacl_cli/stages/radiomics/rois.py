"""Which rectangles radiomics are computed on: the ROI rules (documented in docs/radiomics.md).

Per (image, finding) at most one ROI, in store pixels (half-open ``x0:x1, y0:y1``):

- ``cam``: the Grad-CAM box of that finding from ``cam_boxes`` of the round, for findings whose
  box exists and whose probability is ``>= min_prob``, plus always the image's *positive* ROI:
  the box of its most confident finding that has a box (ties: FINDINGS order). With the
  default ``min_prob`` 0.5 an image costs its positive ROI plus one ROI per other finding
  the model calls present, instead of 14.
- ``gt``: the ground-truth boxes of every image that has them (one per finding: the first
  box of that finding in the BBox file); positive = the first in FINDINGS order. Meant for
  analysis and tests (it reads labels the model must not see at training time).
- ``cam+gt``: ``gt`` for the images listed in ``box_supervision`` (the box-supervised
  fraction of the semi-supervised setting), ``cam`` for all the others.
- ``labelled`` (``contrast --positive-roi labelled``): one ROI per image, its positive: the
  CAM box of the image's own *labelled* finding with the highest probability. Images
  outside the labelled fraction (``--label-fraction``) fall back to the ``cam`` rule's
  positive; labelled images without a finding follow ``normal_positive``: ``skip`` (no ROI,
  no contrastive term) or ``lung`` (a fixed right-lung-field box, finding "No Finding").
- ``oracle`` (the positive control of ``kacl study``): the GT box (first in FINDINGS order)
  of every image that has one, the ``labelled`` rule otherwise. It reads GT boxes of
  training images, which the method never sees: a control, not a setting.

Boxes come in original pixels; they map to the store with a per-axis scale (S / orig_width,
S / orig_height) and are rounded outward (:func:`kacl_cli.boxes.to_pixel_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kacl_cli.boxes import scale_xywh, to_pixel_slices
from kacl_cli.errors import KaclError, NotReadyError
from kacl_cli.findings import FINDINGS, normalise_finding
from kacl_cli.workspace import Workspace

ROI_MODES = ("cam", "gt", "cam+gt", "labelled", "oracle")
DEFAULT_MIN_PROB = 0.5
NORMAL_POSITIVES = ("skip", "lung")
NORMAL = "No Finding"
# The fixed lung-field ROI of a finding-free image (x, y, w, h as fractions of the original
# image): the middle of the right lung in the NIH frame, clear of heart and diaphragm.
LUNG_FIELD = (0.20, 0.30, 0.18, 0.28)


@dataclass(frozen=True)
class Roi:
    image_id: str
    row: int  # store row
    finding: str
    source: str  # cam | gt
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (store px, half-open)
    is_positive: bool
    spacing: tuple[float, float]  # mm (or 1.0) per store pixel along x, y
    spacing_known: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return self.image_id, self.finding


@dataclass
class ImageInfo:
    image_id: str
    row: int
    split: str
    orig_w: int
    orig_h: int
    spacing_x: float | None
    spacing_y: float | None


def store_box(xywh: tuple[float, float, float, float], orig_w: int, orig_h: int,
              size: int) -> tuple[int, int, int, int]:
    """An original-pixel (x, y, w, h) box as half-open store pixel bounds."""
    scaled = scale_xywh(np.asarray(xywh, dtype=np.float64), size / orig_w, size / orig_h)
    return to_pixel_slices(scaled, size, size)


def store_spacing(info: ImageInfo, size: int, mode: str) -> tuple[tuple[float, float], bool]:
    """mm per *store* pixel (catalog spacing x original size / S); 1.0 when unknown/pixel."""
    if mode == "pixel":
        return (1.0, 1.0), True
    if info.spacing_x is None or info.spacing_y is None or not (
        info.spacing_x > 0 and info.spacing_y > 0
    ):
        return (1.0, 1.0), False
    return (info.spacing_x * info.orig_w / size, info.spacing_y * info.orig_h / size), True


def positive_finding(candidates: dict[str, float]) -> str | None:
    """The finding with the highest probability; ties broken by FINDINGS order."""
    if not candidates:
        return None
    return min(candidates, key=lambda f: (-candidates[f], FINDINGS.index(f)))


def first_in_findings_order(findings: list[str]) -> str:
    return min(findings, key=FINDINGS.index)


def select_images(ws: Workspace, split: list[str] | None = None) -> dict[str, ImageInfo]:
    """The images a run works on: all, or those of some splits (shards: kacl_cli.sharding.parts)."""
    sql = ("SELECT image_id, row, split, orig_width, orig_height, spacing_x, spacing_y "
           "FROM images")
    params: list = []
    where = []
    if split:
        where.append(f"split IN ({', '.join('?' * len(split))})")
        params += list(split)
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = ws.catalog.query(sql + " ORDER BY row", params)
    return {r[0]: ImageInfo(r[0], int(r[1]), r[2], int(r[3]), int(r[4]), r[5], r[6]) for r in rows}


def cam_candidates(ws: Workspace, round_: int, min_prob: float
                   ) -> dict[str, dict[str, tuple[float, tuple[float, float, float, float]]]]:
    """Per image: {finding: (probability, xywh)} of the boxes the cam rule keeps.

    Filtered in SQL (keep boxes with probability >= min_prob, plus each image's best boxed
    finding) so a full NIH round (1.5 M cam_boxes rows) never reaches Python.
    """
    rows = ws.catalog.query(
        "SELECT image_id, finding, probability, x, y, w, h FROM cam_boxes "
        "WHERE round = ? AND x IS NOT NULL AND y IS NOT NULL AND w IS NOT NULL "
        "AND h IS NOT NULL "
        "QUALIFY probability >= ? OR row_number() OVER (PARTITION BY image_id "
        "ORDER BY probability DESC, list_position(?, finding)) = 1",
        [round_, min_prob, list(FINDINGS)],
    )
    out: dict[str, dict[str, tuple[float, tuple[float, float, float, float]]]] = {}
    for image_id, finding, prob, x, y, w, h in rows:
        out.setdefault(image_id, {})[finding] = (float(prob), (x, y, w, h))
    return out


def gt_candidates(ws: Workspace) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    """Per image: {finding: xywh}, the first box of each finding in insertion order."""
    rows = ws.catalog.query("SELECT image_id, finding, x, y, w, h FROM gt_boxes ORDER BY rowid")
    out: dict[str, dict[str, tuple[float, float, float, float]]] = {}
    for image_id, finding, x, y, w, h in rows:
        try:
            finding = normalise_finding(finding)
        except KeyError:
            continue
        out.setdefault(image_id, {}).setdefault(finding, (x, y, w, h))
    return out


def _order(finding: str) -> int:
    return FINDINGS.index(finding) if finding in FINDINGS else len(FINDINGS)


def labelled_findings(ws: Workspace, image_ids: list[str]) -> dict[str, list[str]]:
    """Per image, the findings its (possibly noisy) training labels mark present."""
    from kacl_cli.catalog import quote_ident

    cols = ", ".join(quote_ident(f) for f in FINDINGS)
    keep = set(image_ids)
    out: dict[str, list[str]] = {}
    for rec in ws.catalog.query(f"SELECT image_id, {cols} FROM labels"):
        if rec[0] in keep:
            out[rec[0]] = [f for f, v in zip(FINDINGS, rec[1:], strict=True) if bool(v)]
    return out


def labelled_positive(cands: dict[str, tuple[float, tuple]], labelled: list[str]
                      ) -> str | None:
    """The labelled finding with a CAM box and the highest probability (ties: FINDINGS)."""
    return positive_finding({f: cands[f][0] for f in labelled if f in cands})


def all_cam_boxes(ws: Workspace, round_: int
                  ) -> dict[str, dict[str, tuple[float, tuple[float, float, float, float]]]]:
    """Per image: {finding: (probability, xywh)} of every non-empty CAM box of the round."""
    return cam_candidates(ws, round_, -1.0)


def has_cam_boxes(ws: Workspace, round_: int) -> bool:
    return ws.catalog.count("cam_boxes", "round = ?", [round_]) > 0


def build_rois(
    ws: Workspace,
    round_: int,
    images: dict[str, ImageInfo],
    *,
    roi: str = "cam",
    min_prob: float = DEFAULT_MIN_PROB,
    spacing: str = "store-mm",
    size: int | None = None,
    label_fraction: float = 1.0,
    normal_positive: str = "skip",
) -> list[Roi]:
    """The ROIs of ``images`` for a round, sorted by store row (for read locality)."""
    if roi not in ROI_MODES:
        raise KaclError(f"unknown ROI mode {roi!r}; choose one of {', '.join(ROI_MODES)}")
    if normal_positive not in NORMAL_POSITIVES:
        raise KaclError(f"unknown normal positive {normal_positive!r}")
    size = size or ws.store.image_size()
    if roi in ("labelled", "oracle"):
        return _positive_rois(ws, round_, images, roi, spacing, size, label_fraction,
                              normal_positive)
    use_cam = roi in ("cam", "cam+gt")
    if use_cam and not has_cam_boxes(ws, round_):
        raise NotReadyError(
            f"no Grad-CAM boxes for round {round_}: run `kacl cam --round {round_}` first"
        )
    gt = gt_candidates(ws) if roi in ("gt", "cam+gt") else {}
    supervised: set[str] = set()
    if roi == "cam+gt":
        supervised = {r[0] for r in ws.catalog.query("SELECT image_id FROM box_supervision")}
    cam = cam_candidates(ws, round_, min_prob) if use_cam else {}

    out: list[Roi] = []
    for image_id, info in images.items():
        sp, known = store_spacing(info, size, spacing)
        use_gt = roi == "gt" or (image_id in supervised and image_id in gt)
        if use_gt:
            boxes = gt.get(image_id, {})
            if not boxes:
                continue
            pos = first_in_findings_order(list(boxes))
            chosen = {f: b for f, b in boxes.items()}
            source = "gt"
        else:
            cands = cam.get(image_id, {})
            if not cands:
                continue
            pos = positive_finding({f: p for f, (p, _) in cands.items()})
            chosen = {f: b for f, (p, b) in cands.items() if p >= min_prob or f == pos}
            source = "cam"
        for finding in sorted(chosen, key=FINDINGS.index):
            box = store_box(chosen[finding], info.orig_w, info.orig_h, size)
            out.append(Roi(image_id, info.row, finding, source, box, finding == pos, sp, known))
    out.sort(key=lambda r: (r.row, FINDINGS.index(r.finding)))
    return out


def _positive_rois(ws: Workspace, round_: int, images: dict[str, ImageInfo], roi: str,
                   spacing: str, size: int, label_fraction: float,
                   normal_positive: str) -> list[Roi]:
    """``labelled`` / ``oracle``: one positive ROI per image (see the module docstring)."""
    from kacl_cli.stages.contrast.weak import labelled_mask

    if not has_cam_boxes(ws, round_):
        raise NotReadyError(
            f"no Grad-CAM boxes for round {round_}: run `kacl cam --round {round_}` first")
    ids = list(images)
    has_labels = dict(zip(ids, labelled_mask(ids, label_fraction).tolist(), strict=True))
    labels = labelled_findings(ws, ids)
    cam = all_cam_boxes(ws, round_)
    gt = gt_candidates(ws) if roi == "oracle" else {}
    out: list[Roi] = []
    for image_id, info in images.items():
        sp, known = store_spacing(info, size, spacing)
        cands = cam.get(image_id, {})
        box: tuple[float, float, float, float] | None = None
        source, finding = "cam", None
        if gt.get(image_id):
            finding = first_in_findings_order(list(gt[image_id]))
            box, source = gt[image_id][finding], "gt"
        elif has_labels[image_id]:
            own = labels.get(image_id, [])
            finding = labelled_positive(cands, own)
            if finding is not None:
                box = cands[finding][1]
            elif not own and normal_positive == "lung":
                fx, fy, fw, fh = LUNG_FIELD
                box = (fx * info.orig_w, fy * info.orig_h, fw * info.orig_w, fh * info.orig_h)
                finding, source = NORMAL, "lung"
        else:  # an unlabelled image: the model's own top guess, as the cam rule
            finding = positive_finding({f: p for f, (p, _) in cands.items()})
            if finding is not None:
                box = cands[finding][1]
        if box is None or finding is None:
            continue
        out.append(Roi(image_id, info.row, finding, source,
                       store_box(box, info.orig_w, info.orig_h, size), True, sp, known))
    out.sort(key=lambda r: (r.row, _order(r.finding)))
    return out
