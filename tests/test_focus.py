"""The focus measure: exact across cell borders, the same in worker processes, and it sees defocus."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from wsi_response.focus import FocusJob, detail_energies
from wsi_response.slide import open_slide
from wsi_response.synth import synth_slide
from wsi_response.tissue import detect_tissue

HALO, K, CELL = 16, 4, 32  # focus px; cells of 32 x 32 focus px = 8 x 8 blocks


def _texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """RGB uint8 stained-looking texture: blobs of several sizes and fine grain."""
    rng = np.random.default_rng(seed)
    grey = sum(ndimage.gaussian_filter(rng.normal(size=shape), s) * s for s in (1.0, 3.0, 8.0))
    grey = 150 + 40 * grey / grey.std()
    return np.clip(np.stack([grey * 0.9, grey * 0.6, grey], axis=-1), 0, 255).astype(np.uint8)


def test_cells_join_without_seams():
    """Energies of cells cut with their halo equal those of one big tile over the same px."""
    n = 4  # cells per side; tiles are square
    rgb = _texture((2 * HALO + n * CELL, 2 * HALO + n * CELL))
    whole_fine, whole_band = detail_energies(rgb[None], K, HALO)
    cells = [rgb[y:y + CELL + 2 * HALO, x:x + CELL + 2 * HALO] for y in range(0, n * CELL, CELL)
             for x in range(0, n * CELL, CELL)]
    fine, band = detail_energies(np.stack(cells), K, HALO)
    s = CELL // K
    tiled_fine = fine.reshape(n, n, s, s).transpose(0, 2, 1, 3).reshape(n * s, n * s)
    tiled_band = band.reshape(n, n, s, s).transpose(0, 2, 1, 3).reshape(n * s, n * s)
    np.testing.assert_allclose(tiled_fine, whole_fine[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(tiled_band, whole_band[0], rtol=1e-4, atol=1e-3)


def test_defocus_lowers_fine_over_coarse_energy():
    rgb = _texture((256 + 2 * HALO, 256 + 2 * HALO), seed=1)
    soft = ndimage.gaussian_filter(rgb.astype(np.float32), (3.0, 3.0, 0)).round().astype(np.uint8)
    ratios = []
    for image in (rgb, soft):
        fine, band = detail_energies(image[None], K, HALO)
        ratios.append(fine.mean() / band.mean())
    assert ratios[1] < ratios[0] / 10, ratios  # sigma 3 px removes the finest detail first


@pytest.fixture(scope="module")
def blurred_slide(tmp_path_factory):
    return synth_slide(tmp_path_factory.mktemp("focus") / "blur.svs", size_px=(4000, 3000), mpp=0.5, seed=1,
                       artefacts=("blur",))


def test_worker_processes_give_the_same_planes(blurred_slide):
    with open_slide(blurred_slide.slide_path) as slide:
        mask = detect_tissue(slide)
        here = FocusJob(slide, mask, 1.0, workers=0).result()
        job = FocusJob(slide, mask, 1.0, workers=2)
        assert job.grid.n_chunks > 1
        there = job.result()
    for a, b in zip(here, there):
        np.testing.assert_array_equal(a, b)
    fine, band = here
    assert (fine[mask.mask] > 0).mean() > 0.99 and (band[mask.mask] > 0).mean() > 0.99  # every tissue px measured


def test_a_worker_error_reaches_the_caller(blurred_slide, tmp_path):
    """A corrupt tile met in a worker process raises the reader's one-line error in the caller."""
    from test_bad_inputs import _corrupt_a_tile

    from wsi_response.errors import SlideReadError

    corrupt = tmp_path / "corrupt.svs"
    problem = _corrupt_a_tile(blurred_slide.slide_path, corrupt)
    with open_slide(corrupt) as slide:
        mask = detect_tissue(slide)
        with pytest.raises(SlideReadError) as err:
            FocusJob(slide, mask, 1.0, workers=2).result()
    assert str(err.value).startswith(f"{corrupt}: {problem}"), str(err.value)


def test_a_job_started_on_part_of_the_tissue_covers_all_of_it(blurred_slide):
    """The pipeline starts the focus job on the tissue's possible extent before the mask is
    finished; asked for the final mask, a job reads the cells it lacks: its planes on that tissue,
    and the artefact layers, equal those of a job started on the final mask."""
    from wsi_response.artefacts import KINDS, detect_artefacts
    from wsi_response.config import QcConfig, TissueConfig
    from wsi_response.tissue import TissueMask, possible_tissue, read_overview, stained_px

    tissue_cfg, qc = TissueConfig(), QcConfig()
    with open_slide(blurred_slide.slide_path) as slide:
        overview = read_overview(slide, tissue_cfg.mask_mpp)
        mask = detect_tissue(slide, tissue_cfg, overview)
        whole = FocusJob(slide, mask, qc.focus_mpp).result()
        left = mask.mask.copy()
        left[:, left.shape[1] // 2:] = False
        part = FocusJob(slide, TissueMask(left, mask.downsample, mask.mpp), qc.focus_mpp, workers=2)
        assert 0 < len(part.grid) < len(FocusJob(slide, mask, qc.focus_mpp).grid)
        covered = part.result(mask)
        for a, b in zip(whole, covered):
            np.testing.assert_array_equal(a[mask.mask], b[mask.mask])

        possible = possible_tissue(stained_px(overview.image, tissue_cfg, overview.glass), overview.mpp, tissue_cfg)
        early = FocusJob(slide, TissueMask(possible, mask.downsample, mask.mpp), qc.focus_mpp, workers=2)
        found = detect_artefacts(slide, mask, qc, overview, focus=early)
        at_once = detect_artefacts(slide, mask, qc, overview, workers=0)
    assert found.layers["blur"].any()
    for kind in KINDS:
        np.testing.assert_array_equal(found.layers[kind], at_once.layers[kind])
