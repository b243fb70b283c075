"""Training data for fine-tuning: annotated stacks -> clips of frames and object masks.

The reference SAM2 recipe: a clip is ``num_frames`` (default 8) consecutive frames with up to
``max_num_objects`` (default 3) objects that are present in its first frame; one augmentation is drawn
per clip and applied alike to all its frames (:mod:`.augment`). Images go through the inference
pre-processing exactly: one intensity range per stack (``FrameSource``'s 0.5 / 99.5 percentiles, as
``segment_stack`` uses), :func:`~napari_sam2.predictor.preprocess.to_unit_rgb` and
:func:`~napari_sam2.predictor.preprocess.to_model_input`.

>>> seqs = open_training_data(["Fluo-N2DH-SIM+", "movie.tif::movie_labels.tif"])  # doctest: +SKIP
>>> sampler = ClipSampler(seqs, image_size=1024)                                    # doctest: +SKIP
>>> clip = sampler.sample(np.random.default_rng(0))                                # doctest: +SKIP
>>> clip.images.shape, clip.masks.shape                        # T x 3 x S x S, T x N x S x S
(torch.Size([8, 3, 1024, 1024]), torch.Size([8, 2, 1024, 1024]))

Specs :func:`open_training_data` understands:

- a Cell Tracking Challenge dataset folder (``01/``, ``01_GT/``, ``02/``, ...; sequences without ``_GT``
  are skipped) or one sequence folder (``.../01`` with ``../01_GT`` beside it). ``TRA/man_trackNNN.tif``
  (every frame) makes the video sequence; frames that also have ``SEG/man_segNNN.tif`` use the SEG
  masks instead (more accurate), their objects renamed to the TRA label they overlap most (CTC SEG and
  TRA labels are not linked) or to a new id. In some CTC datasets the TRA masks are only *markers*
  (blobs inside each cell, not its outline): when the SEG frames show that (TRA covers less than half
  of the SEG foreground), the TRA video is not used, with a warning, since it would teach the model to
  draw blobs. SEG frames without a usable TRA frame become 1-frame sequences (image training).
- ``"IMAGE::LABELS"``: each side a TIFF, Zarr or OME-Zarr file, or both sides folders of such files,
  paired by name (``a.tif`` with ``a.tif``, ``a_labels.tif``, ``a_masks.tif``, ``a_seg.tif``...).
- ``(image, labels)``: numpy / dask / zarr arrays (or two paths).
- either of the last two with a single 2-D image and a 2-D label mask: a 1-frame sequence.

Every label frame is taken as complete: 0 is background, so an object not drawn in a frame is trained
as absent there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import tifffile
import torch
from dask.base import tokenize

from ..io import StackReadError, normalize_frame, open_stack, video_view
from ..io.ctc import numbered_files
from ..io.zarr_source import is_zarr_path
from ..predictor.frames import FrameSource
from ..predictor.preprocess import to_model_input, to_unit_rgb
from .augment import (
    Augment,
    ClipTransform,
    apply_geometry,
    apply_intensity,
    crop,
    imagenet_normalize,
    resize_masks,
    resize_unit,
    zoom_window,
)

__all__ = ["TrainingDataError", "Sequence", "Clip", "open_training_data", "clip_from_frames", "make_clip",
           "ClipSampler", "Augment", "ClipTransform"]

_STACK_SUFFIXES = (".tif", ".tiff", ".zarr")
_LABEL_SUFFIXES = ("_labels", "_label", "_masks", "_mask", "_seg", "_gt", "_cp_masks")
_INTEGER_FIX = ("save integer label images (0 = background, 1..N = objects, e.g. uint16); "
                "if they hold whole numbers, convert them with labels.astype(np.uint16)")


class TrainingDataError(ValueError):
    """Training data that cannot be used: what was wrong, in which file, and how to fix it."""


@dataclass
class Sequence:
    """One annotated stack.

    ``images``: T x H x W (or T x H x W x 3) array, read lazily; ``labels``: T x H x W integer labels,
    0 = background; ``intensity_range``: the stack-wide ``(low, high)`` that inference uses.
    """

    name: str
    images: Any
    labels: Any
    intensity_range: tuple[float, float]
    _frame_ids: list[np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_pair(self.images, self.labels, f"the images of '{self.name}'", f"the labels of '{self.name}'")

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    def frame_object_ids(self) -> list[np.ndarray]:
        """The label ids present in each frame (read once, then cached)."""
        if self._frame_ids is None:
            ids = []
            for start in range(0, self.num_frames, 16):
                frames = range(start, min(start + 16, self.num_frames))
                for t, frame in zip(frames, _read(self.labels, frames)):
                    present = np.unique(frame)
                    if present.size and present[0] < 0:
                        raise TrainingDataError(f"{self.name}: frame {t} holds the negative label {present[0]}; "
                                                "labels must be 0 (background) or positive object ids")
                    ids.append(present[present != 0].astype(np.int64))
            self._frame_ids = ids
        return self._frame_ids


@dataclass
class Clip:
    """Network input and targets of one training clip."""

    images: torch.Tensor  # T x 3 x S x S float32, pre-processed as at inference
    masks: torch.Tensor  # T x N x S x S bool, each object non-empty in frame 0
    object_ids: list[int]  # N label ids in the sequence
    source: str
    frames: list[int]  # T sequence frames


# ------------------------------------------------------------------------------------ opening
def open_training_data(specs, *, axes: str | None = None) -> list[Sequence]:
    """Open annotated stacks for fine-tuning, checking them all before any training.

    Parameters
    ----------
    specs
        One spec or a list of them (see the module docstring): a CTC dataset or sequence folder,
        ``"IMAGE::LABELS"``, an ``(image, labels)`` pair of arrays or paths, or a `Sequence`.
    axes
        Axes of the image sources (``open_stack``'s ``axes``), e.g. ``"TYX"``; labels are ``(T, Y, X)``
        or ``(Y, X)``.

    Raises
    ------
    TrainingDataError
        For a missing file, a folder that is neither a CTC dataset nor a sequence, an ``IMAGE::LABELS``
        spec without both sides, labels that are not integers or whose shape differs from the images',
        ground truth without any labelled object. Every label frame is read once here.
    """
    sequences: list[Sequence] = []
    for spec in spec_list(specs):
        sequences += _open_spec(spec, axes)
    if not sequences:
        raise TrainingDataError("no training data: give at least one CTC folder, 'IMAGE::LABELS' spec or "
                                "(image, labels) pair")
    return sequences


def spec_list(specs) -> list:
    """One spec or a list of them -> the list (an ``(image, labels)`` pair of arrays is one spec)."""
    if isinstance(specs, (str, os.PathLike, Sequence)) or _is_array_pair(specs):
        return [specs]
    return list(specs)


def _is_array_pair(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and all(hasattr(s, "shape") for s in spec)


def _open_spec(spec, axes) -> list[Sequence]:
    if isinstance(spec, Sequence):
        return [_require_objects(spec, spec.name)]
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        image, labels = spec
        if all(isinstance(s, (str, os.PathLike)) for s in spec):
            return _open_path_pair(Path(image), Path(labels), axes)
        return [_open_pair(image, labels, "array", f"the {type(image).__name__} images",
                           f"the {type(labels).__name__} labels", axes)]
    if not isinstance(spec, (str, os.PathLike)):
        raise TrainingDataError(f"cannot use a {type(spec).__name__} as training data: give a CTC folder, "
                                "'IMAGE::LABELS' or an (image, labels) pair of arrays")
    text = os.fspath(spec)
    if "::" in text:
        image, _, labels = text.partition("::")
        if not image.strip() or not labels.strip() or "::" in labels:
            raise TrainingDataError(f"training data spec '{text}' must be IMAGE::LABELS with both sides given, "
                                    "e.g. 'movie.tif::movie_labels.tif' or 'images/::labels/'")
        return _open_path_pair(Path(image.strip()), Path(labels.strip()), axes)
    path = Path(text).expanduser()
    if not path.exists():
        raise TrainingDataError(f"training data '{path}' does not exist; check the path "
                                f"(working directory: '{Path.cwd()}')")
    if not path.is_dir() or is_zarr_path(path):
        raise TrainingDataError(f"'{path}' is an image without labels: pass 'IMAGE::LABELS' "
                                f"(e.g. '{path}::{path.stem}_labels{path.suffix}') or a CTC folder")
    if (path.parent / f"{path.name}_GT").is_dir():
        return _open_ctc_sequence(path)
    sequences = [d for d in sorted(path.iterdir()) if d.is_dir() and (path / f"{d.name}_GT").is_dir()]
    if sequences:
        return [s for d in sequences for s in _open_ctc_sequence(d)]
    if path.name.endswith("_GT"):
        hint = f"pass the image sequence '{path.parent / path.name[:-3]}' or the dataset folder '{path.parent}'"
    else:
        hint = ("a CTC dataset holds 01/ and 01_GT/ (SEG/ and/or TRA/), a sequence folder 01/ has 01_GT/ "
                "beside it; for other images with labels use 'IMAGE::LABELS'")
    raise TrainingDataError(f"'{path}' is neither a Cell Tracking Challenge dataset nor a sequence: {hint}")


def _stack_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if not name.startswith(".") and name.endswith(_STACK_SUFFIXES):
            out[re.sub(r"(\.ome)?\.(tiff?|zarr)$", "", p.name, flags=re.IGNORECASE)] = p
    return out


def _open_path_pair(image: Path, labels: Path, axes) -> list[Sequence]:
    for side, path in (("image", image), ("labels", labels)):
        if not path.exists():
            raise TrainingDataError(f"{side} '{path}' of the training data does not exist; check the path "
                                    f"(working directory: '{Path.cwd()}')")
    image_folder = image.is_dir() and not is_zarr_path(image)
    labels_folder = labels.is_dir() and not is_zarr_path(labels)
    if image_folder != labels_folder:
        raise TrainingDataError(f"'{image}::{labels}': give two files or two folders of files to pair by name, "
                                "not one of each")
    if not image_folder:
        return [_open_pair(image, labels, image.name, f"image '{image}'", f"labels '{labels}'", axes)]
    images, label_files = _stack_files(image), _stack_files(labels)
    by_key = dict(label_files)
    for key, path in label_files.items():  # 'a_masks.tif' pairs with 'a.tif' when there is no 'a.tif' label
        for suffix in _LABEL_SUFFIXES:
            if key.lower().endswith(suffix):
                by_key.setdefault(key[: -len(suffix)], path)
    pairs = [(images[k], by_key[k]) for k in images if k in by_key]
    unpaired = [images[k].name for k in images if k not in by_key]
    if not pairs:
        raise TrainingDataError(f"no image in '{image}' has a label file of the same name in '{labels}' "
                                f"(images: {sorted(images)[:5]}, labels: {sorted(label_files)[:5]}); name each "
                                "label file like its image (optionally with _labels / _masks)")
    if unpaired:
        warnings.warn(f"{len(unpaired)} image(s) in '{image}' have no labels in '{labels}' and are not used, "
                      f"e.g. {unpaired[:3]}", stacklevel=3)
    return [_open_pair(i, lab, f"{image.name}/{i.name}", f"image '{i}'", f"labels '{lab}'", axes) for i, lab in pairs]


def _open_video(source, what: str, axes=None):
    try:
        return video_view(open_stack(source, axes=axes))
    except (FileNotFoundError, StackReadError, ValueError, TypeError) as exc:
        raise TrainingDataError(f"cannot use {what} as training images: {exc}") from exc


def _open_labels(source, what: str):
    """Labels as a (T, Y, X) array, lazily; files through the project's readers."""
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        arr = source
    else:
        try:
            stack = open_stack(source)
        except (FileNotFoundError, StackReadError, ValueError) as exc:
            raise TrainingDataError(f"cannot read {what}: {exc}; {_INTEGER_FIX}") from exc
        arr, ax = stack.data, stack.axes
        for axis in "ZC":  # single planes / channels, as a label file saved by Fiji may carry
            if axis in ax and stack.size(axis) == 1 and len(ax) > 3:
                arr, ax = arr[(slice(None),) * ax.index(axis) + (0,)], ax.replace(axis, "")
        if ax == "ZYX":  # a Z stack of labels goes with images whose planes are the frames
            ax = "TYX"
        if ax not in ("YX", "TYX"):
            raise TrainingDataError(f"{what} have axes {stack.axes} (shape {stack.shape}); labels must be "
                                    "(T, Y, X) or (Y, X) integer images")
    if arr.ndim == 2:
        arr = arr[None] if isinstance(arr, (np.ndarray, da.Array)) else da.from_array(arr, chunks=arr.shape)[None]
    return arr


def _check_pair(images, labels, image_what: str, labels_what: str) -> None:
    ishape, lshape = tuple(int(s) for s in images.shape), tuple(int(s) for s in labels.shape)
    if not (len(ishape) == 3 or (len(ishape) == 4 and ishape[-1] == 3)):
        raise TrainingDataError(f"{image_what} have shape {ishape}; training images must be T x H x W or "
                                "T x H x W x 3 (pick one channel / plane first)")
    if len(lshape) != 3 or lshape != ishape[:3]:
        raise TrainingDataError(f"{labels_what} have shape {lshape} but {image_what} have shape {ishape}: labels "
                                "must have the same number of frames, height and width as the images "
                                "(T x H x W, or H x W for one image); check that the files belong together")
    if np.dtype(labels.dtype).kind not in "biu":
        raise TrainingDataError(f"{labels_what} have dtype {labels.dtype}, not integer labels: {_INTEGER_FIX}")
    if ishape[0] == 0:
        raise TrainingDataError(f"{image_what} have no frames")


def _stack_range(video, what: str) -> tuple[float, float]:
    try:  # FrameSource is what segment_stack normalises with: training sees what inference sees
        lo, hi = FrameSource(video).range
    except ValueError as exc:
        raise TrainingDataError(f"cannot normalise {what}: {exc}") from exc
    return float(lo), float(hi)


def _require_objects(seq: Sequence, what: str) -> Sequence:
    if not any(ids.size for ids in seq.frame_object_ids()):
        raise TrainingDataError(f"{what} hold no labelled object (every pixel is 0): nothing to train on; "
                                "check that it is the right file, or leave this stack out")
    return seq


def _open_pair(image, labels, name: str, image_what: str, labels_what: str, axes) -> Sequence:
    video = _open_video(image, image_what, axes)
    label_array = _open_labels(labels, labels_what)
    _check_pair(video.data, label_array, image_what, labels_what)
    seq = Sequence(name, video.data, label_array, _stack_range(video, image_what))
    return _require_objects(seq, labels_what)


# ------------------------------------------------------------------------------------ CTC


def _read_gt(path: Path, shape: tuple[int, int]) -> np.ndarray:
    frame = np.asarray(tifffile.imread(path))
    if frame.shape != shape:
        raise TrainingDataError(f"ground truth '{path}' has shape {frame.shape} but the images have frames of "
                                f"{shape}: each man_*NNN.tif must match its tNNN.tif")
    if frame.dtype.kind not in "biu":
        raise TrainingDataError(f"ground truth '{path}' has dtype {frame.dtype}: {_INTEGER_FIX}")
    return frame


def _seg_as_tra(seg: np.ndarray, tra: np.ndarray, t: int) -> np.ndarray:
    """SEG frame with each object renamed to the TRA label it overlaps most; new ids for the rest.

    New ids are ``65536 * (t + 1) + seg_id``: above any 16-bit TRA label, and distinct between frames
    so that unmatched objects of two SEG frames are never taken for one track.
    """
    out = np.zeros(seg.shape, np.int64)
    both = (seg > 0) & (tra > 0)
    pairs, counts = np.unique(np.stack([seg[both], tra[both]]).astype(np.int64), axis=1, return_counts=True)
    taken: dict[int, int] = {}  # tra id -> overlap of the SEG object holding it
    best: dict[int, tuple[int, int]] = {}
    for (s, r), c in sorted(zip(pairs.T.tolist(), counts.tolist()), key=lambda p: -p[1]):
        if s not in best and taken.get(r, 0) == 0:
            best[s], taken[r] = (r, c), c
    for s in np.unique(seg[seg > 0]).tolist():
        out[seg == s] = best[s][0] if s in best else 65536 * (t + 1) + s
    return out


def _ctc_label_frame(tra: Path, seg: Path | None, shape: tuple[int, int], t: int) -> np.ndarray:
    tra_frame = _read_gt(tra, shape)
    if seg is None:
        return tra_frame.astype(np.int64)
    return _seg_as_tra(_read_gt(seg, shape), tra_frame, t)


def _seg_frame(seg: Path, shape: tuple[int, int]) -> np.ndarray:
    return _read_gt(seg, shape).astype(np.int64)


def _markers(tra: dict[int, Path], seg: dict[int, Path], shape: tuple[int, int]) -> bool:
    shared = sorted(set(tra) & set(seg))[:3]
    covered = total = 0
    for t in shared:
        s, r = _read_gt(seg[t], shape) > 0, _read_gt(tra[t], shape) > 0
        covered, total = covered + int((s & r).sum()), total + int(s.sum())
    return total > 0 and covered < 0.5 * total


def _lazy_frames(reader, args: list[tuple], shape: tuple[int, int], name: str) -> da.Array:
    delayed = dask.delayed(reader, pure=True)
    return da.stack([da.from_delayed(delayed(*a, dask_key_name=f"{name}-{i}"), shape=shape, dtype=np.int64)
                     for i, a in enumerate(args)])


def _open_ctc_sequence(folder: Path) -> list[Sequence]:
    gt = folder.parent / f"{folder.name}_GT"
    name = f"{folder.parent.name}/{folder.name}"
    images = numbered_files(folder, "t")
    if not images:
        raise TrainingDataError(f"CTC sequence '{folder}' holds no tNNN.tif images; is it the image folder "
                                f"(beside '{gt.name}')?")
    n = max(images) + 1
    if len(images) != n:
        missing = sorted(set(range(n)) - set(images))[:5]
        raise TrainingDataError(f"CTC sequence '{folder}': images are not numbered t000..t{n - 1:03d} without "
                                f"gaps (missing e.g. {missing})")
    video = _open_video([images[t] for t in range(n)], f"CTC sequence '{folder}'")
    shape = (int(video.shape[1]), int(video.shape[2]))
    tra, seg = numbered_files(gt / "TRA", "man_track"), numbered_files(gt / "SEG", "man_seg")
    if not tra and not seg:
        raise TrainingDataError(f"CTC ground truth '{gt}' holds neither SEG/man_segNNN.tif nor "
                                "TRA/man_trackNNN.tif: nothing to train on")
    beyond = sorted(t for t in set(tra) | set(seg) if t >= n)
    if beyond:
        raise TrainingDataError(f"CTC ground truth '{gt}' has frame {beyond[0]} but '{folder}' only "
                                f"t000..t{n - 1:03d}: ground truth and images do not belong together")
    if tra and len(tra) != n:
        missing = sorted(set(range(n)) - set(tra))[:5]
        raise TrainingDataError(f"CTC ground truth '{gt / 'TRA'}' must cover every frame; man_track files are "
                                f"missing for frames {missing}; restore them or remove TRA/ to train on SEG only")
    intensity = _stack_range(video, f"CTC sequence '{folder}'")
    use_tra = bool(tra)
    if use_tra and _markers(tra, seg, shape):
        use_tra = False
        warnings.warn(f"'{gt / 'TRA'}' holds markers, not full masks (they cover less than half of the SEG "
                      "objects): only the SEG frames of this sequence are used, as single images", stacklevel=4)
    out = []
    if use_tra:
        labels = _lazy_frames(_ctc_label_frame, [(tra[t], seg.get(t), shape, t) for t in range(n)],
                              shape, f"ctc-labels-{tokenize(str(gt), shape)}")
        out.append(_require_objects(Sequence(name, video.data, labels, intensity), f"the ground truth in '{gt}'"))
    else:
        for t in sorted(seg):
            labels = _lazy_frames(_seg_frame, [(seg[t], shape)], shape, f"ctc-seg-{tokenize(str(seg[t]))}")
            seq = Sequence(f"{name}/SEG/{seg[t].name}", video.data[t:t + 1], labels, intensity)
            if any(ids.size for ids in seq.frame_object_ids()):  # an empty SEG frame has nothing to teach
                out.append(seq)
        if not out:
            raise TrainingDataError(f"the SEG ground truth in '{gt}' holds no labelled object: nothing to train on")
    return out


# ------------------------------------------------------------------------------------ clips
def _read(array, frames) -> list[np.ndarray]:
    frames = list(frames)
    if isinstance(array, da.Array):  # one compute: the frames' files are read in parallel
        return [np.asarray(f) for f in dask.compute(*(array[t] for t in frames))]
    return [np.asarray(array[t]) for t in frames]


def _unit(frame: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """H x W (grey) or H x W x 3 float32 in [0, 1]: ``to_unit_rgb`` without replicating grey."""
    if frame.ndim == 2:
        lo, hi = intensity_range
        return normalize_frame(frame, lo, hi)  # what to_unit_rgb does with a range, before replicating
    return to_unit_rgb(frame, intensity_range=intensity_range)


def clip_from_frames(seq: Sequence, frames: list[int], object_ids: list[int], image_size: int) -> Clip:
    """The clip of ``frames`` and ``object_ids`` without augmentation (validation): images exactly as at
    inference. Raises `TrainingDataError` if an object is not in the first frame."""
    return make_clip(seq, frames, object_ids, image_size)


def make_clip(seq: Sequence, frames: list[int], object_ids: list[int], image_size: int,
              transform: ClipTransform | None = None, rng: np.random.Generator | None = None,
              drop_missing: bool = False) -> Clip | None:
    """The clip of ``frames`` and ``object_ids`` with one augmentation ``transform`` (None: none).

    ``rng`` draws the noise and the zoom window (needed with a transform). Objects that are empty in the
    first frame raise `TrainingDataError`, or are left out with ``drop_missing`` (None if none is left).
    """
    frames, object_ids = [int(t) for t in frames], [int(i) for i in object_ids]
    if not frames or not object_ids:
        raise TrainingDataError(f"{seq.name}: a clip needs at least one frame and one object")
    bad = [t for t in frames if not 0 <= t < seq.num_frames]
    if bad:
        raise TrainingDataError(f"{seq.name}: frame {bad[0]} is out of range (0..{seq.num_frames - 1})")
    # grey frames stay H x W until the ImageNet normalisation, as in FrameSource: a third of the work
    units = [_unit(f, seq.intensity_range) for f in _read(seq.images, frames)]
    labels = _read(seq.labels, frames)
    ids = np.asarray(object_ids)
    if transform is None:
        images = torch.cat([to_model_input(u, image_size) for u in units])  # T x 3 x S x S
    else:
        if rng is None:
            raise ValueError("make_clip needs rng= with a transform (for the zoom window and the noise)")
        ys, xs = np.nonzero(np.isin(labels[0], ids))
        bbox = (0, 0, *labels[0].shape) if ys.size == 0 else (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        window = zoom_window(labels[0].shape, tuple(int(v) for v in bbox), transform.scale, rng)
        fill = float(np.median(units[0])) if window[2] > units[0].shape[0] or window[3] > units[0].shape[1] else 0.0
        labels = [crop(lab, window, 0) for lab in labels]
        if labels[0].shape[0] != labels[0].shape[1] and transform.rot90 % 2:
            # the frame is squashed to the square input after this: a quarter turn would stretch the
            # cells across, which inference never shows; half turns only
            transform = dataclasses.replace(transform, rot90=transform.rot90 & 2)
        unit = torch.stack([resize_unit(crop(u, window, fill), image_size) for u in units])  # T x C x S x S, C = 1 or 3
        images = imagenet_normalize(apply_geometry(apply_intensity(unit, transform, rng), transform))
    masks = torch.stack([resize_masks(lab[None] == ids[:, None, None], image_size) for lab in labels])  # T x N x S x S
    if transform is not None:
        masks = apply_geometry(masks, transform)
    present = masks[0].flatten(1).any(1)  # N
    if not bool(present.all()):
        if not drop_missing:
            missing = [i for i, p in zip(object_ids, present.tolist()) if not p]
            raise TrainingDataError(f"{seq.name}: object(s) {missing} are not in frame {frames[0]}, the clip's "
                                    "first frame; choose ids from seq.frame_object_ids()[frame]")
        if not bool(present.any()):
            return None
        masks = masks[:, present]
        object_ids = [i for i, p in zip(object_ids, present.tolist()) if p]
    return Clip(images=images.to(torch.float32).contiguous(), masks=masks.contiguous(), object_ids=object_ids,
                source=seq.name, frames=frames)


class ClipSampler:
    """Random training clips from annotated sequences.

    A position is a (sequence, start frame) whose frame holds an object; starts are at most
    ``T - num_frames`` so that clips have ``num_frames`` frames (a sequence shorter than that gives one
    clip of all its frames). ``augment``: True (default `Augment`), False / None, or an `Augment`.
    """

    def __init__(self, sequences, image_size: int, num_frames: int = 8, max_num_objects: int = 3,
                 augment: bool | Augment | None = True):
        if int(image_size) < 1 or int(num_frames) < 1 or int(max_num_objects) < 1:
            raise ValueError(f"image_size, num_frames and max_num_objects must be >= 1, got {image_size}, "
                             f"{num_frames}, {max_num_objects}")
        self.sequences = list(sequences)
        self.image_size, self.num_frames, self.max_num_objects = int(image_size), int(num_frames), int(max_num_objects)
        self.augment = Augment() if augment is True else (augment or None)
        self.positions = [(i, s) for i, seq in enumerate(self.sequences)
                          for s, ids in enumerate(seq.frame_object_ids()[:max(seq.num_frames - self.num_frames, 0) + 1])
                          if ids.size]
        if not self.positions:
            raise TrainingDataError("none of the sequences has a labelled object in a frame where a clip can start: "
                                    "nothing to train on")

    def __len__(self) -> int:
        return len(self.positions)

    def sample(self, rng: np.random.Generator) -> Clip:
        """One clip, drawn from ``rng`` only: the same generator state gives the same clip."""
        for _ in range(100):  # a zoom can push an object's last pixels out of view: draw again
            i, start = self.positions[int(rng.integers(len(self.positions)))]
            seq = self.sequences[i]
            frames = list(range(start, min(start + self.num_frames, seq.num_frames)))
            ids = seq.frame_object_ids()[start]
            chosen = sorted(rng.choice(ids, size=min(self.max_num_objects, ids.size), replace=False).tolist())
            transform = self.augment.draw(rng) if self.augment is not None else None
            clip = make_clip(seq, frames, chosen, self.image_size, transform, rng, drop_missing=True)
            if clip is not None:
                return clip
        raise RuntimeError("could not draw a clip with an object in its first frame in 100 tries")
