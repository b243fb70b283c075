"""Automatic mask generation ("segment everything"): the official ``SAM2AutomaticMaskGenerator``
pipeline, on plain torch (no torchvision, no OpenCV, no CUDA extension), for any image dtype.

Pipeline, per image crop (the whole image, plus smaller crops when ``crop_n_layers > 0``):

1. embed the crop once (:class:`~napari_sam2.predictor.image.ImagePredictor`);
2. prompt it with a regular grid of single foreground clicks, ``points_per_batch`` at a time, three
   candidate masks per click (``multimask_output``);
3. keep masks whose predicted IoU > ``pred_iou_thresh`` and whose stability score (IoU of the mask
   thresholded at ``mask_threshold +- stability_score_offset``) >= ``stability_score_thresh``;
4. binarise, drop empty masks, masks touching an inner crop edge, and masks outside
   [``min_area``, ``max_area``];
5. remove duplicates by non-maximum suppression of their bounding boxes (``box_nms_thresh``).

Then duplicates between crops are removed (``crop_nms_thresh``, preferring smaller crops) and,
optionally, small holes and islands are cleaned at full resolution (``min_region_area``).

Example
-------
>>> gen = AutomaticMaskGenerator(build_model("sam2.1_hiera_large"), points_per_side=32, min_area=50)
>>> records = gen.generate(image)            # H x W uint16 works; H x W x 3 uint8 as the official one
>>> labels = records_to_labels(records, image.shape[:2])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# the building blocks live in amg_utils; the public ones are re-exported here, where they always were
from .amg_utils import (
    MaskData,
    batch_slices,
    batched_mask_to_box,
    box_area,
    box_iou,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_stats,
    mask_to_rle,
    nms,
    records_to_labels,
    rle_to_mask,
)
from .image import ImagePredictor
from .postprocess import fill_holes_and_sprinkles, remove_small_regions, resize_logits
from .preprocess import check_image, to_model_coords, to_unit_rgb

__all__ = [
    "AutomaticMaskGenerator",
    "batched_mask_to_box",
    "box_area",
    "box_iou",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "generate_crop_boxes",
    "mask_to_rle",
    "records_to_labels",
    "nms",
    "rle_to_mask",
]


# ====================================================================================== generator
class AutomaticMaskGenerator:
    """Segment everything in an image by prompting SAM2 with a grid of clicks.

    Defaults are the official ones (tuned for natural images with a Hiera-L backbone). For
    microscopy, typical adjustments: ``points_per_side`` so that the grid spacing (image side /
    points_per_side) is below the smallest object's diameter (or use ``crop_n_layers``);
    lower ``pred_iou_thresh`` (0.6-0.7) and ``stability_score_thresh`` (0.8-0.9) for faint or
    low-contrast cells; ``min_area`` to drop debris and ``max_area`` to drop the background /
    whole-field masks.

    Parameters
    ----------
    model
        A :class:`napari_sam2.modeling.SAM2`.
    points_per_side
        The grid has ``points_per_side**2`` clicks on the image (fewer on deeper crops, see
        ``crop_n_points_downscale_factor``). Cost grows with its square. ``None``: give
        ``point_grids`` instead.
    points_per_batch
        Clicks decoded together; higher is faster but needs more memory (each click gives 3
        masks of 256 x 256 logits, upsampled to full size only when they pass ``pred_iou_thresh``).
    pred_iou_thresh
        Keep masks whose predicted IoU (the network's own quality estimate, 0-1) is above this.
        0 disables the filter.
    stability_score_thresh
        Keep masks whose stability score is at least this (0-1). The stability score is the IoU
        between the mask thresholded at ``mask_threshold + stability_score_offset`` and at
        ``mask_threshold - stability_score_offset``: 1 for crisp masks, lower for fuzzy edges.
        0 disables the filter.
    stability_score_offset
        Logit offset for the stability score (default 1.0). Larger is stricter.
    mask_threshold
        Logit threshold for binarising masks (default 0.0). Lower gives larger masks.
    box_nms_thresh
        Two masks whose bounding boxes overlap with IoU above this are duplicates: the one with the
        lower predicted IoU is dropped (within one crop). 1.0 disables, lower removes more.
    crop_n_layers
        0: the whole image only. n > 0: also run on n layers of overlapping crops, layer i having
        ``(2**i)**2`` crops (each crop costs one more image embedding). Helps with many small
        objects on a large image.
    crop_nms_thresh
        Box-IoU duplicate threshold between masks of different crops (smaller crops win).
    crop_overlap_ratio
        Overlap of neighbouring crops, as a fraction of the image's short side (layer 1).
    crop_n_points_downscale_factor
        Crop layer i uses ``points_per_side / factor**i`` points per side.
    point_grids
        Explicit grids (one ``N x 2`` array of ``(x, y)`` in [0, 1] per crop layer) instead of
        ``points_per_side``.
    min_mask_region_area
        Official SAM2 post-processing: if > 0, holes and islands of at most this many pixels
        *of the 256 x 256 low-resolution mask* are removed from each mask before the filters
        (one low-res pixel is about (image side / 256)^2 image pixels).
    output_mode
        ``"binary_mask"`` (``H x W`` bool arrays), ``"uncompressed_rle"`` or ``"coco_rle"``
        (the last needs pycocotools).
    use_m2m
        Refine each mask once more, feeding its own low-res logits back with its click.
    multimask_output
        Three candidate masks per click (default) instead of one.
    min_area, max_area
        Keep masks with ``min_area <= area <= max_area`` pixels of the original image
        (``max_area=None``: no upper bound). Applied before duplicate removal, so that e.g. a
        dropped background mask cannot suppress anything.
    min_region_area
        Full-resolution clean-up (as in the original SAM's ``postprocess_small_regions``): if > 0,
        holes and disconnected islands smaller than this many pixels are removed from each final
        mask, and duplicates are removed again (masks that needed no clean-up win).
    intensity_range
        ``(low, high)`` intensity range for non-uint8 images (default: their 0.5 / 99.5
        percentiles); see :meth:`ImagePredictor.set_image`.
    cache_features
        Keep the embeddings of the last image, so that calling :meth:`generate` again on the same
        image with other settings (e.g. while tuning thresholds) skips the image encoder.
    """

    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        min_area: int = 0,
        max_area: int | None = None,
        min_region_area: int = 0,
        intensity_range: tuple[float, float] | None = None,
        cache_features: bool = True,
        **kwargs,
    ) -> None:
        if kwargs:
            raise TypeError(f"AutomaticMaskGenerator got unknown parameter(s): {', '.join(sorted(kwargs))}")
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Give exactly one of points_per_side or point_grids.")
        if int(crop_n_layers) < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in point_grids]
            if len(self.point_grids) < int(crop_n_layers) + 1:
                raise ValueError(
                    f"point_grids has {len(self.point_grids)} grids but crop_n_layers={crop_n_layers} "
                    f"needs {int(crop_n_layers) + 1} (one per layer)"
                )
            for g in self.point_grids:
                if g.size and (g.min() < 0 or g.max() > 1):
                    raise ValueError("point_grids must hold (x, y) points normalised to [0, 1]")
        if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
            raise ValueError(f"output_mode must be 'binary_mask', 'uncompressed_rle' or 'coco_rle', got {output_mode!r}")
        if output_mode == "coco_rle":
            try:
                from pycocotools import mask as _mask_utils  # noqa: F401
            except ImportError as e:
                raise ImportError("output_mode='coco_rle' needs pycocotools (pip install pycocotools)") from e
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if max_area is not None and max_area < min_area:
            raise ValueError(f"max_area ({max_area}) must be >= min_area ({min_area})")
        self.predictor = ImagePredictor(
            model, mask_threshold=mask_threshold, max_hole_area=min_mask_region_area, max_sprinkle_area=min_mask_region_area
        )
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.mask_threshold = float(mask_threshold)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.use_m2m = bool(use_m2m)
        self.multimask_output = bool(multimask_output)
        self.min_area = int(min_area)
        self.max_area = None if max_area is None else int(max_area)
        self.min_region_area = int(min_region_area)
        self.intensity_range = intensity_range
        self.cache_features = bool(cache_features)
        self._cache_key = None
        self._cache: dict[tuple[int, ...], tuple[dict, list]] = {}

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image) -> list[dict[str, Any]]:
        """Masks of everything in ``image`` (``H x W`` grey or ``H x W x 3``, any dtype).

        Returns a list of records (dicts), by decreasing predicted IoU within each crop:

        - ``segmentation``: ``H x W`` bool array (or an RLE dict, see ``output_mode``)
        - ``area``: number of pixels (int)
        - ``bbox``: ``[x, y, w, h]`` floats, as the official generator: ``x, y`` the first column /
          row of the mask, ``w, h`` the last minus the first (so a 1-pixel mask has ``w = h = 0``)
        - ``predicted_iou``: the network's quality estimate (float)
        - ``point_coords``: ``[[x, y]]``, the click that produced the mask
        - ``stability_score``: float (see ``stability_score_thresh``)
        - ``crop_box``: ``[x, y, w, h]`` of the image crop the mask came from
        """
        arr = check_image(image)
        unit = to_unit_rgb(arr, intensity_range=self.intensity_range)
        self._use_cache_for(arr)
        data = self._generate_masks(unit)
        return self._records(data, unit.shape[:2])

    # ------------------------------------------------------------------ pipeline
    def _use_cache_for(self, arr: np.ndarray) -> None:
        if not self.cache_features:
            self._cache, self._cache_key = {}, None
            return
        h = hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8).ravel(), digest_size=16)
        key = (arr.shape, str(arr.dtype), repr(self.intensity_range), h.hexdigest())
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key

    def _set_crop(self, unit: np.ndarray, crop_box: Sequence[int]) -> None:
        x0, y0, x1, y1 = crop_box
        key = tuple(int(v) for v in crop_box)
        if self.cache_features and key in self._cache:
            feats, hw = self._cache[key]
            self.predictor.set_image_features(feats, hw)
            return
        self.predictor.set_unit_image(unit[y0:y1, x0:x1])
        if self.cache_features:
            self._cache[key] = (self.predictor.get_image_features(), self.predictor.orig_hw)

    def _generate_masks(self, unit: np.ndarray) -> MaskData:
        orig_size = unit.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer in zip(crop_boxes, layer_idxs):
            data.extend(self._process_crop(unit, crop_box, layer, orig_size))
        if len(crop_boxes) > 1 and len(data):
            scores = 1.0 / box_area(data.crop_boxes.float())  # prefer masks from smaller crops
            data.filter(nms(data.boxes.float(), scores, self.crop_nms_thresh))
        if self.min_region_area > 0 and len(data):
            data = self._postprocess_small_regions(data, orig_size)
        return data

    def _process_crop(self, unit: np.ndarray, crop_box: list[int], layer: int, orig_size) -> MaskData:
        x0, y0, x1, y1 = crop_box
        self._set_crop(unit, crop_box)
        crop_hw = (y1 - y0, x1 - x0)
        points = self.point_grids[layer] * np.array(crop_hw)[None, ::-1]
        data = MaskData()
        for sl in batch_slices(len(points), self.points_per_batch):
            self._process_batch(points[sl], crop_hw, crop_box, orig_size, data)
        self.predictor.reset_predictor()
        if len(data):
            data.filter(nms(data.boxes.float(), data.iou, self.box_nms_thresh))
        data.shift(crop_box)
        return data

    def _process_batch(self, points: np.ndarray, crop_hw, crop_box, orig_size, out: MaskData) -> None:
        pred = self.predictor
        dev = pred.device
        pts = torch.as_tensor(points, dtype=torch.float32, device=dev)
        in_points = to_model_coords(pts, crop_hw, pred.image_size)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=dev)
        low, iou = pred.decode(in_points[:, None, :], in_labels[:, None], multimask_output=self.multimask_output)
        c = low.shape[1]
        low = low.flatten(0, 1)  # (B*C) x 256 x 256
        iou = iou.flatten(0, 1)
        pts = pts.repeat_interleave(c, dim=0)
        if self.use_m2m:
            low_in = torch.clamp(low, -32.0, 32.0)
            in_pts = in_points.repeat_interleave(c, dim=0)
            new_low, new_iou = [], []
            for sl in batch_slices(low.shape[0], self.points_per_batch):
                lo, io = pred.decode(
                    in_pts[sl, None, :], torch.ones(in_pts[sl].shape[0], 1, dtype=torch.int, device=dev),
                    mask_input=low_in[sl, None], multimask_output=False,
                )
                new_low.append(lo[:, 0])
                new_iou.append(io[:, 0])
            low, iou = torch.cat(new_low), torch.cat(new_iou)

        if self.pred_iou_thresh > 0.0:
            keep = iou > self.pred_iou_thresh
            low, iou, pts = low[keep], iou[keep], pts[keep]
        if low.shape[0] == 0:
            return
        # the official clean-up on low-res logits (min_mask_region_area), then full size in chunks
        low = fill_holes_and_sprinkles(low[:, None], pred.mask_threshold, pred.max_hole_area, pred.max_sprinkle_area)[:, 0]
        orig_h, orig_w = orig_size
        # full-size logits in chunks of at most ~2**25 pixels (128 MB of float32)
        chunk = max(1, int(2**25 // max(1, crop_hw[0] * crop_hw[1])))
        for sl in batch_slices(low.shape[0], chunk):
            logits = resize_logits(low[sl, None].float(), crop_hw)[:, 0]
            stab, masks, areas, boxes = mask_stats(logits, self.mask_threshold, self.stability_score_offset)
            del logits
            keep = areas > 0
            if self.stability_score_thresh > 0.0:
                keep &= stab >= self.stability_score_thresh
            keep &= areas >= self.min_area
            if self.max_area is not None:
                keep &= areas <= self.max_area
            keep &= ~is_box_near_crop_edge(torch.from_numpy(boxes), crop_box, [0, 0, orig_w, orig_h]).numpy()
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                continue
            patches = [masks[i, boxes[i, 1] : boxes[i, 3] + 1, boxes[i, 0] : boxes[i, 2] + 1].copy() for i in idx]
            idx_t = torch.from_numpy(idx)
            out.add(
                torch.from_numpy(boxes[idx]), iou[sl].cpu()[idx_t], torch.from_numpy(stab[idx]),
                pts[sl].cpu()[idx_t], crop_box, patches, areas[idx],
            )

    def _postprocess_small_regions(self, data: MaskData, hw) -> MaskData:
        """Remove holes / islands under ``min_region_area`` pixels, then NMS again (unchanged masks win)."""
        masks, scores = [], []
        for i in range(len(data)):
            m = data.full_mask(i, hw)
            m, changed_h = remove_small_regions(m, self.min_region_area, mode="holes")
            m, changed_i = remove_small_regions(m, self.min_region_area, mode="islands")
            masks.append(m)
            scores.append(0.0 if (changed_h or changed_i) else 1.0)
        boxes = torch.stack([batched_mask_to_box(torch.from_numpy(m)) for m in masks])
        keep = nms(boxes.float(), torch.tensor(scores), self.box_nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                bx0, by0, bx1, by1 = boxes[i].tolist()
                data.boxes[i] = boxes[i]
                data.patches[i] = masks[i][by0 : by1 + 1, bx0 : bx1 + 1].copy()
                data.areas[i] = int(masks[i].sum())
        data.filter(keep)
        area_ok = (data.areas > 0) & (data.areas >= self.min_area)
        if self.max_area is not None:
            area_ok &= data.areas <= self.max_area
        data.filter(area_ok)
        return data

    def _records(self, data: MaskData, hw) -> list[dict[str, Any]]:
        records = []
        for i in range(len(data)):
            mask = data.full_mask(i, tuple(hw))
            if self.output_mode == "binary_mask":
                seg: Any = mask
            else:
                seg = mask_to_rle(mask)
                if self.output_mode == "coco_rle":
                    from pycocotools import mask as mask_utils

                    seg = mask_utils.frPyObjects(seg, *seg["size"])
                    seg["counts"] = seg["counts"].decode("utf-8")
            records.append(
                {
                    "segmentation": seg,
                    "area": int(data.areas[i]),
                    "bbox": box_xyxy_to_xywh(data.boxes[i].tolist()),
                    "predicted_iou": float(data.iou[i]),
                    "point_coords": [[float(v) for v in data.points[i].tolist()]],
                    "stability_score": float(data.stability[i]),
                    "crop_box": box_xyxy_to_xywh(data.crop_boxes[i].tolist()),
                }
            )
        return records
