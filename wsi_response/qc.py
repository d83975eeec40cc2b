"""QC flags and the verdict that gates a score. Pure functions: plain data in, plain data out.

A flag is ``{"code", "severity", "message", "value"}``; ``severity`` is ``"fail"`` (the result
must not be reported), ``"caveat"`` (report it with the flag) or ``"info"``. The verdict is the
worst severity: ``not_reportable`` if any flag fails, else ``reportable_with_caveats`` if any is
a caveat, else ``reportable``. Thresholds come from :class:`~wsi_response.config.QcConfig`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .config import QcConfig

__all__ = ["VERDICTS", "slide_qc", "specimen_qc"]

VERDICTS: tuple[str, ...] = ("reportable", "reportable_with_caveats", "not_reportable")
_ARTEFACT_WORDS = {"pen": "pen ink", "blur": "out of focus", "fold": "tissue folds",
                   "bubble": "bubbles or coverslip edges"}


def slide_qc(record: Mapping[str, Any], artefact_areas_mm2: Mapping[str, float],
             cfg: QcConfig = QcConfig()) -> dict[str, Any]:
    """Flags and verdict of one slide.

    ``record`` has ``status`` ("ok" or a failure), ``mpp`` (µm/px), ``objective_power``
    (or None), ``tissue_area_mm2`` and ``tumor_bed_area_mm2`` (None: not measured);
    ``artefact_areas_mm2`` maps kinds (``pen``, ``blur``, ...) and optionally ``"any"`` (their
    union) to areas inside the tissue, mm².
    """
    flags: list[dict[str, Any]] = []
    if record.get("status", "ok") != "ok":
        error = record.get("error")
        flags.append(_flag("slide_failed", "fail", f"slide failed: {error or record['status']}", None))
        return _result(flags)
    flags += _mpp_flags(record.get("mpp"), record.get("objective_power"), cfg)
    tissue = float(record.get("tissue_area_mm2") or 0.0)
    if tissue <= 0:
        flags.append(_flag("no_tissue", "fail", "no tissue found", 0.0))
        return _result(flags)
    if tissue < cfg.min_tissue_mm2:
        flags.append(_flag("little_tissue", "fail",
                           f"tissue {tissue:.3g} mm² (less than {cfg.min_tissue_mm2:g} mm²)", tissue))
    flags += _artefact_flags(artefact_areas_mm2, tissue, cfg)
    bed = record.get("tumor_bed_area_mm2")
    if bed is not None:
        flags += _bed_flags(float(bed), cfg)
    return _result(flags)


def specimen_qc(slide_records: Sequence[Mapping[str, Any]], specimen: Mapping[str, Any],
                model: Mapping[str, Any], cfg: QcConfig = QcConfig()) -> dict[str, Any]:
    """Flags and verdict of a specimen from its slides' records (each with ``slide_id``,
    ``status`` and ``qc``, the :func:`slide_qc` result), the specimen's areas
    (``tissue_area_mm2``, ``tumor_bed_area_mm2``, mm²) and the model (``trained_on``,
    ``validation_error``: a model without it gets the caveat ``model_error_unknown``)."""
    flags: list[dict[str, Any]] = []
    n = len(slide_records)
    failed = [r for r in slide_records if r.get("status", "ok") == "failed"]
    if n == 0 or len(failed) == n:
        flags.append(_flag("no_slides", "fail", f"no slide could be measured ({n} slides)", float(len(failed))))
    elif failed:
        severity = "fail" if len(failed) / n > cfg.max_failed_slide_fraction else "caveat"
        flags.append(_flag("failed_slides", severity,
                           f"specimen has {len(failed)} failed slide{'s' if len(failed) > 1 else ''} of {n}",
                           float(len(failed))))
    for record in slide_records:
        qc = record.get("qc") or {}
        if record.get("status") != "failed" and qc.get("verdict", "reportable") != "reportable":
            reasons = "; ".join(f["message"] for f in qc.get("flags", []) if f["severity"] != "info")
            severity = "caveat" if qc["verdict"] == "not_reportable" else "info"
            flags.append(_flag("slide_verdict", severity,
                               f"slide {record.get('slide_id')}: {qc['verdict']} ({reasons})", None))
    if n and len(failed) < n:
        if float(specimen.get("tissue_area_mm2") or 0.0) <= 0:
            flags.append(_flag("no_tissue", "fail", "no tissue found", 0.0))
        elif specimen.get("tumor_bed_area_mm2") is not None:
            flags += _bed_flags(float(specimen["tumor_bed_area_mm2"]), cfg)
    if "synthetic" in str(model.get("trained_on", "")).lower():
        flags.append(_flag("demo_model", "caveat",
                           "demonstration model trained on synthetic slides; not for clinical use", None))
    if model.get("validation_error") is None:
        flags.append(_flag("model_error_unknown", "caveat",
                           "model error unknown: no validation confusion matrix in the model (trained without "
                           "held-out slides); the 95 % interval covers only its own tile probabilities", None))
    return _result(flags)


def _flag(code: str, severity: str, message: str, value: float | None) -> dict[str, Any]:
    return {"code": code, "severity": severity, "message": message, "value": value}


def _result(flags: list[dict[str, Any]]) -> dict[str, Any]:
    severities = {f["severity"] for f in flags}
    verdict = ("not_reportable" if "fail" in severities
               else "reportable_with_caveats" if "caveat" in severities else "reportable")
    return {"flags": flags, "verdict": verdict, "reportable": verdict != "not_reportable"}


def _mpp_flags(mpp: float | None, power: float | None, cfg: QcConfig) -> list[dict[str, Any]]:
    """MPP against the objective power (40x ≈ 0.25 µm/px, 20x ≈ 0.5 µm/px)."""
    if not mpp or not power:
        return []
    expected = 10.0 / float(power)
    off = float(mpp) / expected - 1.0
    if abs(off) <= cfg.mpp_power_tolerance:
        return []
    return [_flag("mpp_objective_mismatch", "caveat",
                  f"MPP {float(mpp):.3g} but objective power {float(power):g} "
                  f"(expected about {expected:.2g} µm/px)", float(mpp))]


def _artefact_flags(areas_mm2: Mapping[str, float], tissue_mm2: float,
                    cfg: QcConfig) -> list[dict[str, Any]]:
    flags = []
    for kind, area in areas_mm2.items():
        if kind == "any":
            continue
        share = float(area) / tissue_mm2
        if share > cfg.flag_artefact_fraction:
            words = _ARTEFACT_WORDS.get(kind, kind)
            flags.append(_flag(f"artefact_{kind}", "caveat",
                               f"{words} {100 * share:.1f} % of tissue (excluded)", 100 * share))
    total = float(areas_mm2["any"]) if "any" in areas_mm2 else sum(
        float(v) for v in areas_mm2.values())
    if total / tissue_mm2 > cfg.max_artefact_fraction:
        flags.append(_flag("artefact_total", "fail",
                           f"artefacts cover {100 * total / tissue_mm2:.1f} % of tissue "
                           f"(more than {100 * cfg.max_artefact_fraction:g} %)", 100 * total / tissue_mm2))
    return flags


def _bed_flags(bed_mm2: float, cfg: QcConfig) -> list[dict[str, Any]]:
    if bed_mm2 >= cfg.min_tumor_bed_mm2:
        return []
    return [_flag("small_tumor_bed", "caveat",
                  f"tumor bed {bed_mm2:.2g} mm² (less than {cfg.min_tumor_bed_mm2:g} mm²)", bed_mm2)]
