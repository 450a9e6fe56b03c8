"""docs/reliability.md lists every kind of the matrix (kinds.py), so the two stay in step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_the_doc_lists_every_kind() -> None:
    spec = importlib.util.spec_from_file_location("reliability_kinds_doc", HERE / "kinds.py")
    kinds = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kinds  # dataclasses look their module up there
    spec.loader.exec_module(kinds)
    doc = (HERE.parents[1] / "docs" / "reliability.md").read_text()
    missing = [k.name for k in kinds.KINDS if f"`{k.name}`" not in doc]
    assert missing == []
