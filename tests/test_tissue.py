"""Tissue detection on the real CMU slide and on synthetic slides with exact ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_response.config import TissueConfig
from wsi_response.slide import open_slide
from wsi_response.synth import read_labels
from wsi_response.tissue import detect_tissue, read_overview


def test_cmu_tissue_fraction_is_plausible(cmu_slide_path):
    slide = open_slide(cmu_slide_path)
    mask = detect_tissue(slide)
    # skin section on white glass: about a third of the field
    assert 0.25 <= mask.fraction <= 0.40
    assert mask.mpp == pytest.approx(TissueConfig().mask_mpp)
    assert mask.area_mm2 == pytest.approx(mask.mask.sum() * (mask.mpp / 1000) ** 2)
    # the glass corners are not tissue
    h, w = mask.mask.shape
    assert not mask.mask[: h // 10, : w // 10].any()


def test_synthetic_tissue_area_within_two_percent(synth_specimen_small):
    for truth in synth_specimen_small.slides:
        mask = detect_tissue(open_slide(truth.slide_path))
        assert mask.area_mm2 == pytest.approx(truth.tissue_area_mm2, rel=0.02)


def test_synthetic_mask_overlaps_truth(synth_specimen_small):
    truth = synth_specimen_small.slides[0]
    slide = open_slide(truth.slide_path)
    mask = detect_tissue(slide)
    labels = read_labels(truth)
    # bring the truth raster onto the mask grid by nearest sampling of pixel centres
    ys = ((np.arange(mask.mask.shape[0]) + 0.5) * mask.downsample / truth.label_downsample).astype(int)
    xs = ((np.arange(mask.mask.shape[1]) + 0.5) * mask.downsample / truth.label_downsample).astype(int)
    inside = (ys[:, None] < labels.shape[0]) & (xs[None, :] < labels.shape[1])
    true_tissue = np.zeros_like(mask.mask)
    true_tissue[inside] = labels[np.minimum(ys, labels.shape[0] - 1)][:, np.minimum(xs, labels.shape[1] - 1)][inside] > 0
    iou = (mask.mask & true_tissue).sum() / (mask.mask | true_tissue).sum()
    assert iou > 0.95


def test_blank_glass_has_no_tissue(tmp_path):
    import tifffile

    path = tmp_path / "glass.tif"
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 2, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    glass[100:104, 100:104] = 60  # a dust speck
    tifffile.imwrite(path, glass, tile=(256, 256), photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    mask = detect_tissue(open_slide(path))
    assert mask.area_mm2 == 0.0


def test_overview_resolution_and_size(cmu_slide_path):
    slide = open_slide(cmu_slide_path)
    overview = read_overview(slide, 8.0)
    assert overview.downsample == pytest.approx(8.0 / 0.499)
    assert overview.image.shape[:2] == (int(np.ceil(2967 / overview.downsample)), int(np.ceil(2220 / overview.downsample)))
