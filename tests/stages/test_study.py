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


def test_positive_choice_settings_keep_their_rule_under_the_study_defaults(tmp_path) -> None:
    """The positive-choice cells measure their own rule whatever the study-wide flags say,
    while the method's `radiomics` cell follows them; the default grid stays the issue's."""
    assert "radiomics-labelled" not in StudyConfig().settings
    cfg = StudyConfig(positive_roi="predicted", normal_positive="skip")
    study = Study(Workspace(tmp_path / "ws"), cfg, lambda _t: None)
    got = {s: study.contrast_config(0, s) for s in
           ("radiomics", "radiomics-labelled", "radiomics-labelled-lung", "oracle")}
    assert (got["radiomics"].positive_roi, got["radiomics"].normal_positive) == (
        "predicted", "skip")
    assert (got["radiomics-labelled"].positive_roi,
            got["radiomics-labelled"].normal_positive) == ("labelled", "skip")
    assert (got["radiomics-labelled-lung"].positive_roi,
            got["radiomics-labelled-lung"].normal_positive) == ("labelled", "lung")
    assert got["oracle"].positive_roi == "oracle"
    lung = Study(Workspace(tmp_path / "ws2"), StudyConfig(normal_positive="lung"),
                 lambda _t: None).contrast_config(0, "radiomics-labelled")
    assert lung.normal_positive == "lung"  # not pinned by the setting: the study flag applies
    for c in got.values():
        c.validate()
