"""StudyConfig/Study pieces that need no training: --radiomics-params in the study's
identity (absent at the default) and in the radiomics cells' ContrastConfig only."""

from __future__ import annotations

import json

from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.study import SETTINGS, Study, StudyConfig
from kacl_cli.workspace import Workspace


def test_radiomics_params_identity_and_cells(tmp_path) -> None:
    assert "radiomics_params" not in StudyConfig().identity()
    cfg = StudyConfig(radiomics_params=str(S.NORMALIZED_PARAMS))
    assert cfg.identity()["radiomics_params"] == S.settings_hash(
        S.load_settings(S.NORMALIZED_PARAMS))
    study = Study(Workspace(tmp_path / "ws"), cfg, lambda _t: None)  # touches no file
    for setting in SETTINGS:
        c = study.contrast_config(0, setting)
        c.validate()
        wanted = str(S.NORMALIZED_PARAMS) if c.positives == "radiomics" else None
        assert c.radiomics_params == wanted, setting


def test_an_earlier_study_identity_is_unchanged(tmp_path) -> None:
    """A study started before --radiomics-params existed continues (same identity)."""
    ws = Workspace(tmp_path / "ws")
    study = Study(ws, StudyConfig(), lambda _t: None)
    study.check_identity()
    Study(ws, StudyConfig(), lambda _t: None).check_identity()  # no refusal
    doc = json.loads((study.root / "study.json").read_text())
    assert "radiomics_params" not in doc["identity"]
