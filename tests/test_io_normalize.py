"""Normalisation: one range per stack from a sample, no flicker, no division by zero."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_sam2.io import normalize_frame, open_stack, percentile_range


def _drifting_movie(n=60, shape=(128, 128), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 300.0, size=shape)
    # slow brightness drift over time, like bleaching, plus noise
    return np.stack([rng.poisson(base * (1.0 - 0.004 * t) + 100) for t in range(n)]).astype(np.uint16)


def test_sampled_percentiles_match_full_stack():
    movie = _drifting_movie()
    lo, hi = percentile_range(da.from_array(movie, chunks=(1, 128, 128)), max_frames=16,
                              max_samples=40_000)
    full_lo, full_hi = np.percentile(movie, [0.5, 99.5])
    span = full_hi - full_lo
    assert abs(lo - full_lo) < 0.03 * span
    assert abs(hi - full_hi) < 0.05 * span


def test_percentile_range_reads_a_sample_only():
    movie = _drifting_movie(n=40)
    reads = []

    def load(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0])
        return block

    lazy = da.from_array(movie, chunks=(1, 128, 128)).map_blocks(load, dtype=movie.dtype)
    percentile_range(lazy, max_frames=8)
    assert 0 < len(set(reads)) <= 8
    assert 0 in reads and 39 in reads  # evenly spaced, first and last included


def test_frames_share_one_range_no_flicker():
    movie = _drifting_movie(n=10)
    lo, hi = percentile_range(movie)
    frames = [normalize_frame(f, lo, hi) for f in movie]
    assert all(f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1 for f in frames)
    # the same raw value maps to the same normalised value in every frame
    value = float(np.median(movie))
    expected = np.clip((value - lo) / (hi - lo), 0, 1)
    for f, raw in zip(frames, movie):
        where = raw == int(value)
        if where.any():
            np.testing.assert_allclose(f[where], expected, rtol=1e-5)
    # brightness drift survives normalisation (a per-frame range would erase it)
    assert frames[0].mean() > frames[-1].mean()


def test_accepts_stack_and_2d_image():
    movie = _drifting_movie(n=5)
    assert percentile_range(open_stack(movie, axes="TYX")) == percentile_range(movie)
    lo, hi = percentile_range(movie[0], low=1, high=99)
    assert lo < hi


def test_constant_image_does_not_divide_by_zero():
    flat = np.full((3, 16, 16), 500, np.uint16)
    lo, hi = percentile_range(flat)
    assert lo == hi == 500
    out = normalize_frame(flat[0], lo, hi)
    assert out.dtype == np.float32 and np.all(out == 0) and np.isfinite(out).all()


def test_nan_is_a_clear_error_naming_the_frame():
    movie = np.ones((20, 8, 8), np.float32)
    movie[19, 3, 3] = np.nan
    with pytest.raises(ValueError, match="frame 19 contains NaN"):
        percentile_range(movie)
    with pytest.raises(ValueError, match="frame 7 contains NaN"):
        normalize_frame(movie[19], 0.0, 1.0, index=7)


def test_invalid_percentiles():
    with pytest.raises(ValueError, match="low < high"):
        percentile_range(np.zeros((2, 4, 4)), low=90, high=10)
