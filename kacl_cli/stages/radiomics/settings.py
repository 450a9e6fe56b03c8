"""Radiomics settings: the defaults, ``--params`` files in pyradiomics' format, a stable hash.

A *resolved* settings dict is the one object every backend and the stage read::

    {"imageType": {"Original": {}},
     "featureClass": {"firstorder": [names...], "shape2D": [...], ...},   # explicit, sorted
     "setting": {"binWidth": 25, "label": 1, ...},                          # pyradiomics keys
     "kacl": {"spacing": "store-mm" | "pixel"}}

Feature lists are always spelled out (never "all"), so the hash changes when a pyradiomics
upgrade adds a feature, and two backends asked for the same settings return the same columns.
The column order is fixed: classes in :data:`CLASS_ORDER`, features alphabetically within a
class; names are pyradiomics' keys (``original_glcm_Contrast``).
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics import pyrad_table
from kacl_cli.workspace import config_hash

DEFAULT_PARAMS = Path(__file__).with_name("default_params.yaml")
# The defaults with pyradiomics' normalize on (the exposure confound; docs/radiomics-fast.md)
NORMALIZED_PARAMS = Path(__file__).with_name("normalized_params.yaml")

# The classes kacl supports, in column order. "shape" (3D) is meaningless on a 2D X-ray.
CLASS_ORDER: tuple[str, ...] = (
    "firstorder", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm",
)
SPACING_MODES = ("store-mm", "pixel")
TOP_LEVEL_KEYS = {"imageType", "featureClass", "setting", "kacl"}


@lru_cache(maxsize=1)
def _pyrad_table() -> dict[str, Any]:
    """pyradiomics' names and keys: kacl's shipped table when it was generated from the
    installed version (no pyradiomics import, ~0.2 s), else the installed pyradiomics."""
    return pyrad_table.shipped() or pyrad_table.from_pyradiomics()


def class_features() -> dict[str, dict[str, bool]]:
    """``{class: {feature: is_deprecated}}`` of the installed pyradiomics."""
    classes = _pyrad_table()["class_features"]
    return {c: dict(classes[c]) for c in CLASS_ORDER}


def known_setting_keys() -> frozenset[str]:
    """Setting keys pyradiomics' own parameter schema accepts."""
    return frozenset(_pyrad_table()["setting_keys"])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"radiomics params file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"radiomics params file {path}: unreadable ({exc})") from None
    except yaml.YAMLError as exc:
        line = str(exc).replace("\n", " ")
        raise InputError(f"radiomics params file {path}: invalid YAML ({line})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"radiomics params file {path}: expected a mapping at the top level")
    return data


def _resolve_classes(spec: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(spec, dict) or not spec:
        raise InputError(f"{where}: featureClass must map at least one class to a feature list")
    available = class_features()
    out: dict[str, list[str]] = {}
    for cls, names in spec.items():
        if cls not in available:
            hint = " (use shape2D: X-rays are 2D)" if cls == "shape" else ""
            raise InputError(
                f"{where}: unsupported feature class {cls!r}{hint}; "
                f"supported: {', '.join(CLASS_ORDER)}"
            )
        if names is None or names == []:
            chosen = [n for n, deprecated in available[cls].items() if not deprecated]
        elif isinstance(names, str):
            chosen = [names]
        elif isinstance(names, list):
            chosen = [str(n) for n in names]
        else:
            raise InputError(f"{where}: featureClass {cls} must be a list of feature names")
        unknown = [n for n in chosen if n not in available[cls]]
        if unknown:
            raise InputError(f"{where}: unknown {cls} feature(s) {', '.join(unknown)}")
        out[cls] = sorted(set(chosen))
    return {c: out[c] for c in CLASS_ORDER if c in out}


def _check_image_type(spec: Any, where: str) -> dict[str, dict]:
    if spec is None:
        return {"Original": {}}
    if not isinstance(spec, dict):
        raise InputError(f"{where}: imageType must be a mapping")
    others = [k for k in spec if k != "Original"]
    if others:
        raise InputError(
            f"{where}: imageType {', '.join(others)} is not supported: kacl computes radiomics "
            "on the Original image only (both backends must give the same columns)"
        )
    if "Original" not in spec:
        raise InputError(f"{where}: imageType must enable Original")
    if spec["Original"] not in (None, {}):
        raise InputError(f"{where}: imageType Original takes no custom settings")
    return {"Original": {}}


def _check_setting(spec: Any, where: str) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise InputError(f"{where}: setting must be a mapping")
    known = known_setting_keys()
    unknown = [k for k in spec if known and k not in known]
    if unknown:
        raise InputError(f"{where}: unknown pyradiomics setting(s) {', '.join(map(str, unknown))}")
    _check_normalize(spec, where)
    _check_bins(spec, where)
    if spec.get("force2D"):
        raise InputError(
            f"{where}: force2D is refused: kacl's images are already 2D, and force2D on a 2D "
            "image restricts texture to neighbours along one axis (see docs/radiomics.md)"
        )
    return dict(spec)


# Bins over the 8-bit store's 0..255 range: beyond this, texture matrices (bins^2 per
# angle and ROI) reach gigabytes (binWidth 0.0001 asked numpy for 58.7 TiB). pyradiomics'
# default binWidth 25 gives 11 bins.
MAX_BINS = 1024
INTENSITY_RANGE = 256.0
# With ``normalize`` the values are in standard deviations of the image times normalizeScale;
# the nominal range is +-removeOutliers SD when clipped, else +-3 SD (>99% of an X-ray's
# pixels). Below 2 bins over it, texture is one flat level: a binWidth meant for 0..255.
NORMALIZED_SPAN_SD = 6.0
MIN_NORMALIZED_BINS = 2


def _positive(spec: dict[str, Any], key: str, where: str) -> float:
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{where}: {key} must be a positive number, got {v!r}")
    return float(v)


def _check_normalize(spec: dict[str, Any], where: str) -> None:
    """pyradiomics' schema for normalize/normalizeScale/removeOutliers, as one-line errors."""
    if "normalize" in spec and not isinstance(spec["normalize"], bool):
        raise InputError(f"{where}: normalize must be true or false, got {spec['normalize']!r}")
    for key in ("normalizeScale", "removeOutliers"):
        if key in spec and not (key == "removeOutliers" and spec[key] is None):
            _positive(spec, key, where)


def intensity_range(spec: dict[str, Any]) -> tuple[float, str]:
    """The nominal intensity range binWidth divides, and how to say it."""
    if not spec.get("normalize"):
        return INTENSITY_RANGE, "the 8-bit range"
    scale = float(spec.get("normalizeScale", 1) or 1)
    outliers = spec.get("removeOutliers")
    span = 2 * float(outliers) if outliers else NORMALIZED_SPAN_SD
    return span * scale, f"the normalised range (+-{span / 2:g} SD x normalizeScale {scale:g})"


def _check_bins(spec: dict[str, Any], where: str) -> None:
    """Refuse a binWidth/binCount that is not a positive number or gives absurd bin counts."""
    for key in ("binWidth", "binCount"):
        if key not in spec:
            continue
        v = _positive(spec, key, where)
        span, what = intensity_range(spec)
        bins = span / v if key == "binWidth" else v
        if bins > MAX_BINS:
            raise InputError(f"{where}: {key} {v:g} gives {bins:.0f} gray-level bins over "
                             f"{what}; at most {MAX_BINS} are allowed")
        if key == "binWidth" and spec.get("normalize") and "binCount" not in spec \
                and bins < MIN_NORMALIZED_BINS:
            raise InputError(f"{where}: binWidth {v:g} gives {bins:.2g} gray-level bins over "
                             f"{what}; lower binWidth or raise normalizeScale")


def _check_kacl(spec: Any, where: str) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, dict) or set(spec) - {"spacing"}:
        raise InputError(f"{where}: the kacl section only takes `spacing`")
    if "spacing" in spec and spec["spacing"] not in SPACING_MODES:
        raise InputError(
            f"{where}: kacl.spacing must be one of {', '.join(SPACING_MODES)}, "
            f"got {spec['spacing']!r}"
        )
    return dict(spec)


def parse_params(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one params mapping (pyradiomics format + ``kacl``) into a partial config."""
    extra = set(data) - TOP_LEVEL_KEYS
    if extra:
        hint = " (voxel-based extraction is not supported)" if "voxelSetting" in extra else ""
        raise InputError(
            f"{where}: unknown top-level key(s) {', '.join(sorted(map(str, extra)))}{hint}; "
            f"expected {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    out: dict[str, Any] = {"imageType": _check_image_type(data.get("imageType"), where)}
    if "featureClass" in data:
        out["featureClass"] = _resolve_classes(data["featureClass"], where)
    out["setting"] = _check_setting(data.get("setting"), where)
    out["kacl"] = _check_kacl(data.get("kacl"), where)
    return out


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    parsed = parse_params(_read_yaml(DEFAULT_PARAMS), str(DEFAULT_PARAMS))
    return parsed


def default_settings() -> dict[str, Any]:
    """The resolved defaults (a fresh copy; callers may mutate it)."""
    return copy.deepcopy(_defaults())


def load_settings(params: Path | str | None = None) -> dict[str, Any]:
    """Resolved settings: the defaults, overlaid with a ``--params`` YAML file if given.

    A file's ``featureClass`` *replaces* the default classes (pyradiomics' semantics: listing
    classes selects them); its ``setting`` and ``kacl`` keys override single defaults.
    """
    settings = default_settings()
    if params is None:
        return settings
    user = parse_params(_read_yaml(Path(params)), str(params))
    if "featureClass" in user:
        settings["featureClass"] = user["featureClass"]
    settings["setting"].update(user["setting"])
    settings["kacl"].update(user["kacl"])
    settings["imageType"] = user["imageType"]
    _check_bins(settings["setting"], str(params))  # the file's normalize with default bins
    return settings


def feature_names(settings: dict[str, Any]) -> list[str]:
    """Column names in the fixed order (classes by CLASS_ORDER, features sorted)."""
    classes = settings["featureClass"]
    return [
        f"original_{cls}_{name}"
        for cls in CLASS_ORDER if cls in classes
        for name in sorted(classes[cls])
    ]


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable 16-hex hash of resolved settings (key order and YAML spelling don't matter)."""
    return config_hash(settings)


def spacing_mode(settings: dict[str, Any]) -> str:
    return str(settings.get("kacl", {}).get("spacing", "store-mm"))
