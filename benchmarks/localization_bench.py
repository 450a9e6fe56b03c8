"""Localization before/after each step of issue 13, per finding, on phantoms.

    python -m benchmarks.localization_bench --workspace WS            # a trained workspace
    python -m benchmarks.localization_bench --build WS --images 1000 --size 128 --epochs 6

For the round's checkpoint it computes the test split's maps once (the pairs evaluate scores)
and the val split's (the fit set), then cuts boxes with each rule:

- ``grid-0.5-mass``: the old rule, boxes of whole map cells, 0.5 x peak, heaviest component;
- ``up-0.5-peak`` / ``up-0.5-mass``: the map upsampled to the input size, 0.5 x peak;
- ``up-fitted``: the upsampled map with per-finding rules fitted on val GT boxes (what cam does);
- ``up-oracle``: rules fitted on the scored test boxes themselves: NOT a result, the bound of
  what any per-finding threshold could reach, so the gap to it is the threshold's share.

Per finding: mean accuracy over T(IoU) 0.1..0.7, mean IoU, and the grid ceiling of the map
size (:mod:`kacl_cli.stages.evaluate.localization`). The gap ceiling -> oracle is the net's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kacl_cli import boxes as bx
from kacl_cli.findings import BOX_FINDINGS, BOX_LABEL_ALIASES, FINDINGS
from kacl_cli.models.checkpoint import load_image_net, preprocess
from kacl_cli.stages.cam.box_rules import fit_rules
from kacl_cli.stages.cam.gradcam import batched_gradcam, maps_to_boxes
from kacl_cli.stages.cam.localize import BoxRule, localize
from kacl_cli.stages.evaluate.baselines import IOU_THRESHOLDS
from kacl_cli.stages.evaluate.localization import grid_ceiling_iou, headroom
from kacl_cli.workspace import Workspace


def pairs(ws: Workspace, split: str) -> dict[str, np.ndarray]:
    """GT pairs of a split (minus box-supervision patients), with store rows and sizes."""
    df = ws.catalog.query_df(
        "SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h, i.row, i.orig_width, i.orig_height "
        "FROM gt_boxes g JOIN images i USING (image_id) WHERE i.split = ? AND i.patient_id NOT "
        "IN (SELECT i2.patient_id FROM images i2 JOIN box_supervision b USING (image_id)) "
        "ORDER BY i.row, g.finding", [split])
    names = [BOX_LABEL_ALIASES.get(str(f), str(f)) for f in df["finding"]]
    keep = np.array([n in BOX_FINDINGS for n in names], dtype=bool)
    return {
        "row": np.asarray(df["row"], dtype=np.int64)[keep],
        "finding": np.array([FINDINGS.index(n) for n, k in zip(names, keep, strict=True) if k]),
        "gt": np.stack([np.asarray(df[k], dtype=np.float64) for k in "xywh"], 1)[keep],
        "size": np.stack([np.asarray(df["orig_width"], dtype=np.float64),
                          np.asarray(df["orig_height"], dtype=np.float64)], 1)[keep],
    }


def pair_maps(ws: Workspace, model, meta, p: dict[str, np.ndarray]) -> torch.Tensor:
    rows, inv = np.unique(p["row"], return_inverse=True)
    out = []
    for s in range(0, len(rows), 32):
        x = preprocess(torch.from_numpy(ws.store.read_images(rows[s:s + 32])), meta)
        out.append(batched_gradcam(model, x)[1].to(torch.float16).float())
    maps = torch.cat(out)
    return maps[torch.as_tensor(inv), torch.as_tensor(p["finding"])]


def score(p: dict[str, np.ndarray], pred_orig: np.ndarray) -> np.ndarray:
    iou = np.full(len(p["gt"]), np.nan)
    has = np.isfinite(pred_orig).all(axis=1)
    iou[has] = bx.iou(pred_orig[has], p["gt"][has])
    return iou


def upsampled(maps: torch.Tensor, p, size: int, rules: list[BoxRule]) -> np.ndarray:
    found = localize(maps, (size, size), rules)
    b = np.array([f[0].box if f[0].box is not None else (np.nan,) * 4 for f in found]).reshape(
        -1, 4)
    return bx.scale_xywh(b, p["size"][:, 0] / size, p["size"][:, 1] / size)


def grid(maps: torch.Tensor, p) -> np.ndarray:
    h, w = maps.shape[-2:]
    found = maps_to_boxes(maps.numpy(), 0.5)
    b = np.array([f.box if f.box is not None else (np.nan,) * 4 for f in found]).reshape(-1, 4)
    return bx.scale_xywh(b, p["size"][:, 0] / w, p["size"][:, 1] / h)


def frame(p, size: int) -> np.ndarray:
    return bx.scale_xywh(p["gt"], size / p["size"][:, 0], size / p["size"][:, 1])


def run(ws_path: Path, round_: int) -> dict:
    ws = Workspace(ws_path)
    model, meta = load_image_net(ws.checkpoint_dir(round_))
    size = int(meta["image_size"])
    test, val = pairs(ws, "test"), pairs(ws, "val")
    t0 = time.perf_counter()
    tm, vm = pair_maps(ws, model, meta, test), pair_maps(ws, model, meta, val)
    map_hw = tuple(tm.shape[-2:])
    ceiling = grid_ceiling_iou(test["gt"], test["size"], map_hw)
    names = np.array(FINDINGS, dtype=object)
    fitted, fit_info = fit_rules(vm, frame(val, size), names[val["finding"]], (size, size))
    oracle, _ = fit_rules(tm, frame(test, size), names[test["finding"]], (size, size))
    tf = names[test["finding"]]
    variants = {
        "grid-0.5-mass": grid(tm, test),
        "up-0.5-peak": upsampled(tm, test, size, [BoxRule(0.5, "peak")] * len(tf)),
        "up-0.5-mass": upsampled(tm, test, size, [BoxRule(0.5, "mass")] * len(tf)),
        "up-fitted": upsampled(tm, test, size, [fitted.get(f, BoxRule()) for f in tf]),
        "up-oracle": upsampled(tm, test, size, [oracle.get(f, BoxRule()) for f in tf]),
    }
    bfi = np.array([BOX_FINDINGS.index(f) for f in tf])
    out = {"workspace": str(ws_path), "round": round_, "image_size": size, "map": list(map_hw),
           "test_pairs": len(tf), "val_pairs": len(val["gt"]),
           "fitted_rules": {f: r.to_dict() for f, r in fitted.items()}, "fit": fit_info,
           "variants": {}}
    for name, pred in variants.items():
        iou = score(test, pred)
        rows = headroom(iou, ceiling, bfi, BOX_FINDINGS, IOU_THRESHOLDS)
        have = [r for r in rows if r["n"]]
        out["variants"][name] = {
            "mean_acc": float(np.mean([r["mean_acc"] for r in have])),
            "mean_iou": float(np.mean([r["mean_iou"] for r in have])),
            "ceiling_acc": float(np.mean([r["ceiling_acc"] for r in have])),
            "ceiling_iou": float(np.mean([r["ceiling_iou"] for r in have])),
            "per_finding": rows,
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def build(ws_path: Path, images: int, size: int, epochs: int, seed: int,
          extra: list[str]) -> None:
    kacl = [sys.executable, "-m", "kacl_cli.app"]
    env_ws = ["--workspace", str(ws_path)]
    subprocess.run(kacl + ["prepare", "--synthetic", str(images), "--size", str(size),
                           "--seed", str(seed)] + env_ws, check=True)
    subprocess.run(kacl + ["pretrain", "--backbone", "tiny", "--epochs", str(epochs),
                           "--image-size", str(size), "--seed", str(seed), "--device", "cpu",
                           "--workers", "1"] + extra + env_ws, check=True)


def render(doc: dict) -> None:
    print(f"{doc['workspace']} round {doc['round']}: {doc['image_size']} px, map "
          f"{doc['map'][0]}x{doc['map'][1]}, {doc['test_pairs']} test / {doc['val_pairs']} "
          f"val GT boxes, {doc['seconds']} s")
    print(f"{'variant':15s} {'acc0.1-0.7':>10s} {'meanIoU':>8s} {'ceil acc':>8s} "
          f"{'ceil IoU':>8s} {'share':>6s}")
    for name, v in doc["variants"].items():
        print(f"{name:15s} {v['mean_acc']:10.3f} {v['mean_iou']:8.3f} {v['ceiling_acc']:8.3f} "
              f"{v['ceiling_iou']:8.3f} {v['mean_acc'] / v['ceiling_acc']:6.2f}")
    print("per finding (acc / mean IoU / ceiling acc), fitted rule:")
    fitted = doc["variants"]["up-fitted"]["per_finding"]
    grid_rows = doc["variants"]["grid-0.5-mass"]["per_finding"]
    for r, g in zip(fitted, grid_rows, strict=True):
        if r["n"]:
            rule = doc["fitted_rules"].get(r["finding"], {})
            print(f"  {r['finding']:13s} n={r['n']:3d} grid {g['mean_acc']:.3f}/{g['mean_iou']:.3f}"
                  f" -> fitted {r['mean_acc']:.3f}/{r['mean_iou']:.3f} "
                  f"(ceiling {r['ceiling_acc']:.3f}; rule {rule.get('frac')} "
                  f"{rule.get('component')})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--build", type=Path, help="prepare + pretrain a fresh workspace here")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    path = args.workspace
    if args.build is not None:
        build(args.build, args.images, args.size, args.epochs, args.seed, [])
        path = args.build
    if path is None:
        ap.error("give --workspace or --build")
    doc = run(path, args.round)
    print(json.dumps(doc, indent=2)) if args.json else render(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
