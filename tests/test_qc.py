"""QC flags and verdicts from hand-made numbers."""
from __future__ import annotations

import pytest

from wsi_response.config import QcConfig
from wsi_response.qc import slide_qc, specimen_qc

CFG = QcConfig()
GOOD = {"status": "ok", "mpp": 0.25, "objective_power": 40.0, "tissue_area_mm2": 100.0,
        "tumor_bed_area_mm2": 60.0}
CLEAN = {"pen": 0.0, "blur": 0.5, "fold": 0.0, "bubble": 0.0}


def codes(result: dict) -> list[str]:
    return [f["code"] for f in result["flags"]]


def test_good_slide_is_reportable_without_flags():
    result = slide_qc(GOOD, CLEAN, CFG)
    assert result == {"flags": [], "verdict": "reportable", "reportable": True}


def test_artefact_above_threshold_is_a_caveat_with_its_number():
    result = slide_qc(GOOD, {**CLEAN, "pen": 3.2, "blur": 18.0}, CFG)
    assert result["verdict"] == "reportable_with_caveats" and result["reportable"]
    messages = [f["message"] for f in result["flags"]]
    assert "pen ink 3.2 % of tissue (excluded)" in messages
    assert "out of focus 18.0 % of tissue (excluded)" in messages
    assert next(f for f in result["flags"] if f["code"] == "artefact_pen")["value"] == pytest.approx(3.2)


def test_artefacts_over_the_maximum_make_the_slide_not_reportable():
    result = slide_qc(GOOD, {**CLEAN, "pen": 20.0, "blur": 10.0, "any": 26.0}, CFG)
    assert result["verdict"] == "not_reportable" and not result["reportable"]
    flag = next(f for f in result["flags"] if f["code"] == "artefact_total")
    assert flag["severity"] == "fail" and flag["value"] == pytest.approx(26.0)
    # the union ("any") counts, not the sum of overlapping kinds
    assert slide_qc(GOOD, {**CLEAN, "pen": 20.0, "blur": 10.0, "any": 24.0}, CFG)["reportable"]


@pytest.mark.parametrize("mpp, power, flagged", [
    (0.25, 40, False), (0.5, 20, False), (0.499, 20, False), (0.25, 20, True), (0.5, 40, True),
    (0.25, None, False),
])
def test_mpp_against_objective_power(mpp, power, flagged):
    result = slide_qc({**GOOD, "mpp": mpp, "objective_power": power}, CLEAN, CFG)
    assert ("mpp_objective_mismatch" in codes(result)) is flagged
    if flagged:
        assert result["verdict"] == "reportable_with_caveats"
        assert f"MPP {mpp:g} but objective power {power}" in result["flags"][0]["message"]


def test_no_tissue_small_bed_and_failed_slide():
    none = slide_qc({**GOOD, "tissue_area_mm2": 0.0, "tumor_bed_area_mm2": 0.0}, {}, CFG)
    assert none["verdict"] == "not_reportable" and none["flags"][0]["message"] == "no tissue found"
    small = slide_qc({**GOOD, "tumor_bed_area_mm2": 0.4}, CLEAN, CFG)
    assert small["verdict"] == "reportable_with_caveats"
    assert small["flags"][0]["message"].startswith("tumor bed 0.4 mm²")
    failed = slide_qc({"status": "failed", "error": "truncated file"}, {}, CFG)
    assert failed["verdict"] == "not_reportable" and "truncated file" in failed["flags"][0]["message"]
    unmeasured = slide_qc({**GOOD, "tumor_bed_area_mm2": None}, CLEAN, CFG)
    assert unmeasured["verdict"] == "reportable"


def _slides(n_ok: int, n_failed: int) -> list[dict]:
    ok = [{"slide_id": f"S_{i}", "status": "ok", "qc": slide_qc(GOOD, CLEAN, CFG)} for i in range(n_ok)]
    bad = [{"slide_id": f"F_{i}", "status": "failed", "qc": slide_qc({"status": "failed"}, {}, CFG)}
           for i in range(n_failed)]
    return ok + bad


SPECIMEN = {"tissue_area_mm2": 1000.0, "tumor_bed_area_mm2": 500.0}
REAL_MODEL = {"trained_on": "institutional cohort", "validation_error": {"confusion_matrix": [[9, 1], [0, 10]]}}


def test_specimen_with_one_failed_slide_of_twelve_is_a_caveat():
    result = specimen_qc(_slides(11, 1), SPECIMEN, REAL_MODEL, CFG)
    assert result["verdict"] == "reportable_with_caveats"
    assert "specimen has 1 failed slide of 12" in [f["message"] for f in result["flags"]]
    # the failed slide is reported once, by the count, not again as a slide verdict
    assert [f["code"] for f in result["flags"]] == ["failed_slides"]


def test_an_unreportable_slide_is_a_specimen_caveat():
    slides = _slides(2, 0) + [{"slide_id": "X", "status": "ok", "qc": slide_qc(GOOD, {"pen": 300.0}, CFG)}]
    result = specimen_qc(slides, SPECIMEN, REAL_MODEL, CFG)
    worst = [f for f in result["flags"] if f["code"] == "slide_verdict"]
    assert len(worst) == 1 and worst[0]["message"].startswith("slide X: not_reportable")
    assert worst[0]["severity"] == "caveat" and result["verdict"] == "reportable_with_caveats"


def test_specimen_with_too_many_failed_slides_or_none_is_not_reportable():
    assert specimen_qc(_slides(2, 1), SPECIMEN, REAL_MODEL, CFG)["verdict"] == "not_reportable"
    none = specimen_qc(_slides(0, 2), SPECIMEN, REAL_MODEL, CFG)
    assert none["verdict"] == "not_reportable" and codes(none)[0] == "no_slides"
    assert specimen_qc([], SPECIMEN, REAL_MODEL, CFG)["verdict"] == "not_reportable"


def test_specimen_caveats_demo_model_and_small_bed():
    clean = specimen_qc(_slides(3, 0), SPECIMEN, REAL_MODEL, CFG)
    assert clean == {"flags": [], "verdict": "reportable", "reportable": True}
    demo = specimen_qc(_slides(3, 0), SPECIMEN, {**REAL_MODEL, "trained_on": "synthetic slides (wsi_response.synth)"},
                       CFG)
    assert demo["verdict"] == "reportable_with_caveats"
    assert demo["flags"][0]["message"] == ("demonstration model trained on synthetic slides; "
                                           "not for clinical use")
    small = specimen_qc(_slides(3, 0), {**SPECIMEN, "tumor_bed_area_mm2": 0.4}, REAL_MODEL, CFG)
    assert codes(small) == ["small_tumor_bed"]
    empty = specimen_qc(_slides(3, 0), {"tissue_area_mm2": 0.0, "tumor_bed_area_mm2": 0.0}, REAL_MODEL, CFG)
    assert empty["verdict"] == "not_reportable" and codes(empty) == ["no_tissue"]


def test_model_without_validation_gets_an_error_unknown_caveat():
    result = specimen_qc(_slides(3, 0), SPECIMEN, {"trained_on": "institutional cohort"}, CFG)
    assert result["verdict"] == "reportable_with_caveats"
    assert result["flags"] == [{
        "code": "model_error_unknown", "severity": "caveat", "value": None,
        "message": "model error unknown: no validation confusion matrix in the model (trained without held-out "
                   "slides); the 95 % interval covers only its own tile probabilities"}]
