"""The bad-input corpus, generated here: every kind of broken or unusual slide gets one exact outcome.

A file that cannot be measured fails with one line naming the file and the problem (``info`` and
``run`` exit 1; ``batch`` records it and the other slides complete); a slide without tissue is
``ok_empty``; RGBA is composited on white; 16-bit samples and levels that cannot be decoded in
bounded memory are refused at open time; an unwritable output folder fails before any compute.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from _batch_data import cli as cli_subprocess
from wsi_response import cli, slide as slide_module, tissue
from wsi_response.slide import open_slide

RUN = ["--device", "cpu", "--quiet", "inference.num_workers=0"]
ONE_UM = {"resolution": (1e4, 1e4), "resolutionunit": "CENTIMETER"}  # TIFF resolution tags: 1 µm/px
HUGE_PX = (30_000, 20_000)  # one uncompressed strip of 1.8 GB, written sparse (a few kB on disk)


@dataclass(frozen=True)
class Corpus:
    folder: Path
    good: Path                   # a synthetic SVS under a path with spaces and non-ASCII characters
    failing: dict[Path, str]     # slide -> the exact problem after "<path>: " (a prefix where a library adds detail)
    white: Path                  # all glass
    rgba: Path                   # tissue on a transparent background, one half-transparent square


def _corrupt_a_tile(source: Path, target: Path) -> str:
    """Copy ``source`` with random bytes inside its largest level-0 tile; returns the expected problem."""
    shutil.copyfile(source, target)
    with tifffile.TiffFile(source) as tif:
        page = tif.series[0].levels[0].pages[0]
        index = int(np.argmax(page.databytecounts))
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        across = -(-page.imagewidth // page.tilewidth)
        col, row, tw, th = index % across, index // across, page.tilewidth, page.tilelength
    with target.open("r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(np.random.default_rng(0).integers(0, 256, count // 3, dtype=np.uint8).tobytes())
    return f"corrupt image data in level 0, tile column {col}, row {row} (level px {col * tw}, {row * th}): "


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    from wsi_response.synth import synth_slide

    folder = tmp_path_factory.mktemp("bad inputs") / "slides ü, déjà vu"
    good = synth_slide(folder / "good slide é.svs", size_px=(512, 512), mpp=1.0, seed=2).slide_path
    data = good.read_bytes()
    failing: dict[Path, str] = {}

    def add(name: str, problem: str) -> Path:
        path = folder / name
        failing[path] = problem
        return path

    add("empty.svs", "empty file (0 bytes)").write_bytes(b"")
    for fraction in (0.05, 0.5, 0.95):
        add(f"cut at {fraction}.svs", "truncated: image data runs to byte ").write_bytes(
            data[: int(len(data) * fraction)])
    add("notes.svs", "a text file, not a slide image").write_text("patient,block\n17,A3\n" * 30)
    tifffile.imwrite(add("no mpp.tif", "no microns-per-pixel in the file (no vendor MPP, no TIFF resolution tags); "
                                       "pass --mpp UM"),
                     np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    tifffile.imwrite(add("huge strip.tif", f"level 0 is stored in strips of {HUGE_PX[0]} x {HUGE_PX[1]} px that need "
                                           "about 1.8 GB each to decode (limit 1.0 GB, "
                                           "wsi_response.slide.MAX_DECODE_BYTES); convert it to a tiled pyramid "
                                           "(e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`)"),
                     shape=(HUGE_PX[1], HUGE_PX[0], 3), dtype=np.uint8, photometric="rgb", rowsperstrip=HUGE_PX[1],
                     **ONE_UM)
    tissue_rgb = np.full((512, 512, 3), 245, np.uint8)
    tissue_rgb[96:416, 96:416] = (170, 70, 150)
    tifffile.imwrite(add("sixteen bit.tif", "level 0 has 16-bit samples (uint16); wsi-response reads 8-bit RGB "
                                            "brightfield slides: convert it to 8-bit RGB first"),
                     tissue_rgb.astype(np.uint16) * 257, tile=(256, 256), photometric="rgb", **ONE_UM)
    corrupt = folder / "corrupt tile.svs"
    failing[corrupt] = _corrupt_a_tile(good, corrupt)

    white = folder / "white.tif"
    tifffile.imwrite(white, np.full((512, 512, 3), 255, np.uint8), tile=(256, 256), photometric="rgb", **ONE_UM)
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., :3] = (170, 70, 150)
    rgba[96:416, 96:416, 3] = 255
    rgba[16:48, 16:48, 3] = 128
    tifffile.imwrite(folder / "rgba.tif", rgba, tile=(256, 256), photometric="rgb", extrasamples=["unassalpha"],
                     **ONE_UM)
    return Corpus(folder, good, failing, white, folder / "rgba.tif")


# --------------------------------------------------------------------------- each case on its own


def test_info_refuses_each_unreadable_file_in_one_line(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    for path, problem in corpus.failing.items():
        if path.name == "corrupt tile.svs":  # its structure is fine: it fails when the tile is decoded
            continue
        assert cli.main(["info", str(path)]) == 1, path
        captured = capsys.readouterr()
        [line] = captured.err.splitlines()
        assert line.startswith(f"wsi-response: error: {path}: {problem}"), line
        assert captured.out == ""
    for path in (corpus.good, corpus.white, corpus.rgba, next(p for p in corpus.failing if p.name == "corrupt tile.svs")):
        assert cli.main(["info", str(path), "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["path"] == str(path)


def test_rgba_is_composited_on_white(corpus: Corpus) -> None:
    for backend in ("openslide", "tiffslide"):
        pixels = open_slide(corpus.rgba, backend=backend).read_level(0, (0, 0), (512, 512))
        assert pixels[0, 0].tolist() == [255, 255, 255]              # transparent: glass
        assert pixels[200, 200].tolist() == [170, 70, 150]           # opaque: the colour
        assert pixels[30, 30].tolist() == [(c * 128 + 255 * 127 + 127) // 255 for c in (170, 70, 150)], backend


def test_corrupt_tile_is_named_on_every_read_path(corpus: Corpus) -> None:
    """OpenSlide, tiffslide and the direct JPEG reader all name the tile; the slide stays readable after."""
    from wsi_response.errors import SlideReadError
    from wsi_response.jpegtiles import open_jpeg_tile_reader

    corrupt = next(p for p in corpus.failing if p.name == "corrupt tile.svs")
    prefix = f"{corrupt}: {corpus.failing[corrupt]}"
    for backend in ("openslide", "tiffslide"):
        slide = open_slide(corrupt, backend=backend)
        with pytest.raises(SlideReadError) as err:
            slide.read_level(0, (0, 0), (512, 512))
        assert str(err.value).startswith(prefix), (backend, str(err.value))
        good_tile = next((x, y) for x in (0, 256) for y in (0, 256) if f"level px {x}, {y})" not in prefix)
        assert slide.read_level(0, good_tile, (256, 256)).shape == (256, 256, 3)  # a fresh handle, not the dead one
    fast = open_jpeg_tile_reader(corrupt, open_slide(corrupt).levels)
    assert fast is not None
    for reduce in (1, 2):
        with pytest.raises(SlideReadError) as err:
            fast.read_level(0, (0, 0), (512 // reduce, 512 // reduce), reduce=reduce)
        assert str(err.value).startswith(prefix), (reduce, str(err.value))


def test_decode_limit_and_bounded_overview_strips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-level stripped TIFF is read in strips of about READ_BUDGET_BYTES; the decode limit is a setting."""
    path = tmp_path / "stripped.tif"
    image = np.random.default_rng(1).integers(0, 256, (1536, 2048, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=64, **ONE_UM)
    slide = open_slide(path)
    assert len(slide.levels) == 1
    reference = tissue.read_overview(slide, 4.0).image
    reads: list[int] = []
    read = slide._handle.read

    def spy(level: int, origin: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        reads.append(size[0] * size[1] * 3)
        return read(level, origin, size)

    monkeypatch.setattr(tissue, "READ_BUDGET_BYTES", 2048 * 3 * 40)
    monkeypatch.setattr(slide._handle, "read", spy)
    assert np.array_equal(tissue.read_overview(slide, 4.0).image, reference)
    assert len(reads) == 39 and max(reads) <= 2048 * 3 * 40  # 384 overview rows, 10 (40 level rows) per read

    monkeypatch.setattr(slide_module, "MAX_DECODE_BYTES", 100_000)
    with pytest.raises(slide_module.SlideFormatError, match=r"strips of 2048 x 64 px that need about 0\.0 GB"):
        open_slide(path)


def test_run_fails_the_corrupt_slide_and_measures_the_others(corpus: Corpus, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Corrupt tile: the slide fails naming file, level and tile; all glass: ok_empty; RGBA: measured."""
    corrupt = next(p for p in corpus.failing if p.name == "corrupt tile.svs")
    code = cli.main(["run", str(corrupt), str(corpus.white), str(corpus.rgba), "--specimen", "RUN",
                     "--out", str(tmp_path), *RUN])
    assert code == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "slide failed" in ln]
    assert line.startswith(f"wsi-response: slide failed: {corrupt}: {corpus.failing[corrupt]}"), line
    specimen = json.loads((tmp_path / "RUN" / "specimen.json").read_text(encoding="utf-8"))
    assert {s["slide_id"]: s["status"] for s in specimen["slides"]} == {
        "corrupt tile": "failed", "white": "ok_empty", "rgba": "ok"}
    white = next(s for s in specimen["slides"] if s["slide_id"] == "white")
    assert white["tissue_area_mm2"] == 0 and white["viable_percent"] is None and white["error"] is None
    assert specimen["status"] == "partial" and specimen["tissue_area_mm2"] > 0


def test_unwritable_output_fails_before_any_compute(corpus: Corpus, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    missing = tmp_path / "never read.svs"   # were any slide opened, "no such file" would be reported
    assert cli.main(["run", str(corpus.good), str(missing), "--specimen", "X", "--out", str(blocker / "out"),
                     *RUN]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wsi-response: error: {blocker / 'out' / 'X'}: output folder is not writable"), line


# --------------------------------------------------------------------------- all of them in one batch


@pytest.mark.slow
def test_batch_over_the_corpus_completes_every_usable_slide(corpus: Corpus, tmp_path: Path) -> None:
    rows = [*corpus.failing, corpus.good, corpus.white, corpus.rgba]
    manifest = corpus.folder / "manifest.csv"
    manifest.write_text("specimen_id,slide_path\n" + "".join(f'MIXED,"{p.name}"\n' for p in rows), encoding="utf-8")
    out = tmp_path / "batch out"
    proc = cli_subprocess("batch", manifest, "--out", out, *RUN)
    assert proc.returncode == 1, proc.stderr

    summary = json.loads((out / "batch-summary.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"failed": len(corpus.failing), "ok": 2, "ok_empty": 1}
    errors = {Path(s["path"]): s["error"] for s in summary["failed"]}
    assert errors.keys() == corpus.failing.keys()
    for path, problem in corpus.failing.items():
        assert errors[path].startswith(f"{path}: {problem}") and "\n" not in errors[path], errors[path]
        assert f"FAILED: {errors[path]}" in proc.stderr
    specimen = json.loads((out / "MIXED" / "specimen.json").read_text(encoding="utf-8"))
    statuses = {s["slide_id"]: s["status"] for s in specimen["slides"]}
    assert {k: v for k, v in statuses.items() if v != "failed"} == {"good slide é": "ok", "white": "ok_empty",
                                                                     "rgba": "ok"}
    assert specimen["status"] == "partial" and specimen["tumor_bed_area_mm2"] > 0
    good = out / "MIXED" / "slides" / "good slide é"
    assert {p.name for p in good.iterdir()} >= {"slide.json", "overlay.geojson", "tiles.geojson.gz", "tiles.zarr"}


def test_corrupt_tile_error_crosses_worker_processes_intact(corpus: Corpus) -> None:
    """A read error in a tile-reading worker reaches the caller as the same one-line SlideReadError."""
    from wsi_response.classifier import default_model_path, load_classifier
    from wsi_response.config import TilingConfig
    from wsi_response.errors import SlideReadError
    from wsi_response.inference import predict
    from wsi_response.tiling import TileGrid

    corrupt = next(p for p in corpus.failing if p.name == "corrupt tile.svs")
    slide = open_slide(corrupt)
    cfg = TilingConfig()
    cells = int(np.ceil(max(slide.dimensions_px) * slide.mpp / cfg.target_mpp / cfg.stride_px))
    cols_rows = np.array([(c, r) for r in range(cells) for c in range(cells)], np.int32)
    grid = TileGrid(cols_rows=cols_rows, tissue_fraction=np.ones(len(cols_rows), np.float32),
                    chunk_starts=np.arange(len(cols_rows) + 1, dtype=np.int64), tile_px=cfg.tile_px,
                    stride_px=cfg.stride_px, read_mpp=cfg.target_mpp, slide_mpp=slide.mpp,
                    read_level=slide.level_for_mpp(cfg.target_mpp),
                    level_downsample=slide.levels[slide.level_for_mpp(cfg.target_mpp)].downsample, chunk_cells=1)
    with pytest.raises(SlideReadError) as err:
        predict(slide, grid, load_classifier(default_model_path()), num_workers=2, device="cpu")
    assert str(err.value).startswith(f"{corrupt}: {corpus.failing[corrupt]}")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
