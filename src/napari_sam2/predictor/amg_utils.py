"""Building blocks of the automatic mask generator (as segment-anything's ``utils/amg.py``): point
grids and crop boxes, box geometry and non-maximum suppression, mask boxes and stability scores,
RLE encoding, the container of kept masks, and label images from records.

Everything here is plain torch / numpy (no torchvision, no OpenCV); the generator itself is in
:mod:`napari_sam2.predictor.amg`, which re-exports the public names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import product

import numpy as np
import torch

from ..modeling.mask_decoder import stability_score

__all__ = [
    "MaskData",
    "batch_slices",
    "batched_mask_to_box",
    "box_area",
    "box_iou",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_stats",
    "mask_to_rle",
    "nms",
    "records_to_labels",
    "rle_to_mask",
]


# ====================================================================================== grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n^2 x 2`` points ``(x, y)`` evenly spaced in [0, 1]^2, at the centres of an n x n grid of
    cells (first coordinate varies fastest: row-major order)."""
    n = int(n_per_side)
    if n < 1:
        raise ValueError(f"points_per_side must be >= 1, got {n_per_side}")
    offset = 1.0 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / scale_per_layer**i)`` points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(int(n_layers) + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` (the whole image first) and their layer index.

    Layer i >= 1 has ``(2**i)**2`` overlapping crops; neighbouring crops of layer 1 overlap by
    ``overlap_ratio`` of the short side (less in deeper layers).
    """
    im_h, im_w = (int(v) for v in im_size)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    short_side = min(im_h, im_w)

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(int(n_layers)):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        cw, ch = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((cw - overlap) * i) for i in range(n)]
        y0s = [int((ch - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + cw, im_w), min(y0 + ch, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


# ====================================================================================== boxes
def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``N x 4`` boxes ``(x0, y0, x1, y1)``: ``(x1 - x0) * (y1 - y0)``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``N x M`` IoU of two sets of ``(x0, y0, x1, y1)`` boxes (area as in :func:`box_area`).
    Pairs whose union is empty give NaN (never above a threshold)."""
    a1, a2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (a1[:, None] + a2[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (same result as ``torchvision.ops.nms``).

    Visits boxes by decreasing score (ties: lower index first) and drops every later box whose IoU
    with a kept box is > ``iou_threshold``. Returns the kept indices (int64), by decreasing score.
    Memory is O(N): IoUs are computed one kept box at a time.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects N x 4 boxes and N scores, got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    n = b.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        if i + 1 < n:
            iou = box_iou(b[i : i + 1], b[i + 1 :])[0]
            suppressed[i + 1 :] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """``... x H x W`` boolean masks -> ``... x 4`` boxes ``(x0, y0, x1, y1)`` with *inclusive*
    ``x1, y1`` (index of the last row / column), int64; ``[0, 0, 0, 0]`` for an empty mask.

    The single mask-to-box of the package (the generator's masks and its clean-up both use it).
    """
    shape = masks.shape
    h, w = shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*shape[:-2], 4, dtype=torch.int64, device=masks.device)
    m = masks.reshape(-1, h, w).bool()
    # amax of a bool tensor is its any(), several times faster than any() on the CPU
    rows, cols = m.amax(dim=-1), m.amax(dim=-2)  # N x H, N x W
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y1 = torch.where(rows, ar_h, -1).amax(dim=-1)
    y0 = torch.where(rows, ar_h, h).amin(dim=-1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=-1)
    x0 = torch.where(cols, ar_w, w).amin(dim=-1)
    out = torch.stack([x0, y0, x1, y1], dim=-1)  # N x 4
    empty = ~rows.any(dim=-1)
    out[empty] = 0
    return out.reshape(*shape[:-2], 4)


def box_xyxy_to_xywh(box) -> list[float]:
    """``(x0, y0, x1, y1)`` -> ``[x0, y0, x1 - x0, y1 - y0]`` floats (the records' ``bbox`` and ``crop_box``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box, orig_box, atol: float = 20.0) -> torch.Tensor:
    """Boxes (crop coordinates) within ``atol`` pixels of an edge of the crop that is not an edge
    of the image: such masks are probably cut by the crop."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    b = boxes.float() + torch.tensor([crop_box[0], crop_box[1], crop_box[0], crop_box[1]], dtype=torch.float32, device=boxes.device)
    near_crop = torch.isclose(b, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ====================================================================================== mask scores
def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (the first is
    inside the second, so it is a ratio of pixel counts). NaN for a mask empty at both.

    ``... x H x W`` logits -> ``...`` float32; the decoder's
    :func:`~napari_sam2.modeling.mask_decoder.stability_score` is the implementation.
    """
    return stability_score(masks, threshold_offset, mask_threshold)


def mask_stats(logits: torch.Tensor, mask_threshold: float, offset: float):
    """Stability score, binary masks, areas and inclusive xyxy boxes of ``N x H x W`` logits, as
    numpy arrays (the thresholding runs where the logits are; only boolean masks leave the device).

    Returns
    -------
    stability
        ``N`` float32 (see :func:`calculate_stability_score`).
    masks
        ``N x H x W`` bool.
    areas
        ``N`` pixel counts (int64).
    boxes
        ``N x 4`` int64, see :func:`batched_mask_to_box`.
    """
    n = logits.shape[0]
    stab = calculate_stability_score(logits, mask_threshold, offset).cpu().numpy()  # N
    binary = logits > mask_threshold  # N x H x W
    boxes = batched_mask_to_box(binary).cpu().numpy()  # N x 4
    masks = binary.cpu().numpy()
    areas = np.count_nonzero(masks.reshape(n, -1), axis=1)
    return stab, masks, areas, boxes


# ====================================================================================== RLE and labels
def mask_to_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE ``{"size": [h, w], "counts": [...]}`` (column-major runs, starting
    with a background run) of an ``H x W`` boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    idx = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(idx).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def records_to_labels(records: Sequence[dict], shape: tuple[int, int] | None = None, order: str = "area") -> np.ndarray:
    """A label image (uint32, 0 = background) from :meth:`~napari_sam2.predictor.amg.AutomaticMaskGenerator.generate` records.

    ``order="area"``: larger masks are painted first so that smaller ones stay visible on top;
    ``"score"``: lower predicted IoU first. Label i + 1 is record i (in the given order).
    """
    if shape is None:
        if not records:
            raise ValueError("shape is needed when there are no records")
        shape = _record_mask(records[0]).shape
    labels = np.zeros(tuple(shape), dtype=np.uint32)
    if order == "area":
        seq = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    elif order == "score":
        seq = sorted(range(len(records)), key=lambda i: records[i]["predicted_iou"])
    else:
        raise ValueError(f"order must be 'area' or 'score', got {order!r}")
    for i in seq:
        labels[_record_mask(records[i])] = i + 1
    return labels


def _record_mask(rec: dict) -> np.ndarray:
    seg = rec["segmentation"]
    return rle_to_mask(seg) if isinstance(seg, dict) else np.asarray(seg, dtype=bool)


# ====================================================================================== kept masks
class MaskData:
    """Columns of kept masks; masks are stored as boolean patches cropped to their box (memory
    scales with the objects, not with N x H x W)."""

    def __init__(self) -> None:
        self.boxes = torch.zeros(0, 4, dtype=torch.int64)  # inclusive xyxy, image coordinates
        self.iou = torch.zeros(0)
        self.stability = torch.zeros(0)
        self.points = torch.zeros(0, 2, dtype=torch.float64)
        self.crop_boxes = torch.zeros(0, 4, dtype=torch.int64)
        self.patches: list[np.ndarray] = []
        self.areas = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.patches)

    def add(self, boxes, iou, stability, points, crop_box, patches, areas) -> None:
        self.boxes = torch.cat([self.boxes, boxes.to(torch.int64).cpu()])
        self.iou = torch.cat([self.iou, iou.float().cpu()])
        self.stability = torch.cat([self.stability, stability.float().cpu()])
        self.points = torch.cat([self.points, points.to(torch.float64).cpu()])
        cb = torch.tensor([list(crop_box)], dtype=torch.int64).expand(len(patches), 4)
        self.crop_boxes = torch.cat([self.crop_boxes, cb])
        self.patches += list(patches)
        self.areas = torch.cat([self.areas, torch.as_tensor(areas, dtype=torch.int64).reshape(-1)])

    def extend(self, other: MaskData) -> None:
        for name in ("boxes", "iou", "stability", "points", "crop_boxes", "areas"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.patches += other.patches

    def filter(self, keep: torch.Tensor) -> None:
        keep = torch.as_tensor(keep)
        idx = torch.nonzero(keep).flatten() if keep.dtype == torch.bool else keep.to(torch.int64)
        for name in ("boxes", "iou", "stability", "points", "crop_boxes", "areas"):
            setattr(self, name, getattr(self, name)[idx])
        self.patches = [self.patches[i] for i in idx.tolist()]

    def shift(self, crop_box: Sequence[int]) -> None:
        x0, y0 = int(crop_box[0]), int(crop_box[1])
        self.boxes = self.boxes + torch.tensor([[x0, y0, x0, y0]])
        self.points = self.points + torch.tensor([[x0, y0]], dtype=torch.float64)

    def full_mask(self, i: int, hw: tuple[int, int]) -> np.ndarray:
        out = np.zeros(hw, dtype=bool)
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        p = self.patches[i]
        out[y0 : y0 + p.shape[0], x0 : x0 + p.shape[1]] = p
        return out


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
