"""Fine-tuning data: every spec form opens from real files, clips are what inference would see, the same
seed gives the same clip, augmentations move images and masks together, bad input fails up front."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_sam2.io import ZarrLabelsWriter, percentile_range
from napari_sam2.predictor.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input, to_unit_rgb
from napari_sam2.synthetic import make_timelapse, write_ctc_ground_truth, write_ctc_images
from napari_sam2.train.data import (
    Augment,
    ClipSampler,
    ClipTransform,
    Sequence,
    TrainingDataError,
    clip_from_frames,
    make_clip,
    open_training_data,
)

S = 32  # network input size: small keeps every clip cheap


@pytest.fixture(scope="module")
def movie():
    return make_timelapse(n_frames=10, shape=(48, 64), n_cells=3, seed=1)


@pytest.fixture(scope="module")
def ctc(movie, tmp_path_factory):
    """A CTC dataset: 01 with TRA + SEG ground truth, 02 without (a test sequence: skipped)."""
    root = tmp_path_factory.mktemp("ctc") / "Fluo-N2DH-SYN"
    write_ctc_images(movie, root / "01")
    write_ctc_ground_truth(movie, root / "01_GT")
    write_ctc_images(movie, root / "02")
    return root


def _gt_copy(movie, dest, seg_frames=None, seg_ids=None, tra=True):
    """A CTC sequence whose SEG covers only ``seg_frames`` (with relabelled ids, as in real CTC data)."""
    write_ctc_images(movie, dest / "01")
    write_ctc_ground_truth(movie, dest / "01_GT")
    seg = dest / "01_GT" / "SEG"
    for p in seg.iterdir():
        t = int(p.stem[-3:])
        if seg_frames is not None and t not in seg_frames:
            p.unlink()
        elif seg_ids is not None:
            frame = tifffile.imread(p)
            tifffile.imwrite(p, np.where(frame > 0, seg_ids[frame], 0).astype(np.uint16))
    if not tra:
        for p in (dest / "01_GT" / "TRA").iterdir():
            p.unlink()
        (dest / "01_GT" / "TRA").rmdir()
    return dest / "01"


def _inference_input(seq, t):
    """3 x S x S: frame t exactly as the predictor prepares it."""
    return to_model_input(to_unit_rgb(np.asarray(seq.images[t]), intensity_range=seq.intensity_range), S)[0]


# ------------------------------------------------------------------------------------ spec forms
def test_ctc_dataset_folder(ctc, movie):
    (seq,) = open_training_data(ctc)  # 02 has no 02_GT: not training data
    assert seq.name == "Fluo-N2DH-SYN/01" and seq.num_frames == movie.n_frames
    np.testing.assert_array_equal(np.asarray(seq.labels), movie.labels)
    # the stack-wide range segment_stack uses, not a per-frame one
    assert seq.intensity_range == pytest.approx(percentile_range(movie.image))


def test_ctc_sequence_folder(ctc, movie):
    (seq,) = open_training_data([str(ctc / "01")])
    np.testing.assert_array_equal(np.asarray(seq.images), movie.image)


def test_ctc_seg_frames_win_with_tra_ids(movie, tmp_path):
    # CTC SEG ids are not TRA ids: SEG frames must be renamed to the overlapping track
    perm = np.arange(1000)
    perm[1:] = np.arange(1, 1000)[::-1]
    folder = _gt_copy(movie, tmp_path / "ds", seg_frames={3}, seg_ids=perm)
    (seq,) = open_training_data(folder)
    np.testing.assert_array_equal(np.asarray(seq.labels), movie.labels)


def test_ctc_seg_only_gives_single_frames(movie, tmp_path):
    folder = _gt_copy(movie, tmp_path / "ds", seg_frames={2, 7}, tra=False)
    seqs = open_training_data(folder)
    assert [s.num_frames for s in seqs] == [1, 1] and seqs[1].name.endswith("man_seg007.tif")
    np.testing.assert_array_equal(np.asarray(seqs[1].images[0]), movie.image[7])
    np.testing.assert_array_equal(np.asarray(seqs[1].labels[0]), movie.labels[7])
    # the single frames keep the whole stack's range: what inference on the sequence would use
    assert seqs[0].intensity_range == pytest.approx(percentile_range(movie.image))


def test_ctc_tra_markers_are_not_trained_as_masks(movie, tmp_path):
    folder = _gt_copy(movie, tmp_path / "ds", seg_frames={0, 5})
    for p in (folder.parent / "01_GT" / "TRA").glob("*.tif"):  # shrink every track to one-pixel markers
        frame, markers = tifffile.imread(p), np.zeros(movie.labels.shape[1:], np.uint16)
        for lab in np.unique(frame)[1:]:
            ys, xs = np.nonzero(frame == lab)
            markers[ys[0], xs[0]] = lab
        tifffile.imwrite(p, markers)
    with pytest.warns(UserWarning, match="markers"):
        seqs = open_training_data(folder)
    assert [s.num_frames for s in seqs] == [1, 1]


def test_image_labels_files_tiff_and_zarr(movie, tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", movie.image)
    tifffile.imwrite(tmp_path / "m_labels.tif", movie.labels)
    zarr.save_array(str(tmp_path / "m.zarr"), movie.image, zarr_format=2)
    zarr.save_array(str(tmp_path / "l.zarr"), movie.labels, zarr_format=2)
    ome = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="w", zarr_format=2)
    ome.create_array(name="0", shape=movie.image.shape, dtype=movie.image.dtype, chunks=(1, 48, 64))[...] = movie.image
    ome.attrs.update({"multiscales": [{"version": "0.4", "name": "img", "axes": [{"name": a} for a in "tyx"],
                                       "datasets": [{"path": "0"}]}]})
    with ZarrLabelsWriter(tmp_path / "l.ome.zarr", movie.labels.shape) as writer:
        for t, frame in enumerate(movie.labels):
            writer.write(t, frame)
    specs = [f"{tmp_path / 'm.tif'}::{tmp_path / 'm_labels.tif'}", f"{tmp_path / 'm.zarr'}::{tmp_path / 'l.zarr'}",
             f"{tmp_path / 'm.ome.zarr'}::{tmp_path / 'l.ome.zarr'}"]
    seqs = open_training_data(specs)
    for seq in seqs:
        assert seq.num_frames == 10
        np.testing.assert_array_equal(np.asarray(seq.labels[4]), movie.labels[4])
        np.testing.assert_array_equal(np.asarray(seq.images[4]), movie.image[4])


def test_image_labels_folders_pair_by_name(movie, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name, t in (("a", 0), ("b", 5)):
        tifffile.imwrite(tmp_path / "img" / f"{name}.tif", movie.image[t])
    tifffile.imwrite(tmp_path / "lab" / "a.tif", movie.labels[0])
    tifffile.imwrite(tmp_path / "lab" / "b_masks.tif", movie.labels[5])
    tifffile.imwrite(tmp_path / "img" / "c.tif", movie.image[1])  # not annotated: left out, said so
    with pytest.warns(UserWarning, match="c.tif"):
        seqs = open_training_data(f"{tmp_path / 'img'}::{tmp_path / 'lab'}")
    assert [s.name for s in seqs] == ["img/a.tif", "img/b.tif"]
    np.testing.assert_array_equal(np.asarray(seqs[1].labels), movie.labels[5:6])


def test_array_pairs_numpy_dask_zarr(movie):
    z = zarr.create_array(store={}, shape=movie.labels.shape, dtype=movie.labels.dtype, chunks=(1, 48, 64))
    z[...] = movie.labels
    specs = [(movie.image, movie.labels), (da.from_array(movie.image), da.from_array(movie.labels)),
             (movie.image, z)]
    for seq in open_training_data(specs):
        np.testing.assert_array_equal(np.asarray(seq.labels[2]), movie.labels[2])
    (single,) = open_training_data((movie.image, movie.labels))  # one pair, not a list of two specs
    assert single.num_frames == 10


def test_single_2d_images_become_one_frame_sequences(movie, tmp_path):
    tifffile.imwrite(tmp_path / "cell.tif", movie.image[0])
    tifffile.imwrite(tmp_path / "cell_mask.tif", movie.labels[0])
    rgb = np.repeat((movie.image[0] // 16).astype(np.uint8)[..., None], 3, axis=-1)  # H x W x 3
    seqs = open_training_data([f"{tmp_path / 'cell.tif'}::{tmp_path / 'cell_mask.tif'}", (rgb, movie.labels[0] > 0)])
    assert [s.num_frames for s in seqs] == [1, 1] and seqs[1].images.shape == (1, 48, 64, 3)
    clip = ClipSampler(seqs[1:], S, augment=False).sample(np.random.default_rng(0))
    assert clip.object_ids == [1] and clip.images.shape == (1, 3, S, S)  # a bool mask is one object
    assert ClipSampler(seqs[1:], S).sample(np.random.default_rng(0)).images.shape == (1, 3, S, S)  # RGB augmented
    # a 1-frame sequence joins video training
    sampler = ClipSampler(seqs + open_training_data((movie.image, movie.labels)), S, num_frames=4)
    assert len(sampler) == 1 + 1 + 7


# ------------------------------------------------------------------------------------ clips
def test_clip_shapes_objects_and_inference_preprocessing(ctc):
    (seq,) = open_training_data(ctc)
    sampler = ClipSampler([seq], S, num_frames=4, max_num_objects=2, augment=False)
    assert len(sampler) == 7  # starts 0..6 (10 frames, 4 per clip), each with a cell
    for seed in range(4):
        clip = sampler.sample(np.random.default_rng(seed))
        t, n = len(clip.frames), len(clip.object_ids)
        assert clip.images.shape == (t, 3, S, S) and clip.images.dtype == torch.float32
        assert clip.masks.shape == (t, n, S, S) and clip.masks.dtype == torch.bool
        assert t == 4 and 1 <= n <= 2 and clip.frames == list(range(clip.frames[0], clip.frames[0] + 4))
        assert clip.masks[0].flatten(1).any(1).all()  # each object is in frame 0
        for i, frame in enumerate(clip.frames):
            torch.testing.assert_close(clip.images[i], _inference_input(seq, frame), rtol=0, atol=0)
        # the masks are the label ids resized, not some other object
        direct = clip_from_frames(seq, clip.frames, clip.object_ids, S)
        assert torch.equal(direct.masks, clip.masks)


def test_same_seed_same_clip_and_seeds_differ(ctc):
    sampler = ClipSampler(open_training_data(ctc), S, num_frames=3)
    a, b = (sampler.sample(np.random.default_rng(7)) for _ in range(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert (a.object_ids, a.frames) == (b.object_ids, b.frames)
    others = [sampler.sample(np.random.default_rng(s)) for s in range(5)]
    assert any(not torch.equal(o.images, a.images) for o in others)


def test_short_sequence_gives_short_clip_and_absent_objects_are_empty(movie):
    labels = movie.labels[:3].copy()
    labels[2][labels[2] == 1] = 0  # cell 1 leaves after frame 1
    (seq,) = open_training_data((movie.image[:3], labels))
    clip = ClipSampler([seq], S, num_frames=8, max_num_objects=5, augment=False).sample(np.random.default_rng(0))
    assert clip.frames == [0, 1, 2] and clip.masks.shape[:2] == (3, 3)
    k = clip.object_ids.index(1)
    assert clip.masks[0, k].any() and not clip.masks[2, k].any()


def _bright_square(t=3, hw=(40, 56)):
    """A bright square off-centre (no symmetry hides a wrong flip) and its label."""
    images = np.full((t,) + hw, 10, np.uint16)
    labels = np.zeros((t,) + hw, np.uint8)
    images[:, 4:14, 6:18] = 1000
    labels[:, 4:14, 6:18] = 1
    return images, labels


@pytest.mark.parametrize("transform", [ClipTransform(), ClipTransform(hflip=True), ClipTransform(vflip=True),
                                       ClipTransform(rot90=1), ClipTransform(hflip=True, rot90=3)])
def test_flips_and_rotations_move_images_and_masks_together(transform):
    # ClipTransform(): the augmented path without augmentation is the inference path
    (seq,) = open_training_data(_bright_square())
    plain = clip_from_frames(seq, [0, 1, 2], [1], S)
    moved = make_clip(seq, [0, 1, 2], [1], S, transform, np.random.default_rng(0))
    expect_img, expect_mask = plain.images, plain.masks
    if transform.hflip:
        expect_img, expect_mask = expect_img.flip(-1), expect_mask.flip(-1)
    # a 40 x 56 frame is squashed to the square input: quarter turns would stretch it, half turns only
    k = transform.rot90 & 2
    if k:
        expect_img = torch.rot90(expect_img, k, dims=(-2, -1))
        expect_mask = torch.rot90(expect_mask, k, dims=(-2, -1))
    if transform.vflip:
        expect_img, expect_mask = expect_img.flip(-2), expect_mask.flip(-2)
    torch.testing.assert_close(moved.images, expect_img, atol=1e-5, rtol=0)
    assert torch.equal(moved.masks, expect_mask)


def test_augmented_masks_still_cover_the_bright_object():
    (seq,) = open_training_data(_bright_square())
    sampler = ClipSampler([seq], S, num_frames=3)
    corners = set()
    for seed in range(12):
        clip = sampler.sample(np.random.default_rng(seed))
        grey = clip.images[:, 0]  # T x S x S
        inside, outside = grey[clip.masks[:, 0]], grey[~clip.masks[:, 0]]
        assert inside.mean() > outside.mean() + 1.5  # the mask is on the bright square in every frame
        assert torch.equal(clip.masks[0], clip.masks[2])  # one transform for the whole clip
        # noise must not colour a grey frame: all three channels hold the same [0, 1] image
        unit = clip.images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        torch.testing.assert_close(unit[:, 0], unit[:, 2], atol=1e-5, rtol=0)
        ys, xs = np.nonzero(clip.masks[0, 0].numpy())
        corners.add((ys.mean() < S / 2, xs.mean() < S / 2))
    assert len(corners) >= 3  # flips and rotations really happen


def test_zoom_keeps_frame_0_objects_in_view():
    images, labels = _bright_square()
    images[:, -6:, -6:], labels[:, -6:, -6:] = 1000, 2  # a second object in the far corner
    (seq,) = open_training_data((images, labels))
    for scale in (1.1, 0.9):
        sampler = ClipSampler([seq], S, num_frames=2, augment=Augment(scale=(scale, scale)))
        for seed in range(6):
            clip = sampler.sample(np.random.default_rng(seed))
            assert clip.masks[0].flatten(1).any(1).all()


def test_thin_object_survives_downsizing():
    images = np.zeros((1, 256, 256), np.uint16)
    labels = np.zeros((1, 256, 256), np.uint16)
    labels[0, 100:180, 50] = 3  # one pixel wide: an eighth of a network pixel at S=32
    images[labels > 0] = 500
    (seq,) = open_training_data((images, labels))
    clip = clip_from_frames(seq, [0], [3], S)
    assert clip.masks[0, 0].any()


# ------------------------------------------------------------------------------------ bad input
def test_bad_shapes_name_both(movie, tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", movie.image)
    tifffile.imwrite(tmp_path / "short.tif", movie.labels[:7])
    tifffile.imwrite(tmp_path / "small.tif", movie.labels[:, :40])
    with pytest.raises(TrainingDataError, match=r"short\.tif.*\(7, 48, 64\).*m\.tif.*\(10, 48, 64\)"):
        open_training_data(f"{tmp_path / 'm.tif'}::{tmp_path / 'short.tif'}")
    with pytest.raises(TrainingDataError, match=r"\(10, 40, 64\).*\(10, 48, 64\)"):
        open_training_data(f"{tmp_path / 'm.tif'}::{tmp_path / 'small.tif'}")
    with pytest.raises(TrainingDataError, match="same number of frames"):
        open_training_data((movie.image, movie.labels[:3]))


def test_labels_not_integer(movie, tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", movie.image)
    tifffile.imwrite(tmp_path / "prob.tif", movie.labels.astype(np.float32) / 3)
    with pytest.raises(TrainingDataError, match=r"prob\.tif.*float32.*integer.*astype"):
        open_training_data(f"{tmp_path / 'm.tif'}::{tmp_path / 'prob.tif'}")


def test_labels_without_objects(movie, tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", movie.image)
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros_like(movie.labels))
    with pytest.raises(TrainingDataError, match=r"empty\.tif.*no labelled object"):
        open_training_data(f"{tmp_path / 'm.tif'}::{tmp_path / 'empty.tif'}")
    folder = _gt_copy(make_timelapse(n_frames=3, shape=(32, 32), n_cells=0, enter=False), tmp_path / "ds")
    with pytest.raises(TrainingDataError, match="no labelled object"):
        open_training_data(folder)


def test_folder_that_is_not_ctc(tmp_path, ctc):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(TrainingDataError, match="neither a Cell Tracking Challenge dataset nor a sequence"):
        open_training_data(tmp_path / "stuff")
    with pytest.raises(TrainingDataError, match="pass the image sequence"):
        open_training_data(ctc / "01_GT")


def test_missing_files_and_half_specs(tmp_path, movie):
    tifffile.imwrite(tmp_path / "m.tif", movie.image)
    with pytest.raises(TrainingDataError, match=r"nope\.tif.*does not exist"):
        open_training_data(tmp_path / "nope.tif")
    with pytest.raises(TrainingDataError, match=r"labels .*gone\.tif.*does not exist"):
        open_training_data(f"{tmp_path / 'm.tif'}::{tmp_path / 'gone.tif'}")
    for spec in (f"{tmp_path / 'm.tif'}::", f"::{tmp_path / 'm.tif'}"):
        with pytest.raises(TrainingDataError, match="IMAGE::LABELS with both sides"):
            open_training_data(spec)
    with pytest.raises(TrainingDataError, match="image without labels"):
        open_training_data(tmp_path / "m.tif")


def test_ctc_ground_truth_that_does_not_fit(movie, tmp_path):
    folder = _gt_copy(movie, tmp_path / "ds")
    tifffile.imwrite(folder.parent / "01_GT" / "TRA" / "man_track004.tif", np.ones((20, 20), np.uint16))
    with pytest.raises(TrainingDataError, match=r"man_track004\.tif.*\(20, 20\).*\(48, 64\)"):
        open_training_data(folder)
    (folder.parent / "01_GT" / "TRA" / "man_track004.tif").unlink()
    with pytest.raises(TrainingDataError, match=r"every frame.*\[4\]"):
        open_training_data(folder)


def test_sequence_checks_itself(movie):
    with pytest.raises(TrainingDataError, match="float64"):
        Sequence("direct", movie.image, movie.labels.astype(float), (0.0, 1.0))
