"""The shipped pyradiomics table (feature names, setting keys) cannot drift from pyradiomics."""

from __future__ import annotations

from pathlib import Path

import pytest

from kacl_cli.stages.radiomics import _pyrad_table_data, pyrad_table
from kacl_cli.stages.radiomics import settings as S


def test_shipped_table_is_what_the_installed_pyradiomics_reports() -> None:
    installed = pyrad_table.from_pyradiomics()
    assert pyrad_table.shipped() == installed
    assert installed["setting_keys"] and all(installed["class_features"].values())
    # the file is exactly what regenerating it writes (so nobody edits it by hand)
    assert Path(_pyrad_table_data.__file__).read_text() == pyrad_table.render(installed)


def test_settings_answer_from_the_table_as_from_pyradiomics() -> None:
    installed = pyrad_table.from_pyradiomics()
    assert S.class_features() == {c: installed["class_features"][c] for c in S.CLASS_ORDER}
    assert S.known_setting_keys() == frozenset(installed["setting_keys"])
    assert {"binWidth", "binCount", "label", "normalize"} <= S.known_setting_keys()


def test_another_pyradiomics_version_is_read_from_pyradiomics(monkeypatch) -> None:
    monkeypatch.setattr(pyrad_table, "installed_version", lambda: "0.0.0-other")
    assert pyrad_table.shipped() is None
    calls = []
    real = pyrad_table.from_pyradiomics
    monkeypatch.setattr(pyrad_table, "from_pyradiomics", lambda: calls.append(1) or real())
    S._pyrad_table.cache_clear()
    try:
        assert "MCC" in S.class_features()["glcm"] and calls
    finally:
        S._pyrad_table.cache_clear()


def test_a_table_built_without_pyradiomics_metadata_is_not_trusted(monkeypatch) -> None:
    import importlib.metadata

    def missing(_name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert pyrad_table.installed_version() is None
    assert pyrad_table.shipped() is None


@pytest.mark.parametrize("cls", S.CLASS_ORDER)
def test_default_settings_enable_every_non_deprecated_feature(cls: str) -> None:
    table = _pyrad_table_data.TABLE["class_features"][cls]
    assert S.default_settings()["featureClass"][cls] == sorted(
        n for n, deprecated in table.items() if not deprecated)
