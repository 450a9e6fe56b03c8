"""The NIH ChestX-ray14 label vocabulary, in the order every model head and table uses.

One list for the whole package: the classifier's output index i is ``FINDINGS[i]`` everywhere
(checkpoints record it, so a checkpoint trained on another vocabulary is refused).
"""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
LABEL_COLUMNS: tuple[str, ...] = FINDINGS + (NO_FINDING,)

# The eight findings that carry ground-truth boxes in BBox_List_2017.csv.
BOX_FINDINGS: tuple[str, ...] = FINDINGS[:8]

# BBox_List_2017.csv spells Infiltration as "Infiltrate".
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}

SHORT_NAMES = {
    "Atelectasis": "Atel.",
    "Cardiomegaly": "Cardio.",
    "Effusion": "Effusion",
    "Infiltration": "Infiltr.",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}


def finding_index(name: str) -> int:
    """Index of a finding in the model head; accepts the BBox file's aliases."""
    name = BOX_LABEL_ALIASES.get(name, name)
    try:
        return FINDINGS.index(name)
    except ValueError:
        raise KeyError(f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)}") from None


def normalise_finding(name: str) -> str:
    """Canonical spelling of a finding (maps 'Infiltrate' to 'Infiltration')."""
    return FINDINGS[finding_index(name.strip())]

# A finding is called present at a probability of at least this (``kacl predict``; the papers
# report AUCs, which need no threshold).
POSITIVE_PROBABILITY = 0.5
