"""Published NIH ChestX-ray14 numbers, as data, for tables that sit beside kacl's own.

Copied from the project's reference sheet (Wang et al., CVPR 2017, "ChestX-ray8: Hospital-scale
chest X-ray database and benchmarks ..."). Every table carries the dataset and split it was
measured on, because a number measured on another split (or on phantoms) is context, never a
like-for-like comparison: reports print the split beside each published value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kacl_cli.findings import BOX_FINDINGS, FINDINGS

IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)

OFFICIAL_SPLIT = (
    "NIH ChestX-ray14, official patient split (train_val_list.txt / test_list.txt, "
    "25,596 test images; localization on the 880 box-annotated images)"
)


@dataclass(frozen=True)
class AucBaseline:
    """Per-finding ROC AUC of one published model."""

    name: str
    source: str
    dataset_split: str
    auc: dict[str, float]
    mean: float


@dataclass(frozen=True)
class LocBaseline:
    """Localization accuracy of one published model: ``acc[finding][i]`` at ``thresholds[i]``."""

    name: str
    source: str
    dataset_split: str
    kind: str  # "iou" | "iobb"
    thresholds: tuple[float, ...]
    acc: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def at(self, finding: str, threshold: float) -> float | None:
        """The published accuracy of ``finding`` at ``threshold``, None when not published."""
        values = self.acc.get(finding)
        for t, v in zip(self.thresholds, values or (), strict=False):
            if abs(t - threshold) < 1e-9:
                return v
        return None


WANG2017_AUC = AucBaseline(
    name="Wang et al. 2017 (ChestX-ray14 model, ResNet-50)",
    source="Wang et al., CVPR 2017",
    dataset_split=OFFICIAL_SPLIT,
    auc=dict(zip(FINDINGS, (
        0.7003, 0.8100, 0.7585, 0.6614, 0.6933, 0.6687, 0.6580, 0.7993,
        0.7032, 0.8052, 0.8330, 0.7859, 0.6835, 0.8717,
    ), strict=True)),
    mean=0.7451,
)


def _columns(rows: list[tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    """Transpose a table written as in the paper (rows = thresholds) into per-finding tuples."""
    return {f: tuple(row[j] for row in rows) for j, f in enumerate(BOX_FINDINGS)}


# Rows T(IoU) 0.1 .. 0.7; columns the 8 box findings in BOX_FINDINGS order.
WANG2017_LOC_IOU = LocBaseline(
    name="Wang et al. 2017 (ChestX-ray8 model)",
    source="Wang et al., CVPR 2017",
    dataset_split=OFFICIAL_SPLIT,
    kind="iou",
    thresholds=IOU_THRESHOLDS,
    acc=_columns([
        (0.6888, 0.9383, 0.6601, 0.7073, 0.4000, 0.1392, 0.6333, 0.3775),
        (0.4722, 0.6849, 0.4509, 0.4796, 0.2588, 0.0506, 0.3500, 0.2346),
        (0.2444, 0.4589, 0.3006, 0.2764, 0.1529, 0.0379, 0.1666, 0.1326),
        (0.0944, 0.2808, 0.2026, 0.1219, 0.0705, 0.0126, 0.0750, 0.0714),
        (0.0500, 0.1780, 0.1111, 0.0650, 0.0117, 0.0126, 0.0333, 0.0306),
        (0.0222, 0.0753, 0.0457, 0.0243, 0.0000, 0.0126, 0.0166, 0.0306),
        (0.0055, 0.0273, 0.0196, 0.0000, 0.0000, 0.0000, 0.0083, 0.0204),
    ]),
)

# Rows T(IoBB) 0.1, 0.25, 0.5, 0.75, 0.9.
WANG2017_LOC_IOBB = LocBaseline(
    name="Wang et al. 2017 (ChestX-ray14 model)",
    source="Wang et al., CVPR 2017",
    dataset_split=OFFICIAL_SPLIT,
    kind="iobb",
    thresholds=IOBB_THRESHOLDS,
    acc=_columns([
        (0.6222, 1.0, 0.7974, 0.9106, 0.5882, 0.1519, 0.8583, 0.5204),
        (0.3944, 0.9863, 0.6339, 0.7967, 0.4588, 0.0506, 0.7083, 0.3367),
        (0.1944, 0.9452, 0.4183, 0.6504, 0.3058, 0.0, 0.4833, 0.2653),
        (0.0889, 0.8151, 0.2287, 0.4390, 0.1647, 0.0, 0.2917, 0.1735),
        (0.0722, 0.6507, 0.1373, 0.3577, 0.0941, 0.0, 0.2333, 0.1224),
    ]),
)

# Mean AUCs quoted without per-finding tables: context lines under the AUC table.
OTHER_MEAN_AUC: tuple[tuple[str, str, str], ...] = (
    ("DenseNet-121, 224 px", "about 0.80", "official split"),
    ("DenseNet-121, 512 px", "about 0.82", "official split"),
    ("chest-X-ray-pretrained ViTs", "about 0.83", "official split"),
    ("CheXNet (Rajpurkar et al. 2017)", "0.841", "random patient split (not comparable)"),
)
