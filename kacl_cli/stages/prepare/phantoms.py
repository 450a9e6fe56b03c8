"""Synthetic chest X-ray phantoms with known findings and boxes (the built-in dataset).

Why phantoms: the method (classifier -> Grad-CAM boxes -> radiomics of those boxes -> contrastive
feedback) can only be exercised and measured end to end where the answer is known. The phantoms
are drawn so that each of the 14 NIH findings leaves a *different* texture/shape signature that
radiomics can pick up, at the real dataset's prevalence and co-occurrence, with lesion positions
and sizes drawn from the real ``BBox_List_2017.csv`` statistics.

Design (details and pictures of the reasoning in docs/data.md):
- Anatomy in a canonical frame (x, y in [0, 1], the NIH 1024-px frame divided by 1024): body,
  lung fields (dark), heart, mediastinum/spine, trachea, diaphragm domes, ribs, clavicles and
  vessel-like lung markings; every patient gets its own sizes, and every image its own position,
  rotation, exposure and noise. A pixel grid is mapped into that frame by the inverse of the
  patient/image affine, so everything is vectorised numpy over the whole image (lesions over a
  window around them).
- Labels: label *sets* are drawn from the empirical distribution of label combinations of the
  real label file (``prevalence.json``), which reproduces per-finding prevalence and pairwise
  co-occurrence at once. ``enrich`` mixes in draws conditioned on a uniformly chosen finding,
  for small demos where rare findings would otherwise never appear.
- Box findings are drawn as localized lesions whose centre and size follow a real box of that
  finding; the recorded GT box is the bounding box of the lesion actually drawn.
- ``difficulty`` in [0, 1] lowers lesion contrast and raises noise (see :func:`knobs`).
- Deterministic: image i's pixels depend only on (seed, patient, follow-up), never on worker
  count or order.

Phantoms are drawn directly at the requested size, which is recorded as their "original" size
(pixel spacing 0.143 mm x 1024 / size, so the physical chest is NIH-sized at any resolution).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kacl_cli.findings import BOX_FINDINGS, FINDINGS

GENERATOR_VERSION = "phantoms-1"
GENERATOR_VERSIONS = {1: "phantoms-1", 2: "phantoms-2"}
# Phantoms v2: lesion texture, minimum lesion size and pixel noise in physical units (mm on
# the NIH 1024-px frame), so a lesion's texture stays several pixels wide at 128-256 px instead
# of shrinking with the image (v1's 1.3-1.9 px at 64 px, below the noise). Noise is quantum
# noise: its std scales with 1 / pixel pitch (per-pixel dose), referenced to 128 px.
V2_TEXTURE_MM = {"Mass": 6.0, "Infiltration": 10.0, "Pneumonia": 8.0, "Fibrosis": 6.0}
V2_MIN_RADIUS_MM = {"Nodule": 6.0, "Mass": 14.0}
V2_NOISE_REF_PX = 128
STATS_PATH = Path(__file__).with_name("prevalence.json")
NIH_FRAME = 1024.0  # BBox_List_2017.csv coordinates are in the 1024-px PNG frame
NIH_SPACING_MM = 0.143  # typical NIH original pixel spacing, scaled to the 1024 frame below
DEFAULT_DIFFICULTY = 0.5
MAX_FOLLOW_UPS = 8
TEST_FRACTION = 0.2


# -- statistics of the real dataset ---------------------------------------------------------
def compute_stats(labels_csv: Path, bbox_csv: Path) -> dict:
    """The small summary of the real NIH files that the generator samples from.

    Stores per-finding prevalence and pairwise co-occurrence (for checks and docs), the full
    empirical distribution of label combinations (14-bit masks, what the sampler draws from),
    patients' image counts, demographics, and per-finding real boxes (rounded, 1024-px frame).
    """
    from kacl_cli.stages.prepare.nih import read_bbox_list, read_data_entry

    entries = read_data_entry(Path(labels_csv))
    boxes = read_bbox_list(Path(bbox_csv))
    n = len(entries)
    masks = np.array([sum(1 << FINDINGS.index(f) for f in e.findings) for e in entries])
    onehot = (masks[:, None] >> np.arange(len(FINDINGS))[None, :]) & 1
    prevalence = onehot.mean(axis=0)
    co = (onehot.T @ onehot) / n
    uniq, counts = np.unique(masks, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    per_patient: dict[str, int] = {}
    for e in entries:
        per_patient[e.patient_id] = per_patient.get(e.patient_id, 0) + 1
    k, kc = np.unique(list(per_patient.values()), return_counts=True)
    ages = np.array([e.age for e in entries if e.age is not None], dtype=float)
    sexes = [e.sex for e in entries if e.sex]
    views = [e.view_position for e in entries if e.view_position]
    box_stats: dict[str, dict] = {}
    for f in BOX_FINDINGS:
        arr = np.array([[b.x, b.y, b.w, b.h] for bl in boxes.values() for b in bl
                        if b.finding == f], dtype=float).reshape(-1, 4)
        cx, cy = arr[:, 0] + arr[:, 2] / 2, arr[:, 1] + arr[:, 3] / 2
        q = [10, 50, 90]
        box_stats[f] = {
            "n": int(len(arr)),
            "cx_p10_50_90": np.percentile(cx, q).round(1).tolist() if len(arr) else [],
            "cy_p10_50_90": np.percentile(cy, q).round(1).tolist() if len(arr) else [],
            "w_p10_50_90": np.percentile(arr[:, 2], q).round(1).tolist() if len(arr) else [],
            "h_p10_50_90": np.percentile(arr[:, 3], q).round(1).tolist() if len(arr) else [],
            "xywh": np.rint(arr).astype(int).tolist(),
        }
    return {
        "generator": GENERATOR_VERSION,
        "source": {"labels": Path(labels_csv).name, "boxes": Path(bbox_csv).name,
                   "n_images": n, "n_patients": len(per_patient),
                   "n_boxes": int(sum(len(v) for v in boxes.values()))},
        "findings": list(FINDINGS),
        "prevalence": {f: round(float(p), 6) for f, p in zip(FINDINGS, prevalence, strict=True)},
        "no_finding": round(float((masks == 0).mean()), 6),
        "cooccurrence": np.round(co, 6).tolist(),
        "combos": [[int(uniq[i]), int(counts[i])] for i in order],
        "images_per_patient": [[int(a), int(b)] for a, b in zip(k, kc, strict=True)],
        "age_percentiles": np.percentile(ages, np.arange(0, 101, 5)).round(1).tolist(),
        "male_fraction": round(sexes.count("M") / max(1, len(sexes)), 4),
        "pa_fraction": round(views.count("PA") / max(1, len(views)), 4),
        "boxes": box_stats,
    }


@functools.lru_cache(maxsize=1)
def load_stats(path: str | None = None) -> dict:
    """The packaged ``prevalence.json`` (or another stats file)."""
    return json.loads(Path(path or STATS_PATH).read_text())


class LabelSampler:
    """Draws label sets (14-bit masks) like the real label file does.

    With ``enrich`` = e, a fraction e of draws first picks a finding uniformly and then a
    combination *containing* it (weighted as in the real data), so rare findings show up in a
    600-image demo while co-occurrence given a finding stays realistic.
    """

    def __init__(self, stats: dict, enrich: float = 0.0):
        if not 0.0 <= enrich <= 1.0:
            raise ValueError("enrich must be in [0, 1]")
        combos = np.array(stats["combos"], dtype=np.int64)
        self.masks = combos[:, 0]
        w = combos[:, 1].astype(float)
        self.p = w / w.sum()
        self.enrich = enrich
        self.cond = []
        for i in range(len(FINDINGS)):
            has = (self.masks >> i) & 1 == 1
            pw = np.where(has, w, 0.0)
            self.cond.append(pw / pw.sum() if pw.sum() > 0 else self.p)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = rng.choice(len(self.masks), size=n, p=self.p)
        if self.enrich > 0:
            for j in np.flatnonzero(rng.random(n) < self.enrich):
                f = int(rng.integers(len(FINDINGS)))
                idx[j] = rng.choice(len(self.masks), p=self.cond[f])
        return self.masks[idx]


def mask_to_findings(mask: int) -> tuple[str, ...]:
    return tuple(f for i, f in enumerate(FINDINGS) if (int(mask) >> i) & 1)


# -- the plan: patients, follow-ups, labels ------------------------------------------------
@dataclass(frozen=True)
class ImageSpec:
    image_id: str
    patient: int
    follow_up: int
    findings: tuple[str, ...]
    age: int
    sex: str
    view: str
    seed: int  # this image's draws (position, exposure, lesions, noise)
    patient_seed: int  # the patient's anatomy, shared by their follow-ups


def plan(n: int, seed: int, enrich: float = 0.0, stats: dict | None = None) -> list[ImageSpec]:
    """Who is imaged how often, with which labels; cheap, and the only global random draw."""
    stats = stats or load_stats()
    rng = np.random.default_rng([seed, 0x5EED])
    k = np.array([a for a, _ in stats["images_per_patient"]])
    kp = np.array([b for _, b in stats["images_per_patient"]], dtype=float)
    kp = kp / kp.sum()
    cap = int(np.clip(n // 12, 1, MAX_FOLLOW_UPS))  # tiny sets: more patients, sane splits
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(int(min(rng.choice(k, p=kp), cap, n - sum(counts))))
    masks = LabelSampler(stats, enrich).sample(rng, n)
    ages_q = np.array(stats["age_percentiles"])
    specs: list[ImageSpec] = []
    i = 0
    for p, c in enumerate(counts):
        patient = p + 1
        base_age = float(np.interp(rng.random(), np.linspace(0, 1, len(ages_q)), ages_q))
        sex = "M" if rng.random() < stats["male_fraction"] else "F"
        patient_seed = int(rng.integers(2**62))
        for fu in range(c):
            specs.append(ImageSpec(
                image_id=f"{patient:08d}_{fu:03d}.png", patient=patient, follow_up=fu,
                findings=mask_to_findings(masks[i]), age=int(min(95, base_age + fu * 0.3)),
                sex=sex, view="PA" if rng.random() < stats["pa_fraction"] else "AP",
                seed=int(rng.integers(2**62)), patient_seed=patient_seed,
            ))
            i += 1
    return specs


# -- drawing helpers -----------------------------------------------------------------------
def knobs(difficulty: float) -> dict[str, float]:
    """What ``difficulty`` (0 easy .. 1 hard) does: lesion contrast down, noise up."""
    d = float(np.clip(difficulty, 0.0, 1.0))
    return {
        "contrast": 1.0 - 0.8 * d,   # multiplies every lesion's density change
        "noise": 0.010 + 0.050 * d,  # white (quantum) noise, attenuation units
        "clutter": 0.010 + 0.040 * d,  # smooth anatomical clutter
        "cardio": 1.0 - 0.7 * d,     # fraction of the real enlargement a big heart gets
    }


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Unit-variance smooth random field whose blobs are about ``cell`` pixels across.

    Coarse Gaussian noise upsampled bicubically (PIL): a fraction of the cost of a Gaussian
    filter at 1024 px, and the same look at any image size when ``cell`` scales with it.
    """
    h, w = shape
    if h == 0 or w == 0:
        return np.zeros(shape, np.float32)
    if cell <= 1.5:
        return rng.standard_normal(shape).astype(np.float32)
    gh, gw = int(math.ceil(h / cell)) + 3, int(math.ceil(w / cell)) + 3
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    big = Image.fromarray(g, mode="F").resize(
        (int(gw * cell), int(gh * cell)), Image.Resampling.BICUBIC
    )
    arr = np.asarray(big)
    oy = int(rng.integers(0, max(1, arr.shape[0] - h - int(cell)))) + int(cell // 2)
    ox = int(rng.integers(0, max(1, arr.shape[1] - w - int(cell)))) + int(cell // 2)
    arr = arr[oy:oy + h, ox:ox + w]
    if arr.shape != (h, w):  # rounding at tiny sizes
        arr = np.resize(arr, (h, w))
    s = float(arr.std())
    return ((arr - arr.mean()) / s).astype(np.float32) if s > 1e-6 else np.zeros(shape, np.float32)


def ramp(x: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of x < 0 with a linear edge ``edge`` wide (anti-aliased masks)."""
    return np.clip(0.5 - x / max(edge, 1e-6), 0.0, 1.0)


def ellipse_rho(u, v, cx, cy, rx, ry, angle=0.0):
    """Normalised elliptical radius (1 on the boundary), optionally rotated."""
    du, dv = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = du * c + dv * s, -du * s + dv * c
    return np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)


@dataclass
class Lung:
    cx: float
    cy: float
    rx: float
    ry: float
    dome: float  # where the diaphragm dome peaks, in units of ry below cy

    def rho(self, u, v):
        return ellipse_rho(u, v, self.cx, self.cy, self.rx, self.ry)

    def dome_v(self, u):
        return self.cy + self.ry * (self.dome + 0.35 * ((u - self.cx) / self.rx) ** 2)

    def soft(self, u, v, edge: float) -> np.ndarray:
        a = ramp(self.rho(u, v) - 1.0, edge / self.rx)
        return a * ramp(v - self.dome_v(u), edge)

    def contains(self, u: float, v: float, margin: float = 0.0) -> bool:
        return bool(self.rho(u, v) < 1.0 - margin and v < self.dome_v(u) - margin * self.ry)

    @property
    def top(self) -> float:
        return self.cy - self.ry

    @property
    def bottom(self) -> float:
        return self.cy + self.ry


@dataclass
class Frame:
    """Pixel grid <-> canonical frame for one image (scale, rotation, shift about centre)."""

    size: int
    sx: float
    sy: float
    rot: float
    tx: float
    ty: float
    u: np.ndarray = field(init=False, repr=False)
    v: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = self.size
        p = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
        px, py = p[None, :] - self.tx, p[:, None] - self.ty
        c, sn = math.cos(-self.rot), math.sin(-self.rot)
        self.u = ((px * c - py * sn) / self.sx + 0.5).astype(np.float32)
        self.v = ((px * sn + py * c) / self.sy + 0.5).astype(np.float32)

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        du, dv = (u - 0.5) * self.sx, (v - 0.5) * self.sy
        c, sn = math.cos(self.rot), math.sin(self.rot)
        return ((du * c - dv * sn + 0.5 + self.tx) * self.size,
                (du * sn + dv * c + 0.5 + self.ty) * self.size)

    def window(self, u0: float, v0: float, u1: float, v1: float) -> tuple[slice, slice]:
        """Pixel window covering a canonical box (plus a margin)."""
        pts = [self.to_pixel(a, b) for a in (u0, u1) for b in (v0, v1)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        m = 2
        x0 = int(np.clip(math.floor(min(xs)) - m, 0, self.size))
        x1 = int(np.clip(math.ceil(max(xs)) + m, 0, self.size))
        y0 = int(np.clip(math.floor(min(ys)) - m, 0, self.size))
        y1 = int(np.clip(math.ceil(max(ys)) + m, 0, self.size))
        return slice(y0, y1), slice(x0, x1)

    @property
    def px(self) -> float:
        """One pixel in canonical units (for anti-aliased edges)."""
        return 1.0 / (self.size * min(self.sx, self.sy))


def bbox_of(mask: np.ndarray, win: tuple[slice, slice]) -> tuple[float, float, float, float] | None:
    """(x, y, w, h) in image pixels of a window-local boolean mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, x0 = win[0].start + rows[0], win[1].start + cols[0]
    return (float(x0), float(y0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


# -- one image -----------------------------------------------------------------------------
class Phantom:
    """Draws one image; methods named after the finding they add (see module docstring)."""

    def __init__(self, spec: ImageSpec, size: int, difficulty: float, stats: dict,
                 version: int = 1):
        self.spec, self.size, self.stats = spec, size, stats
        self.version = version
        self.mm_per_px = NIH_SPACING_MM * NIH_FRAME / size
        self.k = knobs(difficulty)
        self.has = set(spec.findings)
        # Patient anatomy: the same for every follow-up of a patient.
        pr = np.random.default_rng(spec.patient_seed)
        # Two streams: anatomy/exposure/noise, and lesions. Adding a finding then changes only
        # the lesion's pixels (tests rely on it), not the noise of the whole image.
        self.rng = np.random.default_rng([spec.seed, 0])
        self.lrng = np.random.default_rng([spec.seed, 1])
        body_w = pr.uniform(0.94, 1.06)
        lw, lh = pr.uniform(0.92, 1.08), pr.uniform(0.90, 1.06)
        if "Emphysema" in self.has:  # hyperinflated: taller lungs, flat low domes
            lh *= 1.0 + 0.10 * self.k["contrast"]
        if "Fibrosis" in self.has:  # volume loss: smaller lungs
            lw *= 1.0 - 0.05 * self.k["contrast"]
            lh *= 1.0 - 0.07 * self.k["contrast"]
        self.lungs = {
            "R": Lung(0.5 - 0.19 * body_w, 0.45, 0.165 * lw, 0.29 * lh,
                      0.55 + (0.2 * self.k["contrast"] if "Emphysema" in self.has else 0.0)),
            "L": Lung(0.5 + 0.19 * body_w, 0.46, 0.155 * lw, 0.28 * lh,
                      0.60 + (0.2 * self.k["contrast"] if "Emphysema" in self.has else 0.0)),
        }
        self.body_w = body_w
        self.heart = [0.555 + pr.uniform(-0.015, 0.015), 0.60 + pr.uniform(-0.015, 0.015),
                      0.175 * pr.uniform(0.92, 1.08), 0.13 * pr.uniform(0.92, 1.08),
                      math.radians(-12 + pr.uniform(-4, 4))]
        self.rib = (pr.uniform(0.05, 0.06), pr.uniform(2.5, 3.5), pr.uniform(0, 1))
        self.clav = pr.uniform(0.10, 0.15)
        self.bubble = pr.random() < 0.5
        r = self.rng
        self.frame = Frame(size, pr.uniform(0.93, 1.07) * r.uniform(0.98, 1.02),
                           pr.uniform(0.93, 1.07) * r.uniform(0.98, 1.02),
                           math.radians(pr.uniform(-4, 4) + r.uniform(-1.5, 1.5)),
                           pr.uniform(-0.03, 0.03) + r.uniform(-0.01, 0.01),
                           pr.uniform(-0.03, 0.03) + r.uniform(-0.01, 0.01))
        self.gain = pr.uniform(1.15, 1.45) * r.uniform(0.95, 1.05)
        self.bias = pr.uniform(-0.08, 0.0)
        self.gamma = pr.uniform(0.8, 1.25)
        self.boxes: dict[str, tuple[float, float, float, float]] = {}

    # -- sampling lesion placement from the real boxes ------------------------------------
    def real_box(self, finding: str) -> tuple[float, float, float, float]:
        """A real box of this finding (canonical units: centre x, centre y, w, h), jittered."""
        arr = self.stats["boxes"][finding]["xywh"]
        x, y, w, h = arr[int(self.lrng.integers(len(arr)))]
        j = self.lrng.uniform(0.85, 1.15, size=2)
        return ((x + w / 2) / NIH_FRAME + self.lrng.normal(0, 0.015),
                (y + h / 2) / NIH_FRAME + self.lrng.normal(0, 0.015),
                w * j[0] / NIH_FRAME, h * j[1] / NIH_FRAME)

    def lung_site(self, finding: str, margin: float = 0.1):
        """A real box whose centre lies inside a lung (rejection, then a random lung point)."""
        for _ in range(30):
            cx, cy, w, h = self.real_box(finding)
            for side, lung in self.lungs.items():
                if lung.contains(cx, cy, margin):
                    return side, cx, cy, w, h
        side = "R" if self.lrng.random() < 0.5 else "L"
        lung = self.lungs[side]
        while True:
            a, rr = self.lrng.uniform(0, 2 * math.pi), math.sqrt(self.lrng.random()) * 0.7
            cx, cy = lung.cx + rr * lung.rx * math.cos(a), lung.cy + rr * lung.ry * math.sin(a)
            if lung.contains(cx, cy, margin):
                return side, cx, cy, w, h

    def record(self, finding: str, mask: np.ndarray, win) -> None:
        box = bbox_of(mask, win)
        if box is None:  # a lesion smaller than a pixel still marks its centre pixel
            ys, xs = win
            box = (float((xs.start + xs.stop) // 2), float((ys.start + ys.stop) // 2), 1.0, 1.0)
        self.boxes[finding] = box

    def cell(self, finding: str, v1_cell: float) -> float:
        """Texture cell (pixels) of a finding: v1's size-relative cell, or v2's mm one."""
        if self.version >= 2 and finding in V2_TEXTURE_MM:
            return max(1.0, V2_TEXTURE_MM[finding] / self.mm_per_px)
        return v1_cell

    def min_radius(self, finding: str, v1_min: float) -> float:
        """Smallest lesion radius (canonical units): v1 in pixels, v2 in mm."""
        if self.version >= 2 and finding in V2_MIN_RADIUS_MM:
            return max(v1_min, V2_MIN_RADIUS_MM[finding] / (NIH_SPACING_MM * NIH_FRAME))
        return v1_min

    def noise_std(self) -> float:
        if self.version >= 2:
            return self.k["noise"] * V2_NOISE_REF_PX / self.size
        return self.k["noise"]

    # -- the image ------------------------------------------------------------------------
    def draw(self) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
        f, r, k = self.frame, self.rng, self.k
        u, v, s, px = f.u, f.v, self.size, f.px
        c = k["contrast"]
        lungs = {side: lung.soft(u, v, 2 * px) for side, lung in self.lungs.items()}
        lung = np.maximum(lungs["R"], lungs["L"])
        bu, bv = ((u - 0.5) / (0.47 * self.body_w)) ** 2, ((v - 0.6) / 0.62) ** 2
        body = ramp(bu * bu + bv * bv - 1.0, 0.05)  # a rounded-rectangle trunk
        if "Cardiomegaly" in self.has:
            self._cardiomegaly()
        hx, hy, hrx, hry, ha = self.heart
        heart = ramp(ellipse_rho(u, v, hx, hy, hrx, hry, ha) - 1.0, 3 * px / hrx)
        if "Cardiomegaly" in self.has:
            self.record("Cardiomegaly", heart > 0.5, (slice(0, s), slice(0, s)))
        A = 0.08 + 0.50 * body
        A -= 0.33 * lung * (1.0 - 0.6 * heart)
        A += 0.06 * heart
        spine = ramp(np.abs(u - 0.5) - 0.035, 2 * px) * body
        A += spine * (0.06 + 0.03 * np.cos(2 * math.pi * v / 0.045))
        A -= 0.10 * ramp(np.abs(u - 0.5) - 0.016, 2 * px) * ramp(v - 0.33, 0.02) * (v > 0.02)
        # Ribs: posterior ribs arch up from the spine and fall laterally; anterior ribs (fainter)
        # slope down towards the sternum. Both only over the thorax.
        sp, curv, ph = self.rib
        d = np.abs(u - 0.5)
        post = ((v - curv * np.maximum(d - 0.08, 0.0) ** 2) / sp + ph) % 1.0
        ant = ((v + 0.45 * d) / (1.3 * sp) + ph * 0.7) % 1.0
        rib = ramp(np.abs(post - 0.25) - 0.16, 2 * px / sp)
        rib_a = ramp(np.abs(ant - 0.5) - 0.12, 2 * px / sp)
        thorax = ramp(np.minimum(self.lungs["R"].rho(u, v), self.lungs["L"].rho(u, v)) - 1.06,
                      0.04) * ramp(0.12 - v, 0.02) * ramp(0.05 - d, 0.01)
        A += (0.06 * rib + 0.03 * rib_a) * thorax
        for sign in (-1, 1):  # clavicles: oblique bars from the sternum outwards
            x0, y0, x1, y1 = 0.5 + sign * 0.04, self.clav + 0.05, 0.5 + sign * 0.32, self.clav
            t = np.clip(((u - x0) * (x1 - x0) + (v - y0) * (y1 - y0))
                        / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
            d = np.hypot(u - (x0 + t * (x1 - x0)), v - (y0 + t * (y1 - y0)))
            A += 0.13 * ramp(d - 0.013, 2 * px)
        if self.bubble:  # stomach gas under the left dome
            lg = self.lungs["L"]
            A -= 0.12 * ramp(ellipse_rho(u, v, lg.cx, lg.bottom + 0.05, 0.05, 0.03) - 1.0, 0.1)
        # Vessel-like lung markings: ridges of band-pass noise, denser towards the hila.
        ridge = np.exp(-(smooth_noise(r, (s, s), 0.025 * s) / 0.45) ** 2)
        hil = np.minimum(np.hypot(u - 0.42, v - 0.47), np.hypot(u - 0.58, v - 0.48))
        markings = ridge * np.exp(-hil / 0.22) * lung
        if "Emphysema" in self.has:
            markings *= 1.0 - 0.6 * c
        if "Pneumothorax" in self.has:
            A -= self._pneumothorax(markings)
        A += 0.10 * markings
        for name in FINDINGS:
            if name in self.has and name not in ("Cardiomegaly", "Pneumothorax"):
                getattr(self, "_" + name.lower())(A, lungs, lung)
        A += k["clutter"] * smooth_noise(r, (s, s), 0.08 * s)
        A += self.noise_std() * r.standard_normal((s, s)).astype(np.float32)
        img = np.clip(self.gain * A + self.bias, 0.0, 1.0) ** self.gamma
        return np.rint(img * 255.0).astype(np.uint8), self.boxes

    # -- box findings ---------------------------------------------------------------------
    def _nodule(self, A, lungs, lung) -> None:
        """Small, round, homogeneous and dense, sharp edge."""
        _, cx, cy, w, h = self.lung_site("Nodule")
        rad = max((w + h) / 4, self.min_radius("Nodule", 2.5 * self.frame.px))
        win = self.frame.window(cx - rad, cy - rad, cx + rad, cy + rad)
        u, v = self.frame.u[win], self.frame.v[win]
        rho = np.hypot(u - cx, v - cy) / rad
        inside = ramp(rho - 1.0, 1.5 * self.frame.px / rad)
        A[win] += 0.26 * self.k["contrast"] * inside * (1.0 + 0.15 * (1.0 - rho).clip(0))
        self.record("Nodule", inside > 0.5, win)

    def _mass(self, A, lungs, lung) -> None:
        """Larger, lobulated outline, heterogeneous inside."""
        _, cx, cy, w, h = self.lung_site("Mass")
        rad = max((w + h) / 4, self.min_radius("Mass", 4 * self.frame.px))
        r = self.lrng
        win = self.frame.window(cx - 1.35 * rad, cy - 1.35 * rad, cx + 1.35 * rad,
                                cy + 1.35 * rad)
        u, v = self.frame.u[win], self.frame.v[win]
        phi = np.arctan2(v - cy, u - cx)
        lob = 1.0 + 0.18 * np.sin(3 * phi + r.uniform(0, 6.3)) + 0.10 * np.sin(
            5 * phi + r.uniform(0, 6.3))
        rho = np.hypot(u - cx, v - cy) / (rad * lob)
        inside = ramp(rho - 1.0, 2 * self.frame.px / rad)
        tex = smooth_noise(r, inside.shape, self.cell("Mass", max(1.0, rad / 3 * self.size)))
        het = 0.5 if self.version >= 2 else 0.35
        A[win] += 0.22 * self.k["contrast"] * inside * (0.8 + het * tex)
        self.record("Mass", inside > 0.5, win)

    def _effusion(self, A, lungs, lung) -> None:
        """Basal fluid with a meniscus that climbs the lateral wall; blunts the angle."""
        cx, _, _, h = self.real_box("Effusion")
        side = "R" if cx < 0.5 else "L"
        lg = self.lungs[side]
        height = float(np.clip(h * 0.8, 0.06, 1.3 * lg.ry))
        lateral = -1.0 if side == "R" else 1.0
        win = self.frame.window(lg.cx - lg.rx, lg.top, lg.cx + lg.rx, lg.bottom + 0.02)
        u, v = self.frame.u[win], self.frame.v[win]
        t = np.clip((u - lg.cx) * lateral / lg.rx, -1, 1)  # -1 medial .. 1 lateral
        top = lg.cy + lg.ry * (lg.dome + 0.35 * t**2) - height - 0.35 * height * (t + 1) / 2
        fluid = ramp(top - v, 3 * self.frame.px) * lungs[side][win]
        A[win] += 0.30 * self.k["contrast"] * fluid
        self.record("Effusion", fluid > 0.5, win)

    def _cardiomegaly(self) -> None:
        """Enlarged heart: towards a real Cardiomegaly box's size and centre."""
        cx, cy, w, h = self.real_box("Cardiomegaly")
        a = self.k["cardio"]
        hx, hy, hrx, hry, ha = self.heart
        # The rotated ellipse's box is about 2rx wide; grow towards the real box, >= +8%.
        hrx2 = max(hrx * 1.08, hrx + a * (w / 2 / 1.02 - hrx))
        hry2 = max(hry * 1.08, hry + a * (h / 2 / 1.1 - hry))
        self.heart = [hx + a * 0.5 * (cx - hx), hy + a * 0.5 * (cy - hy), hrx2, hry2, ha]

    def _pneumothorax(self, markings: np.ndarray) -> np.ndarray:
        """Apical/lateral rim of lung without markings, edged by a thin pleural line.

        Returns the (positive) density it removes; also clears ``markings`` in place.
        """
        cx, _, _, h = self.real_box("Pneumothorax")
        side = "R" if cx < 0.5 else "L"
        lg = self.lungs[side]
        r = self.lrng
        depth = r.uniform(0.15, 0.3)
        extent = float(np.clip(h, 0.08, 1.6 * lg.ry))
        u, v, px = self.frame.u, self.frame.v, self.frame.px
        rho = lg.rho(u, v)
        inlung = lg.soft(u, v, 2 * px)
        zone = ramp(v - (lg.top + extent), 3 * px)
        gap = ramp((1.0 - depth) - rho, 2 * px / lg.rx) * inlung * zone
        line = ramp(np.abs(rho - (1.0 - depth)) - 1.2 * px / lg.rx, px / lg.rx) * inlung * zone
        markings *= 1.0 - gap
        c = self.k["contrast"]
        self.record("Pneumothorax", gap > 0.5, (slice(0, self.size), slice(0, self.size)))
        return 0.10 * c * gap - 0.10 * c * line

    def _atelectasis(self, A, lungs, lung) -> None:
        """A dense linear band thickening into a wedge (plate-like / segmental collapse)."""
        _, cx, cy, w, h = self.lung_site("Atelectasis", margin=0.15)
        r = self.lrng
        length = max(w, 6 * self.frame.px)
        thick = max(0.3 * h, 0.012, 2.5 * self.frame.px)
        ang = math.radians(r.uniform(-25, 25))
        half = length / 2 + thick
        win = self.frame.window(cx - half, cy - half, cx + half, cy + half)
        u, v = self.frame.u[win], self.frame.v[win]
        a = (u - cx) * math.cos(ang) + (v - cy) * math.sin(ang)
        n = -(u - cx) * math.sin(ang) + (v - cy) * math.cos(ang)
        tt = thick * (0.35 + 0.65 * np.clip(a / length + 0.5, 0, 1))
        band = ramp(np.abs(n) - tt / 2, 1.5 * self.frame.px) * ramp(
            np.abs(a) - length / 2, 1.5 * self.frame.px)
        band *= np.clip(lung[win] * 1.5, 0, 1)
        A[win] += 0.24 * self.k["contrast"] * band
        self.record("Atelectasis", band > 0.5, win)

    def _infiltration(self, A, lungs, lung) -> None:
        """Ill-defined patchy opacities scattered over a region."""
        _, cx, cy, w, h = self.lung_site("Infiltration", margin=0.05)
        rx, ry = max(w / 2, 4 * self.frame.px), max(h / 2, 4 * self.frame.px)
        win = self.frame.window(cx - rx, cy - ry, cx + rx, cy + ry)
        u, v = self.frame.u[win], self.frame.v[win]
        region = ramp(ellipse_rho(u, v, cx, cy, rx, ry) - 1.0, 0.3)
        patches = np.clip((smooth_noise(self.lrng, region.shape,
                                              self.cell("Infiltration", 0.025 * self.size)) + 0.3)
                          / 0.8, 0, 1)
        opac = region * patches * lung[win]
        A[win] += 0.16 * self.k["contrast"] * opac
        self.record("Infiltration", opac > 0.3, win)

    def _pneumonia(self, A, lungs, lung) -> None:
        """Dense consolidated patch with dark branching air bronchograms inside."""
        _, cx, cy, w, h = self.lung_site("Pneumonia", margin=0.05)
        r = self.lrng
        rx, ry = max(0.4 * w, 4 * self.frame.px), max(0.4 * h, 4 * self.frame.px)
        win = self.frame.window(cx - 1.3 * rx, cy - 1.3 * ry, cx + 1.3 * rx, cy + 1.3 * ry)
        u, v = self.frame.u[win], self.frame.v[win]
        phi = np.arctan2(v - cy, u - cx)
        lob = 1.0 + 0.12 * np.sin(4 * phi + r.uniform(0, 6.3))
        inside = ramp(ellipse_rho(u, v, cx, cy, rx * lob, ry * lob) - 1.0, 0.25) * lung[win]
        bronch = np.exp(-(smooth_noise(r, inside.shape,
                                             self.cell("Pneumonia", 0.03 * self.size)) / 0.2) ** 2)
        core = ramp(ellipse_rho(u, v, cx, cy, rx, ry) - 0.75, 0.2)
        c = self.k["contrast"]
        A[win] += 0.28 * c * inside - 0.14 * c * bronch * core * inside
        self.record("Pneumonia", inside > 0.5, win)

    # -- diffuse findings (no GT boxes) ---------------------------------------------------
    def _consolidation(self, A, lungs, lung) -> None:
        """Lobar, homogeneous airspace opacity of one lung's mid/lower zone."""
        side = "R" if self.lrng.random() < 0.55 else "L"
        lg = self.lungs[side]
        v = self.frame.v
        zone = ramp(lg.cy - 0.1 * lg.ry - v, 0.01) * lungs[side]
        A += 0.22 * self.k["contrast"] * zone

    def _edema(self, A, lungs, lung) -> None:
        """Bilateral perihilar 'bat-wing' haze plus short horizontal septal (Kerley B) lines."""
        u, v = self.frame.u, self.frame.v
        haze = np.exp(-((np.abs(u - 0.5) - 0.1) / 0.12) ** 2 - ((v - 0.48) / 0.16) ** 2)
        kerley = ((v / 0.012) % 1.0 < 0.3) * (np.abs(u - 0.5) > 0.25) * (v > 0.55)
        A += self.k["contrast"] * lung * (0.16 * haze + 0.06 * kerley)

    def _emphysema(self, A, lungs, lung) -> None:
        """Hyperlucent lungs (the geometry change and fewer markings are set up earlier)."""
        A -= 0.08 * self.k["contrast"] * lung

    def _fibrosis(self, A, lungs, lung) -> None:
        """Fine reticular net over a faint haze, basal and peripheral (volume loss set up
        earlier)."""
        u, v = self.frame.u, self.frame.v
        net = np.exp(-(smooth_noise(self.lrng, u.shape,
                                        self.cell("Fibrosis", 0.012 * self.size)) / 0.3) ** 2)
        where = np.clip((v - 0.35) / 0.3, 0, 1) * np.clip((np.abs(u - 0.5) - 0.1) / 0.2, 0, 1)
        A += self.k["contrast"] * (0.14 * net + 0.05) * where * lung

    def _pleural_thickening(self, A, lungs, lung) -> None:
        """A dense rim along the lateral wall and apex of one or both lungs."""
        px = self.frame.px
        for side in ("R", "L") if self.lrng.random() < 0.4 else (self.lrng.choice(["R", "L"]),):
            lg = self.lungs[side]
            rho = lg.rho(self.frame.u, self.frame.v)
            rim = ramp(np.abs(rho - 0.97) - 0.04, 2 * px / lg.rx) * (self.frame.v < lg.cy + 0.1)
            A += 0.16 * self.k["contrast"] * rim

    def _hernia(self, A, lungs, lung) -> None:
        """Retrocardiac gas bubble with an air-fluid level (hiatus hernia)."""
        hx, hy = 0.52 + self.lrng.uniform(-0.02, 0.02), 0.66 + self.lrng.uniform(-0.02, 0.02)
        rad = 0.05
        win = self.frame.window(hx - rad, hy - rad, hx + rad, hy + rad)
        u, v = self.frame.u[win], self.frame.v[win]
        rho = np.hypot(u - hx, v - hy) / rad
        inside = ramp(rho - 1.0, 3 * self.frame.px / rad)
        air = inside * (v < hy + 0.2 * rad)
        wall = ramp(np.abs(rho - 1.0) - 0.08, 2 * self.frame.px / rad)
        c = self.k["contrast"]
        A[win] += -0.2 * c * air + 0.08 * c * wall


def render(spec: ImageSpec, size: int, difficulty: float = DEFAULT_DIFFICULTY,
           stats: dict | None = None, version: int = 1) -> tuple[np.ndarray, dict[str, tuple]]:
    """One phantom: (uint8 size x size pixels, {box finding: (x, y, w, h) in pixels})."""
    return Phantom(spec, size, difficulty, stats or load_stats(), version).draw()


# -- an NIH-layout folder ------------------------------------------------------------------
def _render_to_png(job: tuple[ImageSpec, int, float, str, int]) -> dict[str, tuple]:
    spec, size, difficulty, out, version = job
    pixels, boxes = render(spec, size, difficulty, version=version)
    tmp = Path(out).with_suffix(".tmp.png")
    Image.fromarray(pixels, mode="L").save(tmp, compress_level=3)
    os.replace(tmp, out)
    return boxes


def write_release(
    root: Path, n: int, size: int, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
    enrich: float = 0.0, workers: int = 1,
    progress: Callable[[int], None] | None = None, version: int = 1,
) -> dict:
    """Write ``n`` phantoms as an NIH release folder (what ``prepare`` then ingests).

    Files: ``images/*.png``, ``Data_Entry_2017_v2020.csv``, ``BBox_List_2017.csv`` (with the
    real file's header quirks), ``train_val_list.txt`` / ``test_list.txt`` (by patient,
    ~20% test). ``phantoms.json`` is written last: its presence marks a complete folder.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "phantoms.json").unlink(missing_ok=True)
    specs = plan(n, seed, enrich)
    if version not in GENERATOR_VERSIONS:
        raise ValueError(f"unknown phantom generator version {version}")
    jobs = [(sp, size, difficulty, str(root / "images" / sp.image_id), version)
            for sp in specs]
    boxes: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        from kacl_cli.parallel import process_pool  # the fast, fork-free pool of prepare

        with process_pool(workers, preload=("kacl_cli.stages.prepare.phantoms",)) as p:
            for b in p.imap(_render_to_png, jobs, chunksize=4):
                boxes.append(b)
                if progress:
                    progress(1)
    else:
        for job in jobs:
            boxes.append(_render_to_png(job))
            if progress:
                progress(1)
    spacing = NIH_SPACING_MM * NIH_FRAME / size
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        fh.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                 "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        for sp in specs:
            labels = "|".join(sp.findings) or "No Finding"
            fh.write(f"{sp.image_id},{labels},{sp.follow_up},{sp.patient},{sp.age},{sp.sex},"
                     f"{sp.view},{size},{size},{spacing:.6f},{spacing:.6f}\n")
    with open(root / "BBox_List_2017.csv", "w", newline="") as fh:
        fh.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        for sp, bx in zip(specs, boxes, strict=True):
            for finding in BOX_FINDINGS:
                if finding in bx:
                    x, y, w, h = bx[finding]
                    name = "Infiltrate" if finding == "Infiltration" else finding
                    fh.write(f"{sp.image_id},{name},{x:.1f},{y:.1f},{w:.1f},{h:.1f}\n")
    patients = sorted({sp.patient for sp in specs})
    prng = np.random.default_rng([seed, 0x7E57])
    n_test = max(1, round(TEST_FRACTION * len(patients))) if len(patients) >= 3 else 0
    test_patients = set(prng.permutation(patients)[:n_test].tolist())
    (root / "test_list.txt").write_text(
        "".join(sp.image_id + "\n" for sp in specs if sp.patient in test_patients))
    (root / "train_val_list.txt").write_text(
        "".join(sp.image_id + "\n" for sp in specs if sp.patient not in test_patients))
    info = {"generator": GENERATOR_VERSIONS[version], "n": n, "size": size, "seed": seed,
            "difficulty": difficulty, "enrich": enrich, "patients": len(patients),
            "boxes": int(sum(len(b) for b in boxes))}
    (root / "phantoms.json").write_text(json.dumps(info, indent=2))
    return info


def release_is_complete(root: Path, expect: dict) -> bool:
    """True when ``root`` holds a finished folder written with exactly these settings."""
    try:
        info = json.loads((Path(root) / "phantoms.json").read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(k) == v for k, v in expect.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kacl_cli.stages.prepare.phantoms",
        description="Phantom generator tools: recompute prevalence.json from the real NIH "
                    "files, or write a few phantoms as PNGs to look at.")
    ap.add_argument("--recompute-stats", nargs=2, metavar=("LABELS_CSV", "BBOX_CSV"))
    ap.add_argument("--out", type=Path, help="stats file to write (default: the package's), "
                                             "or folder for --preview")
    ap.add_argument("--preview", type=int, metavar="N", help="write N phantoms to --out")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    ap.add_argument("--enrich", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.recompute_stats:
        stats = compute_stats(Path(args.recompute_stats[0]), Path(args.recompute_stats[1]))
        out = args.out or STATS_PATH
        Path(out).write_text(json.dumps(stats, separators=(",", ":")) + "\n")
        print(f"wrote {out}: {stats['source']}")
        return 0
    if args.preview:
        if not args.out:
            ap.error("--preview needs --out DIR")
        info = write_release(args.out, args.preview, args.size, args.seed, args.difficulty,
                             args.enrich)
        print(json.dumps(info))
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
