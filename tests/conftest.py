"""Fixtures shared across the test suite."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kacl_cli.catalog import insert_rows
from kacl_cli.findings import BOX_FINDINGS, FINDINGS, LABEL_COLUMNS
from kacl_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
NIH_SAMPLE = REPO.parent / "shared" / "nih-sample"

os.environ.setdefault("KACL_NO_PROGRESS", "1")


# CI (.ci/run) sets this: there the sample is copied beside the clone, so its absence is a
# broken setup, and a skip would let the only real-data checks silently drop out of a green run.
REQUIRE_SAMPLE_ENV = "KACL_REQUIRE_SAMPLE"


def sample_required() -> bool:
    return os.environ.get(REQUIRE_SAMPLE_ENV, "").strip() not in ("", "0")


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    """The 95-image real NIH sample at ../shared/nih-sample; skip where it is absent, FAIL
    where it is absent and KACL_REQUIRE_SAMPLE=1 (CI)."""
    if not (NIH_SAMPLE / "images").is_dir():
        message = f"real NIH sample not found at {NIH_SAMPLE} (only in the project's workplace)"
        if sample_required():
            pytest.fail(f"{message}; {REQUIRE_SAMPLE_ENV}=1 requires it", pytrace=False)
        pytest.skip(message)
    return NIH_SAMPLE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the sample (directly or through a fixture) carries ``nih``, so
    ``-m nih`` / ``-m 'not nih'`` select exactly the real-data tests."""
    for item in items:
        if "nih_sample" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("nih"):
            item.add_marker(pytest.mark.nih)


def write_tiny_workspace(
    root: Path, n: int = 24, size: int = 64, seed: int = 0, orig: int = 256
) -> Workspace:
    """A workspace with random images, labels and GT boxes, written straight through the
    store and catalog APIs (no generator, no prepare): the fixture for stage unit tests.

    Splits: rows cycle train/train/val/test. Each image is positive for finding i % 14 (and
    Effusion on every 3rd); images positive for a box finding get a GT box of that finding.
    """
    rng = np.random.default_rng(seed)
    ws = Workspace(root)
    ws.init()
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    ws.store.write_images(0, images, size)
    splits = ["train", "train", "val", "test"]
    image_rows, label_rows, box_rows = [], [], []
    for i in range(n):
        image_id = f"{i:08d}_000.png"
        image_rows.append((image_id, i, str(i // 2), splits[i % 4], 0, "PA", 50, "M", orig, orig,
                           0.143, 0.143, f"/fake/{image_id}"))
        labels = {c: False for c in LABEL_COLUMNS}
        labels[FINDINGS[i % 14]] = True
        if i % 3 == 0:
            labels["Effusion"] = True
        label_rows.append((image_id, *(labels[c] for c in LABEL_COLUMNS)))
        for finding in BOX_FINDINGS:
            if labels[finding]:
                x, y = rng.uniform(0, orig / 2, size=2)
                w, h = rng.uniform(orig / 10, orig / 3, size=2)
                box_rows.append((image_id, finding, x, y, w, h))
    with ws.catalog.connect() as con:
        insert_rows(con, "images", image_rows)
        insert_rows(con, "labels", label_rows)
        insert_rows(con, "gt_boxes", box_rows)
    return ws


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Callable[..., Workspace]:
    """Factory: ``tiny_workspace(n=24, size=64, seed=0)`` -> a populated Workspace."""

    def make(n: int = 24, size: int = 64, seed: int = 0, orig: int = 256) -> Workspace:
        return write_tiny_workspace(tmp_path / f"ws-{n}-{size}-{seed}", n, size, seed, orig)

    return make


def _test_module(name: str) -> ModuleType:
    """Import ``tests/<name>.py``: pytest's importlib mode puts no tests folder on sys.path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fakes() -> ModuleType:
    """``tests/evaluate_fakes.py``: hand-written rounds (cam boxes, checkpoints) for evaluate."""
    return _test_module("evaluate_fakes")


@pytest.fixture(scope="session")
def square() -> ModuleType:
    """``tests/square_model.py``: a hand-set net whose Grad-CAM maps light a known square."""
    return _test_module("square_model")


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Phantoms + a 1-epoch tiny pretrain (``tests/contrast_workspace.py``), built once per
    session; tests take a copy (:func:`pretrained_ws`) and never change this one."""
    cw = _test_module("contrast_workspace")
    return cw.pretrained_workspace(tmp_path_factory.mktemp("pretrained") / "base")


@pytest.fixture
def pretrained_ws(pretrained_base: Workspace, tmp_path: Path) -> Workspace:
    """An independent copy of :func:`pretrained_base` for one test."""
    return _test_module("contrast_workspace").clone(pretrained_base, tmp_path / "ws")
