"""``run_specimen``: the only module that calls every stage.

Per slide (``process_slide``): open -> tissue mask -> tile grid -> CNN probabilities (resumable
zarr store) -> class areas -> QuPath overlays -> PNGs -> ``slide.json``. Per specimen
(``aggregate_specimen``): read every ``slide.json`` and tile store of the specimen folder and write
``specimen.json`` and ``report.html``. ``run`` and ``aggregate`` share that one path, so a
specimen rebuilt from shards equals a local run.

A slide that fails gets a ``slide.json`` with ``status: "failed"`` and the one-line error; the
other slides go on. Every file is written atomically (temporary name, then rename), and
``slide.json`` last: a slide is done only when its ``slide.json`` is current
(:func:`current_slide_record`), so a run killed at any point is finished by running it again,
without redoing the slides that were done (and with the finished tile chunks of the others).
"""
from __future__ import annotations

import errno
import hashlib
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .atomic import remove_partials, write_atomic, write_json_atomic
from .artefacts import ArtefactMask, cell_intensity_flags, detect_artefacts
from .classes import ARTEFACT, CLASSES, COLORS_RGB, QUPATH_NAMES
from .qc import slide_qc, specimen_qc
from .config import Config, QcConfig, config_to_dict
from .errors import ConfigError, OutputError, WsiResponseError
from .focus import FocusJob
from .footprint import check_memory, check_mpp_argument
from .ids import check_inside, check_slide_id, check_specimen_id, same_file_pairs, unique_slide_ids
from .locks import specimen_locks
from .quantify import SlideAreas, slide_areas, slide_areas_from_tiles, specimen_areas
from .report import box_thumbnail, heatmap_png, mask_on_thumbnail, overlay_png, render_report
from .slide import Slide, open_slide
from .stain import grid_stain
from .store import TilePredictions, TileStoreError, read_tile_store
from .tiling import TileGrid, tile_grid
from .tissue import Overview, TissueMask, detect_tissue, possible_tissue, read_overview, stained_px

__all__ = ["SCHEMA_VERSION", "process_slide", "record_failure", "aggregate_specimen",
           "run_specimen", "check_writable", "raise_if_environment", "config_sha256", "source_fingerprint",
           "current_slide_record", "damaged_store"]

SCHEMA_VERSION = 1
THUMBNAIL_MAX_PX = 1024
REFRESH_S = 0.1  # seconds between redraws of the tile progress bar

Progress = Callable[[str, int, int], None]  # (slide_id, tiles done, tiles total)


def check_writable(out_dir: Path) -> None:
    """Fail before any compute when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(out_dir, f"output folder is not writable ({exc.strerror or exc})") from None


def raise_if_environment(error: BaseException, out_dir: Path) -> None:
    """Re-raise as :class:`OutputError` when ``error`` is about the output disk, not the slide."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        raise OutputError(out_dir, f"cannot write results ({error.strerror}); stopping") from error


RESULT_SECTIONS = ("tissue", "tiling", "qc")  # config sections the numbers depend on (not device, workers)


def config_sha256(cfg: Config) -> str:
    """Hash of the config sections that results depend on (resume and consistency checks)."""
    full = config_to_dict(cfg)
    relevant = {k: full[k] for k in RESULT_SECTIONS if k in full}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def source_fingerprint(path: str | Path) -> dict[str, int] | None:
    """Size (bytes) and modification time (ns) of a slide file, to tell a changed file; None if unreadable."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def current_slide_record(slide_dir: Path, path: str | Path, model_sha256: str | None,
                         cfg_sha256: str) -> dict[str, Any] | None:
    """The ``slide.json`` in ``slide_dir`` if it is of this slide file (path; size and mtime unless
    it failed), model (sha256) and result-relevant config (:func:`config_sha256`), else None."""
    try:
        record = json.loads((slide_dir / "slide.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    matches = (record.get("path") == str(path)
               and record.get("config_sha256") == cfg_sha256
               and (record.get("model") or {}).get("sha256") == model_sha256
               and (record.get("status") == "failed" or record.get("source") == source_fingerprint(path)))
    return record if matches else None


def damaged_store(slide_dir: Path, record: Mapping[str, Any]) -> str | None:
    """Why the tile store of the done slide of ``record`` cannot be used (one line), or None when it
    is intact (or the slide has no tiles). Such a slide is not done: it is redone, the store rebuilt."""
    if not record.get("n_tiles"):
        return None
    try:
        read_tile_store(slide_dir / "tiles.zarr")
    except TileStoreError as exc:
        return str(exc)
    return None


def process_slide(path: str | Path, slide_id: str, slide_dir: Path, classifier: Any, cfg: Config, *,
                  mpp: float | None = None, force_mpp: bool = False, progress: Progress | None = None,
                  stage: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """Run one slide end to end into ``slide_dir``; returns its ``slide.json`` record.

    ``mpp`` and ``force_mpp``: as :func:`~wsi_response.slide.open_slide`. ``progress`` gets the
    tiles done after each chunk; ``stage(name)`` is called as each stage starts (``tissue``,
    ``inference``, ``export``), so a watchdog can tell a slow slide from a stuck one.

    Raises :class:`WsiResponseError` for a bad slide (the caller records it as failed). The
    slide's old ``slide.json`` and writers' leftover temporary files are removed first. The caller
    holds the lock of ``slide_dir`` (:mod:`wsi_response.locks`), as for :func:`record_failure`.
    """
    from .inference import predict
    from .qupath import overlay_features, write_overlay, write_tiles
    from .regions import class_regions

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = source_fingerprint(path)  # before reading: a file replaced meanwhile does not look done
    (slide_dir / "slide.json").unlink(missing_ok=True)  # a slide being redone never looks done
    if slide_dir.is_dir():
        remove_partials(slide_dir)
    slide = open_slide(path, mpp=mpp, force_mpp=force_mpp)
    try:
        check_memory(slide, cfg)
        stage("tissue")
        overview = read_overview(slide, cfg.tissue.mask_mpp)
        mask, artefacts = _tissue_and_artefacts(slide, overview, cfg)
        usable = TissueMask(mask.mask & ~artefacts.any, mask.downsample, mask.mpp)
        laid = tile_grid(slide, usable, cfg.tiling)
        white, black = cell_intensity_flags(laid, overview, usable, cfg.qc)
        grid, blank = laid.subset(~(white | black)), laid.subset(white | black)
        timings["tissue_and_grid_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        stage("inference")
        stain = grid_stain(slide, grid, overview.glass) if classifier.stain_normalisation else None
        classifier = classifier.for_slide(stain)
        slide_dir.mkdir(parents=True, exist_ok=True)
        if len(grid):
            predictions = predict(
                slide, grid, classifier, batch_size=cfg.inference.batch_size,
                num_workers=cfg.inference.num_workers, device=cfg.inference.device,
                autocast=cfg.inference.autocast, compile=cfg.inference.compile, decode=cfg.inference.decode,
                store=slide_dir / "tiles.zarr", timings=timings,
                progress=(lambda done, total: progress(slide_id, done, total)) if progress else None)
        else:
            predictions = TilePredictions(np.zeros((0, len(CLASSES)), np.float32), CLASSES)
        timings["inference_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        stage("export")
        areas = slide_areas(grid, predictions)
        cells, cell_probs = _area_cells(grid, predictions)  # what the areas count: cells or sub-cells
        labels = np.argmax(cell_probs, axis=1)
        excluded = TissueMask(mask.mask & ~usable.mask, mask.downsample, mask.mpp)
        thumb_ds = max(1.0, max(slide.dimensions_px) / THUMBNAIL_MAX_PX)
        thumbnail = _thumbnail(slide, overview, thumb_ds)
        artefact_layer = {QUPATH_NAMES[ARTEFACT]: (mask_on_thumbnail(excluded, thumbnail.shape[:2], thumb_ds),
                                                   COLORS_RGB[ARTEFACT])}
        viable = predictions.class_names.index("viable_tumor")
        offset = slide.bounds_offset_l0
        with ThreadPoolExecutor(2) as threads:  # PNGs compress without the GIL while the GeoJSON is written
            pngs = {"overlay.png": threads.submit(overlay_png, thumbnail, thumb_ds, cells, labels, usable,
                                                  predictions.class_names, artefact_layer),
                    "heatmap_viable_tumor.png": threads.submit(heatmap_png, thumbnail, thumb_ds, grid,
                                                               predictions.probs[:, viable], mask, "Viable tumor")}
            regions = class_regions(cells, labels, usable, predictions.class_names)
            regions[ARTEFACT] = _artefact_region(excluded, usable, blank)
            mean_probability = {
                name: (float(np.average(cell_probs[labels == i, i], weights=cells.tissue_fraction[labels == i]))
                       if (labels == i).any() and cells.tissue_fraction[labels == i].sum() > 0 else None)
                for i, name in enumerate(predictions.class_names)}
            mean_probability[ARTEFACT] = None
            write_overlay(slide_dir / "overlay.geojson",
                          overlay_features(regions, mean_probability, slide.mpp, offset))
            write_tiles(slide_dir / "tiles.geojson.gz", slide_id, grid, predictions.probs, predictions.class_names,
                        offset)
            for name, png in pngs.items():
                write_atomic(slide_dir / name, png.result())
        timings["export_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0

        status = "ok" if len(grid) else "ok_empty"
        artefact_areas = {**artefacts.areas_mm2, "blank_tiles": float(blank.tissue_area_mm2)}
        artefact_areas["any"] = artefacts.area_mm2 + artefact_areas["blank_tiles"]
        record = _slide_record(slide_id, Path(path), status, None, classifier, cfg, source)
        record.update({
            "backend": slide.backend,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "objective_power": slide.objective_power,
            "dimensions_px": list(slide.dimensions_px),
            "bounds_offset_l0": list(offset),
            **_area_fields(areas),
            "n_tiles": len(grid),
            "grid": {"read_mpp": grid.read_mpp, "tile_px": grid.tile_px, "stride_px": grid.stride_px,
                     "read_level": grid.read_level, "cell_area_mm2": grid.cell_area_mm2,
                     "refine": "none" if grid.subcell_fraction is None else "dense", "subcells": grid.subcells},
            "tissue_mask_area_mm2": mask.area_mm2,
            "stain_normalisation": stain.record() if stain else None,
            "artefacts": {"areas_mm2": artefact_areas, "excluded_tiles": {
                "near_white": int(white.sum()), "near_black": int(black.sum())}},
            "timing": {k: round(v, 3) for k, v in timings.items()},
            "outputs": {name: name for name in ("overlay.geojson", "tiles.geojson.gz", "tiles.zarr",
                                                "overlay.png", "heatmap_viable_tumor.png")
                        if (slide_dir / name).exists()},
        })
        # QC judges the tissue found (artefacts included), so excluded fractions are of all tissue
        record["qc"] = slide_qc({**record, "status": "ok", "tissue_area_mm2": mask.area_mm2}, artefact_areas, cfg.qc)
    finally:
        slide.close()
    write_json_atomic(slide_dir / "slide.json", record)
    return record


def _tissue_and_artefacts(slide: Slide, overview: Overview, cfg: Config) -> tuple[TissueMask, ArtefactMask]:
    """The tissue mask and its artefact layers; the focus measure's reading starts on the tissue's
    possible extent (:func:`~wsi_response.tissue.possible_tissue`) while the mask is finished."""
    stained = stained_px(overview.image, cfg.tissue, overview.glass)
    possible = possible_tissue(stained, overview.mpp, cfg.tissue)
    focus = FocusJob(slide, TissueMask(possible, overview.downsample, overview.mpp), cfg.qc.focus_mpp,
                     cfg.inference.num_workers)
    try:
        mask = detect_tissue(slide, cfg.tissue, overview, stained, possible)
        del stained, possible
        return mask, detect_artefacts(slide, mask, cfg.qc, overview, focus=focus)
    finally:
        focus.close()


def _artefact_region(excluded: TissueMask, usable: TissueMask, blank: TileGrid) -> Any:
    """Excluded tissue in level-0 px: the ``excluded`` (artefact) mask pixels plus blank
    (near-white/black) cells clipped to ``usable`` tissue."""
    import shapely

    from .regions import class_regions, tissue_polygons

    region = tissue_polygons(excluded)
    if len(blank):
        cells = class_regions(blank, np.zeros(len(blank), np.int64), usable, (ARTEFACT,))[ARTEFACT]
        region = shapely.union(region, cells)
    return region


def _thumbnail(slide: Slide, overview: Overview, downsample: float) -> np.ndarray:
    """The slide at ``downsample`` (>= 1) level-0 px per px. Box-filtered from ``overview`` when
    that is finer and was read from the pyramid level a read at this scale would decode (no second
    decode; the same pixels where the overview is that level); else read from a coarser level."""
    mpp = slide.mpp * downsample
    if overview.downsample <= downsample and slide.level_for_mpp(mpp) == slide.level_for_mpp(overview.mpp):
        return box_thumbnail(overview, slide.dimensions_px, downsample)
    return read_overview(slide, mpp).image


def _area_fields(areas: SlideAreas) -> dict[str, Any]:
    fields = areas.to_dict()
    return {k: fields[k] for k in ("tissue_area_mm2", "areas_mm2", "tumor_bed_area_mm2", "viable_percent",
                                   "necrosis_percent", "fibrosis_percent")}


def _slide_record(slide_id: str, path: Path, status: str, error: str | None, classifier: Any,
                  cfg: Config, source: dict[str, int] | None) -> dict[str, Any]:
    return {
        "slide_id": slide_id,
        "path": str(path),
        "source": source,
        "status": status,
        "error": error,
        "software": {"version": __version__},
        "model": classifier.describe(),
        "config": config_to_dict(cfg),
        "config_sha256": config_sha256(cfg),
        "qc": slide_qc({"status": status, "error": error}, {}, cfg.qc) if status == "failed" else None,
    }


def record_failure(path: str | Path, slide_id: str, slide_dir: Path, classifier: Any, cfg: Config,
                   error: BaseException) -> dict[str, Any]:
    """Write and return the ``slide.json`` of a slide that failed, with the one-line error."""
    message = str(error) if isinstance(error, WsiResponseError) else f"{Path(path)}: {type(error).__name__}: {error}"
    record = _slide_record(slide_id, Path(path), "failed", " ".join(message.split()), classifier, cfg,
                           source_fingerprint(path))
    record["traceback"] = None if isinstance(error, WsiResponseError) else "".join(
        traceback.format_exception(type(error), error, error.__traceback__))
    write_json_atomic(slide_dir / "slide.json", record)
    return record


def aggregate_specimen(specimen_dir: Path, specimen_id: str, *,
                       slide_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """(Re)build ``specimen.json`` and ``report.html`` from the per-slide outputs in ``specimen_dir``.

    ``slide_ids`` limits (and orders) the slides; by default every ``slides/*/slide.json``.
    The specimen numbers use the tile stores, so they equal those of a single local run; a slide
    whose store is damaged counts as failed, with the store's one-line error. Holds the locks of
    the specimen folder and of the slide folders it reads (every one by default) while it works;
    raises :class:`~wsi_response.locks.FolderBusyError` when another process holds one.
    """
    slides_dir = specimen_dir / "slides"
    folders = slide_ids
    if slide_ids is None:   # names checked before any lock file is written into a folder
        slide_ids = sorted(check_slide_id(p.parent.name, str(slides_dir)) for p in slides_dir.glob("*/slide.json"))
        folders = sorted(p.name for p in slides_dir.glob("*") if p.is_dir() and not p.is_symlink())
    with specimen_locks(specimen_dir, folders, brief=True):
        return _aggregate_locked(specimen_dir, specimen_id, slide_ids)


def _aggregate_locked(specimen_dir: Path, specimen_id: str, slide_ids: Sequence[str]) -> dict[str, Any]:
    slides_dir = specimen_dir / "slides"
    records = [_slide_json(slides_dir / sid) for sid in slide_ids]
    tile_areas = []
    for i, r in enumerate(records):
        if r["status"] in ("ok", "ok_empty"):
            try:
                tile_areas.append(_stored_areas(slides_dir / r["slide_id"], r))
            except TileStoreError as exc:  # not done either for run and batch (damaged_store): they redo it
                records[i] = _store_failed(r, exc)
    usable = [r for r in records if r["status"] in ("ok", "ok_empty")]
    model = next((r["model"] for r in records), {})
    specimen = specimen_areas(tile_areas, validation_error=model.get("validation_error"))
    failed = [r for r in records if r["status"] == "failed"]
    status = "failed" if not usable else ("partial" if failed else "ok")
    qc_cfg = QcConfig(**records[0]["config"]["qc"]) if records and "qc" in records[0].get("config", {}) else QcConfig()
    qc = specimen_qc(records, specimen.to_dict(), model, qc_cfg)
    for what, values in (("models", {r["model"].get("sha256") for r in records}),
                         ("configurations", {r["config_sha256"] for r in records})):
        if len(values) > 1:  # a specimen scored with mixed settings is not one measurement
            qc["flags"].append({"code": f"mixed_{what}", "severity": "fail", "value": float(len(values)),
                                "message": f"slides were scored with {len(values)} different {what}"})
            qc.update(verdict="not_reportable", reportable=False)
    result = {
        "specimen_id": specimen_id,
        "status": status,
        "schema_version": SCHEMA_VERSION,
        "software": {"version": __version__},
        "model": model,
        "config": records[0]["config"] if records else None,
        "classes": list(CLASSES),
        **{k: v for k, v in specimen.to_dict().items()},
        "qc": qc,
        "slides": [_specimen_slide_entry(r) for r in records],
    }
    write_json_atomic(specimen_dir / "specimen.json", result)
    images = {r["slide_id"]: {name: (slides_dir / r["slide_id"] / name).read_bytes()
                              for name in ("overlay.png", "heatmap_viable_tumor.png")
                              if (slides_dir / r["slide_id"] / name).exists()}
              for r in usable}
    write_atomic(specimen_dir / "report.html", render_report(result, images).encode("utf-8"))
    return result


def _slide_json(slide_dir: Path) -> dict[str, Any]:
    """The ``slide.json`` in ``slide_dir``; its ``slide_id`` must be the folder's name (the outputs are found by it)."""
    path = slide_dir / "slide.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:   # ValueError: not JSON, or not UTF-8
        raise OutputError(path, f"unreadable slide record ({type(exc).__name__}); run the slide again") from None
    foreign = OutputError(path, "not a slide record of wsi-response (no status ok, ok_empty or failed); "
                                "run the slide again")
    if not isinstance(record, dict):
        raise foreign
    if record.get("slide_id") != slide_dir.name:
        raise ConfigError(f"{slide_dir / 'slide.json'}: slide_id {record.get('slide_id')!r} is not the name of its "
                          f"folder {slide_dir.name!r} (moved or renamed by hand?); run the slide again")
    if record.get("status") not in ("ok", "ok_empty", "failed"):
        raise foreign
    return record


_SLIDE_ENTRY_KEYS = ("slide_id", "path", "status", "error", "backend", "mpp", "mpp_source", "dimensions_px",
                     "tissue_area_mm2", "areas_mm2", "tumor_bed_area_mm2", "viable_percent", "qc", "outputs")


def _specimen_slide_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: record.get(k) for k in _SLIDE_ENTRY_KEYS}
    entry["outputs"] = {k: f"slides/{record['slide_id']}/{v}" for k, v in (record.get("outputs") or {}).items()}
    return entry


def _store_failed(record: Mapping[str, Any], error: TileStoreError) -> dict[str, Any]:
    """``record`` of a done slide whose tile store is damaged, as a failed slide."""
    qc_cfg = QcConfig(**record["config"]["qc"]) if "qc" in (record.get("config") or {}) else QcConfig()
    return {**record, "status": "failed", "error": str(error),
            "qc": slide_qc({"status": "failed", "error": str(error)}, {}, qc_cfg)}


def _stored_areas(slide_dir: Path, record: Mapping[str, Any]) -> SlideAreas:
    """Slide areas from the tile store (probabilities and tissue fractions as written)."""
    cell_area = float(record["grid"]["cell_area_mm2"]) if record.get("grid") else 0.0
    if not record.get("n_tiles"):
        return slide_areas_from_tiles(np.zeros((0, len(CLASSES)), np.float32), CLASSES, np.zeros(0, np.float32),
                                      cell_area)
    stored = read_tile_store(slide_dir / "tiles.zarr")
    return slide_areas_from_tiles(stored.predictions.probs, stored.predictions.class_names, stored.tissue_fraction,
                                  cell_area, stored.predictions.subcell_probs, stored.subcell_tissue_fraction,
                                  cols_rows=stored.cols_rows)


def _area_cells(grid: TileGrid, predictions: TilePredictions) -> tuple[TileGrid, np.ndarray]:
    """The cells the areas count and their probabilities (M, C): the grid's cells, or with
    sub-cells the sub-cell grid (row ``t * k² + s`` is sub-cell ``s`` of tile ``t``)."""
    if grid.subcell_fraction is None or predictions.subcell_probs is None:
        return grid, predictions.probs
    return grid.subcell_grid(), predictions.subcell_probs.reshape(-1, predictions.subcell_probs.shape[2])


def run_specimen(paths: Sequence[str | Path], specimen_id: str, out_dir: Path, classifier: Any, cfg: Config, *,
                 mpp: float | None = None, force_mpp: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Score every slide of one specimen and aggregate; a failing slide is recorded and skipped.

    ``mpp`` / ``force_mpp``: as :func:`~wsi_response.slide.open_slide`; a value that is implausible,
    disagrees with a slide's own MPP (not forced) or makes a slide need too much memory is a
    :class:`ConfigError` before anything is computed or written. Before anything is written, the
    ids are checked (:mod:`~wsi_response.ids`), a file listed twice (by any spelling or link) is a
    :class:`ConfigError`, and every folder to be written must resolve inside ``out_dir``. Slides
    already done (a current ``ok``/``ok_empty`` ``slide.json`` measured at the MPP this run would
    use, an intact tile store) are kept, not redone. Holds the locks of the specimen folder and of
    its slides' folders throughout; raises :class:`~wsi_response.locks.FolderBusyError` at once
    when another process holds one.
    """
    check_specimen_id(specimen_id, "specimen_id")
    twice = same_file_pairs(paths)
    if twice:
        raise ConfigError("the same slide file is listed twice: " + "; ".join(
            f"slide {i + 1} ({str(paths[i])!r}) is slide {j + 1} ({str(paths[j])!r})" for i, j in twice))
    check_mpp_argument(paths, mpp, cfg, force=force_mpp)
    specimen_dir = Path(out_dir) / specimen_id
    ids = unique_slide_ids(paths)
    check_inside(out_dir, specimen_dir, *(specimen_dir / "slides" / sid for sid in ids))
    check_writable(specimen_dir)
    with specimen_locks(specimen_dir, ids):
        return _run_locked(paths, ids, specimen_id, out_dir, classifier, cfg, mpp=mpp, force_mpp=force_mpp,
                           quiet=quiet)


def _run_locked(paths: Sequence[str | Path], ids: Sequence[str], specimen_id: str, out_dir: Path, classifier: Any,
                cfg: Config, *, mpp: float | None = None, force_mpp: bool = False,
                quiet: bool = False) -> dict[str, Any]:
    specimen_dir = Path(out_dir) / specimen_id
    cfg_sha = config_sha256(cfg)
    progress = None if quiet else _stderr_progress(len(paths))
    for index, (path, slide_id) in enumerate(zip(paths, ids)):
        slide_dir = specimen_dir / "slides" / slide_id
        if progress:
            progress.start_slide(index, slide_id)
        record = current_slide_record(slide_dir, Path(path), classifier.sha256, cfg_sha)
        if _finished(record, mpp, force_mpp) and not _report_damage(damaged_store(slide_dir, record)):
            continue
        try:
            process_slide(path, slide_id, slide_dir, classifier, cfg, mpp=mpp, force_mpp=force_mpp,
                          progress=progress.tiles if progress else None)
        except ConfigError:  # about the arguments, not the slide: stop, record nothing
            raise
        except Exception as exc:  # a bad slide is recorded and skipped; the environment stops the run
            raise_if_environment(exc, specimen_dir)
            record = record_failure(path, slide_id, slide_dir, classifier, cfg, exc)
            print(f"wsi-response: slide failed: {record['error']}", file=sys.stderr)
    if progress:
        progress.done()
    return aggregate_specimen(specimen_dir, specimen_id, slide_ids=ids)


def _report_damage(problem: str | None) -> str | None:
    if problem:
        print(f"wsi-response: {problem}", file=sys.stderr)
    return problem


def _finished(record: Mapping[str, Any] | None, mpp: float | None, force_mpp: bool) -> bool:
    """Whether ``record`` is a done slide measured at the MPP this run uses: the same override where
    it had one (``--mpp`` for a slide without MPP, or forced), else its own (unless now forced)."""
    if record is None or record["status"] not in ("ok", "ok_empty"):
        return False
    if record.get("mpp_source") == "override":
        return mpp is not None and record.get("mpp") == mpp
    return not force_mpp


class _stderr_progress:
    """Slides-per-specimen and tiles-per-slide progress on stderr (tqdm)."""

    def __init__(self, n_slides: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.slides = tqdm(total=n_slides, desc="slides", unit="slide", file=sys.stderr, position=0)
        self.bar: Any = None
        self.shown = -np.inf  # time.monotonic() of the last refresh

    def start_slide(self, index: int, slide_id: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.slides.update(1)
        self.bar = self._tqdm(total=0, desc=slide_id, unit="tile", file=sys.stderr, position=1, leave=False)

    def tiles(self, slide_id: str, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        now = time.monotonic()
        if done == total or now - self.shown >= REFRESH_S:  # a GPU finishes hundreds of chunks a second
            self.bar.refresh()
            self.shown = now

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.slides.update(1)
        self.slides.close()
