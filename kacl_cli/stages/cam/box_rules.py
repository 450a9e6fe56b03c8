"""Per-finding box rules (threshold fraction + component rule) fitted on held-out GT boxes.

Why fitted: the fraction of the peak at which a map is cut decides the box size, and the best
fraction differs per finding (a nodule wants a high cut, an effusion a low one) and per
checkpoint. A fixed 0.5 was nobody's choice. :func:`fit_rules` picks, per finding, the
fraction on :data:`FRAC_GRID` and the component rule (``peak`` or ``mass``) with the highest
mean IoU on ground-truth boxes that evaluation does not score.

Where: in the ``cam`` stage, once per (round, checkpoint content hash, fit set). The fit set is
every GT-boxed image in ``box_supervision`` (their boxes are training data already) plus every
GT-boxed image of the ``val`` split; never ``test``. Fitting there (and not at the end of
pretrain/contrast) means (1) the rules follow the box-supervision selection, which contrast may
change after a checkpoint exists, (2) no training code changes, and (3) the checkpoint's own
files are not touched, so its fingerprint (model + meta.json) and the cam stage's skip stay
valid. The rules are written to ``checkpoints/round-K/box_rules.json`` (next to meta.json,
with the checkpoint hash and vocabulary they belong to, read by ``predict``) and to the
catalog tables ``box_rules`` / ``box_rule_images`` (read by ``evaluate``, which leaves the fit
images out of localization). With no GT box to fit on, every finding gets
:data:`~kacl_cli.stages.cam.localize.DEFAULT_RULE` (0.5, peak) and the source says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kacl_cli import boxes as bx
from kacl_cli.errors import CheckpointError
from kacl_cli.findings import BOX_LABEL_ALIASES, FINDINGS
from kacl_cli.stages.cam.localize import COMPONENT_RULES, DEFAULT_RULE, BoxRule, localize

FRAC_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05..0.95
RULES_FILE = "box_rules.json"
FALLBACK = "fallback: no ground-truth boxes outside the scored split (0.5 x peak, peak component)"


@dataclass
class FittedRules:
    """Rules per finding plus where they came from."""

    rules: dict[str, BoxRule]
    source: str                                    # "fitted" or FALLBACK
    fit: dict[str, dict[str, float]] = field(default_factory=dict)  # finding -> iou, n
    image_ids: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    fit_set: str | None = None                     # digest of the GT boxes fitted on

    def rule_list(self, findings: list[str] | tuple[str, ...] = FINDINGS) -> list[BoxRule]:
        return [self.rules.get(f, DEFAULT_RULE) for f in findings]

    def digest(self) -> str:
        """Identity of the rules (enters the cam stage's state: new rules -> new boxes)."""
        body = json.dumps({f: r.to_dict() for f, r in sorted(self.rules.items())},
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "findings": list(FINDINGS), "source": self.source,
                "rules": {f: r.to_dict() for f, r in self.rules.items()}, "fit": self.fit,
                "fit_set": self.fit_set, "n_images": len(self.image_ids)}


def uniform(rule: BoxRule, source: str) -> FittedRules:
    return FittedRules({f: rule for f in FINDINGS}, source)


def fit_rules(
    maps: torch.Tensor | np.ndarray, gt_frame: np.ndarray, findings: np.ndarray | list[str],
    size: tuple[int, int], grid: tuple[float, ...] = FRAC_GRID,
) -> tuple[dict[str, BoxRule], dict[str, dict[str, float]]]:
    """Best rule per finding by mean IoU over its pairs.

    ``maps[p]`` is the raw map of pair p's finding on its image, ``gt_frame[p]`` the GT box in
    the ``size`` frame (network input pixels). A map without a box scores IoU 0. Ties keep the
    rule closest to the default (0.5, peak): the grid is visited by distance from 0.5.
    """
    m = torch.as_tensor(maps)
    names = np.asarray(findings, dtype=object)
    gt = np.asarray(gt_frame, dtype=np.float64).reshape(-1, 4)
    if len(m) != len(gt) or len(gt) != len(names):
        raise ValueError("maps, gt boxes and findings differ in length")
    order = sorted(grid, key=lambda f: (abs(f - DEFAULT_RULE.frac), f))
    scores: dict[tuple[float, str], np.ndarray] = {}
    for frac in order:
        for comp in COMPONENT_RULES:
            found = localize(m, size, BoxRule(frac, comp))
            pred = np.array([b[0].box if b[0].box is not None else (np.nan,) * 4 for b in found],
                            dtype=np.float64).reshape(-1, 4)
            iou = np.zeros(len(gt))
            has = np.isfinite(pred).all(axis=1)
            iou[has] = bx.iou(pred[has], gt[has])
            scores[(frac, comp)] = iou
    rules: dict[str, BoxRule] = {}
    info: dict[str, dict[str, float]] = {}
    for f in sorted(set(names.tolist())):
        sel = names == f
        best, best_iou = None, -1.0
        for key, iou in scores.items():  # insertion order = preference order on ties
            v = float(iou[sel].mean())
            if v > best_iou + 1e-12:
                best, best_iou = key, v
        assert best is not None
        rules[f] = BoxRule(*best)
        base = float(scores[(DEFAULT_RULE.frac, DEFAULT_RULE.component)][sel].mean())
        info[f] = {"mean_iou": best_iou, "default_mean_iou": base, "n": int(sel.sum())}
    return rules, info


# ---------------------------------------------------------------------------------------------
# Workspace side: which images, storage, loading
# ---------------------------------------------------------------------------------------------
def fit_set(ws) -> dict[str, np.ndarray]:
    """GT boxes that evaluation never scores: box-supervision images, and the val split."""
    return ws.catalog.query_df(
        "SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h, i.row, i.orig_width, i.orig_height "
        "FROM gt_boxes g JOIN images i USING (image_id) "
        "WHERE i.split = 'val' OR g.image_id IN (SELECT image_id FROM box_supervision) "
        "ORDER BY i.row, g.finding, g.x, g.y"
    )


def fit_set_digest(gt: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in ("image_id", "finding", "x", "y", "w", "h"):
        h.update(repr(np.asarray(gt[k]).tolist()).encode())
    return h.hexdigest()[:12]


def fit_for_checkpoint(ws, gt: dict[str, np.ndarray], infer, image_size: int) -> FittedRules:
    """Fit on ``gt`` (from :func:`fit_set`); ``infer(rows) -> float maps k x F x h x w``."""
    names = np.array([BOX_LABEL_ALIASES.get(str(f), str(f)) for f in gt["finding"]],
                     dtype=object)
    keep = np.isin(names, np.array(FINDINGS, dtype=object))
    if not keep.any():
        return uniform(DEFAULT_RULE, FALLBACK)
    rows = np.asarray(gt["row"], dtype=np.int64)[keep]
    uniq, inv = np.unique(rows, return_inverse=True)
    maps = torch.as_tensor(infer(uniq)).float()
    fidx = np.array([FINDINGS.index(f) for f in names[keep]])
    pair_maps = maps[torch.as_tensor(inv), torch.as_tensor(fidx)]
    s = float(image_size)
    box = np.stack([np.asarray(gt[k], dtype=np.float64)[keep] for k in ("x", "y", "w", "h")], 1)
    ow = np.asarray(gt["orig_width"], dtype=np.float64)[keep]
    oh = np.asarray(gt["orig_height"], dtype=np.float64)[keep]
    frame = bx.scale_xywh(box, s / ow, s / oh)
    rules, info = fit_rules(pair_maps, frame, names[keep], (image_size, image_size))
    full = {f: rules.get(f, DEFAULT_RULE) for f in FINDINGS}
    ids = sorted(set(np.asarray(gt["image_id"], dtype=object)[keep].tolist()))
    return FittedRules(full, "fitted", info, ids)


def write_rules(ws, round_: int, ckpt: Path, fitted: FittedRules) -> None:
    """Catalog tables (one transaction), then the sidecar file next to the checkpoint: the
    file is what marks the fit done, so a failure leaves nothing to be reused."""
    if ws.writes:
        _write_catalog(ws, round_, fitted)
    tmp = ckpt / f".{RULES_FILE}.tmp"
    tmp.write_text(json.dumps(fitted.to_json(), indent=2))
    tmp.replace(ckpt / RULES_FILE)


def _write_catalog(ws, round_: int, fitted: FittedRules) -> None:
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM box_rules WHERE round = ?", [round_])
        con.execute("DELETE FROM box_rule_images WHERE round = ?", [round_])
        for f, r in fitted.rules.items():
            fit = fitted.fit.get(f, {})
            con.execute("INSERT INTO box_rules VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [round_, fitted.checkpoint, f, r.frac, r.component,
                         fit.get("mean_iou"), int(fit.get("n", 0)), fitted.source])
        if fitted.image_ids:
            con.register("fit_ids", {"image_id": np.asarray(fitted.image_ids, dtype=object)})
            con.execute("INSERT INTO box_rule_images SELECT ?, image_id FROM fit_ids", [round_])
        con.execute("COMMIT")


def read_rules_file(ckpt: Path, checkpoint_hash: str) -> FittedRules | None:
    """The checkpoint's fitted rules, None when absent; refused (one line) when they belong to
    another checkpoint or vocabulary."""
    path = Path(ckpt) / RULES_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        rules = {str(f): BoxRule(float(r["frac"]), str(r["component"]))
                 for f, r in doc["rules"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable box rules ({exc})") from None
    if list(doc.get("findings", [])) != list(FINDINGS):
        raise CheckpointError(f"{path}: box rules of another vocabulary; re-run `kacl cam`")
    if doc.get("checkpoint") != checkpoint_hash:
        raise CheckpointError(
            f"{path}: box rules fitted for another checkpoint ({doc.get('checkpoint')}, this is "
            f"{checkpoint_hash}); re-run `kacl cam` to refit"
        )
    return FittedRules(rules, str(doc.get("source", "fitted")), dict(doc.get("fit", {})),
                       checkpoint=checkpoint_hash, fit_set=doc.get("fit_set"))
