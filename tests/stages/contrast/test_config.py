"""ContrastConfig's --radiomics-params: out of the hash at its default (earlier runs stay
recognised), hashed by the settings the file resolves to (not its path) when given."""

from __future__ import annotations

import shutil

import pytest

from kacl_cli.errors import InputError
from kacl_cli.stages.contrast.config import ContrastConfig
from kacl_cli.stages.radiomics import settings as S


def test_radiomics_params_enter_the_hash_only_when_given(tmp_path) -> None:
    base = ContrastConfig()
    assert "radiomics_params" not in base.hashed()
    given = ContrastConfig(radiomics_params=str(S.NORMALIZED_PARAMS))
    given.validate()
    assert given.hashed()["radiomics_params"] == S.settings_hash(
        S.load_settings(S.NORMALIZED_PARAMS))
    moved = shutil.copy(S.NORMALIZED_PARAMS, tmp_path / "copy.yaml")
    assert ContrastConfig(radiomics_params=str(moved)).hashed() == given.hashed()
    other = tmp_path / "other.yaml"
    other.write_text("setting: {binWidth: 10}\n")
    assert ContrastConfig(radiomics_params=str(other)).hashed() != given.hashed()
    # the default params file, given explicitly, still differs from "not given": the hash
    # records that a file was asked for
    assert ContrastConfig(radiomics_params=str(S.DEFAULT_PARAMS)).hashed() != base.hashed()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(radiomics_params="/nonexistent/p.yaml"), "no such file"),
        (dict(radiomics_params=str(S.NORMALIZED_PARAMS), positives="augment"),
         "--positives radiomics"),
    ],
)
def test_bad_radiomics_params_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ContrastConfig(**kw).validate()
